"""``pdx bench WHAT``: dispatch to one benchmark module (imported only when run)."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "transport": "pdx.bench.transport",
    "kernels": "pdx.bench.kernels",
    "pd": "pdx.bench.pd",
    "router": "pdx.bench.router",
    "serve": "pdx.bench.serve",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pdx bench {" + ",".join(BENCHES) + "} [--quick] [--json FILE] ...")
        return 0
    name = argv[0]
    if name not in BENCHES:
        print(f"pdx bench: unknown benchmark {name!r}; choose one of {list(BENCHES)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(BENCHES[name])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("pdx"):
            print(f"pdx bench: {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(module.main(argv[1:]) or 0)
