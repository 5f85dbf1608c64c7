"""``pdx route --topology FILE [--host H] [--port P]``: serve the router with uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from pdx.config import load_topology
from pdx.errors import ConfigError


def serve(topology, host: str | None = None, port: int | None = None) -> None:
    """Run the router in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    from pdx.router.app import RouterApp
    from pdx.router.server import CoalescingHttpToolsProtocol

    cfg = topology.router
    gc.collect()
    gc.freeze()  # start-up objects never need collecting again
    gc.set_threshold(50_000, 50, 100)  # fewer collections on the hot path
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uvicorn.run(
        RouterApp(topology),
        host=host or cfg.host,
        port=cfg.port if port is None else port,
        loop=loop,
        http=CoalescingHttpToolsProtocol,
        log_level=cfg.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=75,
        backlog=4096,
    )


def route_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdx route", description="serve the PD router for a topology")
    parser.add_argument("--topology", "-t", required=True, help="YAML topology file")
    parser.add_argument("--host", help="override router.host")
    parser.add_argument("--port", type=int, help="override router.port")
    args = parser.parse_args(argv)
    try:
        topology = load_topology(args.topology)
    except ConfigError as exc:
        print(f"pdx route: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=topology.router.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = topology.router
    print(f"pdx route: http://{args.host or r.host}:{r.port if args.port is None else args.port} "
          f"-> {len(topology.engines)} engines ({topology.protocol} protocol); Ctrl-C stops", file=sys.stderr)
    serve(topology, args.host, args.port)
    return 0
