"""Serve fake engines in one process: ``python -m pdx.testing.fake_server NAME:ROLE:KIND:CONNECTOR:PORT ...``.

Used by ``pdx bench router`` (fakes in their own process, answering at once).
``--num-chunks`` sets the SSE chunks per streamed answer. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn

from pdx.testing.fake_engine import FakeEngine


async def _serve(fakes: list[tuple[FakeEngine, int]]) -> None:
    servers = []
    for fake, port in fakes:
        config = uvicorn.Config(
            fake, host="127.0.0.1", port=port, log_level="error", access_log=False, http="httptools",
            lifespan="off", backlog=4096,
        )  # fmt: skip
        servers.append(uvicorn.Server(config))
    await asyncio.gather(*(s.serve() for s in servers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fakes", nargs="+", help="NAME:ROLE:KIND:CONNECTOR:PORT")
    parser.add_argument("--num-chunks", type=int, default=64)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    fakes = []
    for spec in args.fakes:
        name, role, kind, connector, port = spec.split(":")
        fake = FakeEngine(name, role=role, kind=kind, connector=connector, model=args.model,
                          num_chunks=args.num_chunks, track_aborts=False)
        fake.requests = _Discard()  # type: ignore[assignment]
        fakes.append((fake, int(port)))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(fakes))
    return 0


class _Discard(list):
    """A request log that keeps nothing (benchmarks run millions of requests)."""

    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
