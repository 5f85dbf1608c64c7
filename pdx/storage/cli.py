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
from pdx.storage.config import StoreConfig, StoreOptions, parse_options

# flag -> StoreOptions field (help and defaults come from the model); env PDX_STORE_<FLAG>
FLAGS = {
    "--socket": "socket",
    "--capacity-gb": "capacity_gb",
    "--slab-mb": "slab_mb",
    "--http-host": "http_host",
    "--http-port": "http_port",
    "--l2": "l2",
    "--l2-queue": "l2_queue",
    "--l2-workers": "l2_workers",
    "--lease-ttl-s": "lease_ttl_s",
    "--remote-listen": "remote_listen",
    "--remote-transport": "remote_transport",
    "--remote-token": "auth_token",
    "--remote-advertise": "remote_advertise",
    "--remote-data-port": "remote_data_port",
    "--http-token": "http_token",
    "--hello-timeout-s": "hello_timeout_s",
    "--idle-timeout-s": "idle_timeout_s",
}


def _env(flag: str) -> str | None:
    return os.environ.get("PDX_STORE_" + flag.removeprefix("--").replace("-", "_").upper())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdx store", description="Serve the node-shared KV chunk store.")
    for flag, name in FLAGS.items():
        info = StoreOptions.model_fields[name]
        p.add_argument(flag, dest=name, default=_env(flag), help=f"{info.description} (default: {info.default})")
    p.add_argument("--prefault", action="store_true", help=StoreOptions.model_fields["prefault"].description)
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default=_env("--loop") or "auto",
                   help="event loop; auto = uvloop when installed (lower per-call latency)")  # fmt: skip
    p.add_argument("--log-level", default=_env("--log-level") or "info")
    return p


def config_from_args(args: argparse.Namespace) -> StoreConfig:
    """The flags (and env) as a ``StoreConfig``; ``ConfigError`` naming a bad one."""
    values = {name: getattr(args, name) for name in (*FLAGS.values(), "prefault")}
    return parse_options(StoreOptions, {k: v for k, v in values.items() if v is not None}, "pdx store")


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
            f"pdx store ready: socket={config.socket} http={http} arena={server.arena.name} "
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
