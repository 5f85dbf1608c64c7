"""``pdx route --topology FILE [--host H] [--port P] [--insecure]``: serve the router with uvicorn.

A router listening on a non-loopback address needs ``router.auth_token`` (or
``PDX_ROUTER_AUTH_TOKEN``); ``--insecure`` (topology ``router.insecure: true``)
lets it start without one.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from pdx.config import load_topology
from pdx.errors import ConfigError

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def check_exposure(cfg, host: str, is_insecure: bool = False) -> None:
    """ConfigError when the router would listen beyond loopback with no client token."""
    if cfg.auth_token or cfg.insecure or is_insecure:
        return
    if host in _LOOPBACK_HOSTS or host.startswith("127."):
        return
    raise ConfigError(
        f"the router would listen on {host} without a client token: set router.auth_token "
        "(or PDX_ROUTER_AUTH_TOKEN), listen on 127.0.0.1, or pass --insecure (router.insecure: true)"
    )


def serve(topology, host: str | None = None, port: int | None = None, is_insecure: bool = False) -> None:
    """Run the router in the foreground until SIGINT/SIGTERM; ConfigError if exposed without a token."""
    import uvicorn

    from pdx.router.app import RouterApp
    from pdx.router.server import uvicorn_options

    cfg = topology.router
    host = host or cfg.host
    check_exposure(cfg, host, is_insecure)
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
        host=host,
        port=cfg.port if port is None else port,
        loop=loop,
        log_level=cfg.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        backlog=4096,
        **uvicorn_options(cfg),  # client header/body/keep-alive timeouts
    )


def route_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdx route", description="serve the PD router for a topology")
    parser.add_argument("--topology", "-t", required=True, help="YAML topology file")
    parser.add_argument("--host", help="override router.host")
    parser.add_argument("--port", type=int, help="override router.port")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback host without router.auth_token (anyone who reaches it may use it)")
    args = parser.parse_args(argv)
    try:
        topology = load_topology(args.topology)
        check_exposure(topology.router, args.host or topology.router.host, args.insecure)
    except ConfigError as exc:
        print(f"pdx route: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=topology.router.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = topology.router
    print(f"pdx route: http://{args.host or r.host}:{r.port if args.port is None else args.port} "
          f"-> {len(topology.engines)} engines ({topology.protocol} protocol); Ctrl-C stops", file=sys.stderr)
    serve(topology, args.host, args.port, args.insecure)
    return 0
