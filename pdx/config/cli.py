"""``pdx check --topology FILE``: validate a topology and print a summary."""

from __future__ import annotations

import argparse
import sys

from pdx.config import load_topology
from pdx.errors import ConfigError


def check_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdx check", description="validate a topology file")
    parser.add_argument("--topology", "-t", required=True, help="YAML topology file")
    args = parser.parse_args(argv)
    try:
        topo = load_topology(args.topology)
    except ConfigError as exc:
        print(f"pdx check: {exc}", file=sys.stderr)
        return 1
    r = topo.router
    print(f"{topo.source}: ok")
    print(f"  model     {topo.model}" + (f" ({topo.model_path})" if topo.model_path else ""))
    print(f"  protocol  {topo.protocol}")
    print(f"  router    http://{r.host}:{r.port}  prefill={r.policies.prefill} decode={r.policies.decode}")
    for e in topo.engines:
        extra = f" bootstrap_port={e.bootstrap_port}" if e.bootstrap_port else ""
        local = " (local)" if e.local else ""
        print(f"  engine    {e.id:<8} {e.role:<8} {e.kind}/{e.connector or '-'} {e.url}{extra}{local}")
    return 0
