"""``pdx store``: run the node-shared KV store until SIGINT/SIGTERM.

    pdx store --socket /run/pdx/store.sock --capacity-gb 8 --l2 redis://10.0.0.5:6379/0

Flags default from ``PDX_STORE_<FLAG>`` environment variables (for example
``PDX_STORE_CAPACITY_GB=8``). Once serving it prints one line,
``pdx store ready: socket=... http=... arena=... capacity_bytes=...``, to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from pdx.errors import PdxError
from pdx.storage.config import GB, MB, StoreConfig

DEFAULT_SOCKET = "/tmp/pdx-store.sock"


def _env(name: str, default: object) -> object:
    return os.environ.get(f"PDX_STORE_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdx store", description="Serve the node-shared KV chunk store."
    )
    p.add_argument(
        "--socket", default=_env("socket", DEFAULT_SOCKET), help="unix socket engines connect to"
    )
    p.add_argument(
        "--capacity-gb", type=float, default=_env("capacity_gb", 4.0), help="L1 arena size (GB)"
    )
    p.add_argument(
        "--slab-mb",
        type=float,
        default=_env("slab_mb", 64),
        help="slab size (MiB); a chunk must fit in one",
    )
    p.add_argument("--http-host", default=_env("http_host", "127.0.0.1"))
    p.add_argument(
        "--http-port",
        type=int,
        default=_env("http_port", 8300),
        help="0 = any free port, -1 = no HTTP",
    )
    p.add_argument(
        "--l2", default=_env("l2", None), help="L2 URL: file:///path or redis://host:port/db"
    )
    p.add_argument(
        "--l2-queue",
        type=int,
        default=_env("l2_queue", 256),
        help="write-through backlog before drops",
    )
    p.add_argument(
        "--l2-workers", type=int, default=_env("l2_workers", 2), help="threads writing to L2"
    )
    p.add_argument(
        "--lease-ttl-s",
        type=float,
        default=_env("lease_ttl_s", 60.0),
        help="longest a lease may live",
    )
    p.add_argument("--remote-listen", default=_env("remote_listen", None), metavar="HOST:PORT",
                   help="serve engines on other nodes on this TCP port (0 = any); off by default")
    p.add_argument("--remote-transport", choices=["tcp", "nixl", "auto"],
                   default=_env("remote_transport", "tcp"), help="transport remote clients move chunks over")
    p.add_argument("--remote-token", default=_env("remote_token", ""),
                   help="token remote clients must present (prefer the env PDX_STORE_REMOTE_TOKEN)")
    p.add_argument("--remote-advertise", default=_env("remote_advertise", None),
                   help="host remote clients dial for data (tcp; default: the listen host)")
    p.add_argument("--remote-data-port", type=int, default=_env("remote_data_port", 0),
                   help="tcp data port (0 = any free port)")
    p.add_argument("--prefault", action="store_true", help="touch the whole arena at start")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default=_env("loop", "auto"),
                   help="event loop; auto = uvloop when installed (lower per-call latency)")  # fmt: skip
    p.add_argument("--log-level", default=_env("log_level", "info"))
    return p


def config_from_args(args: argparse.Namespace) -> StoreConfig:
    capacity = int(float(args.capacity_gb) * GB)
    slab = int(float(args.slab_mb) * MB)
    if capacity <= 0 or slab <= 0:
        raise ValueError("--capacity-gb and --slab-mb must be positive")
    if args.remote_listen:
        from pdx.storage.remote_server import parse_listen

        parse_listen(args.remote_listen)
        if not args.remote_token:
            logging.getLogger(__name__).warning(
                "--remote-listen without --remote-token: any host that reaches the port can use the store"
            )
    return StoreConfig(
        socket_path=args.socket,
        capacity_bytes=capacity,
        slab_bytes=slab,
        http_host=args.http_host,
        http_port=int(args.http_port),
        l2_url=args.l2 or None,
        l2_queue=int(args.l2_queue),
        l2_workers=max(1, int(args.l2_workers)),
        lease_ttl_s=float(args.lease_ttl_s),
        prefault=bool(args.prefault),
        remote_listen=args.remote_listen or None,
        remote_transport=str(args.remote_transport),
        remote_token=str(args.remote_token or ""),
        remote_advertise=args.remote_advertise or None,
        remote_data_port=int(args.remote_data_port),
    )


async def serve(config: StoreConfig) -> None:
    from pdx.storage.server import StoreServer

    server = StoreServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        assert server.arena is not None
        http = f"http://{config.http_host}:{server.http_port}" if server.http_port else "off"
        remote = "off" if server.remote is None else f"{server.remote.host}:{server.remote.port}"
        print(
            f"pdx store ready: socket={config.socket_path} http={http} arena={server.arena.name} "
            f"capacity_bytes={server.arena.nbytes} l2={config.l2_url or 'none'} remote={remote}",
            flush=True,
        )
        await stop.wait()
    finally:
        await server.aclose()
        logging.getLogger(__name__).info("store stopped; arena and socket removed")


def _run(coro: Any, loop: str) -> None:
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise SystemExit("pdx store: --loop uvloop needs the uvloop package") from None
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
        _run(serve(config), args.loop)
    except (OSError, ValueError, PdxError) as exc:
        print(f"pdx store: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, OSError) else 2
    return 0
