"""A closed-loop HTTP/1.1 load generator (run as its own process by ``pdx bench router``).

``python -m pdx.bench.loadgen --url http://127.0.0.1:8000/v1/completions --body JSON
--concurrency 32 --duration 5 --warmup 1`` keeps ``concurrency`` keep-alive
connections busy, each sending the next request as soon as the previous answer
has been read completely, and prints one JSON line: ``{"rps", "latency_ms_p50",
"latency_ms_p99", "num_requests", "num_errors"}``. Callback-driven (no task per
request) so the generator's own CPU cost stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import httptools


class _Client(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.t_sent = 0.0
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        self.t_sent = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.run.num_errors += 1
            assert self.transport is not None
            self.transport.close()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        run = self.run
        if now >= run.t_start:
            if self.status == 200:
                run.latencies.append(now - self.t_sent)
            else:
                run.num_errors += 1
        if now < run.t_end:
            self.send()
        else:
            run.num_done += 1
            if run.num_done == run.concurrency:
                run.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.run.t_end:
            self.run.num_errors += 1
            self.run.num_done += 1
            if self.run.num_done == self.run.concurrency and not self.run.done.done():
                self.run.done.set_result(None)


class _Run:
    def __init__(self, request: bytes, concurrency: int, warmup: float, duration: float) -> None:
        self.request = request
        self.concurrency = concurrency
        now = time.perf_counter()
        self.t_start = now + warmup
        self.t_end = self.t_start + duration
        self.latencies: list[float] = []
        self.num_errors = 0
        self.num_done = 0
        self.done = asyncio.get_running_loop().create_future()


def build_request(url: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    parts = urlsplit(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_load(url: str, body: bytes, concurrency: int, duration: float, warmup: float) -> dict:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    run = _Run(build_request(url, body), concurrency, warmup, duration)
    transports = []
    for _ in range(concurrency):
        transport, _ = await loop.create_connection(lambda: _Client(run), parts.hostname or "127.0.0.1", parts.port or 80)
        transports.append(transport)
    try:
        await asyncio.wait_for(run.done, warmup + duration + 30)
    except asyncio.TimeoutError:
        pass
    for transport in transports:
        transport.close()
    lat = sorted(run.latencies)
    return {
        "rps": len(lat) / duration,
        "latency_ms_p50": percentile(lat, 0.50) * 1e3,
        "latency_ms_p99": percentile(lat, 0.99) * 1e3,
        "num_requests": len(lat),
        "num_errors": run.num_errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON request body")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run_load(args.url, args.body.encode(), args.concurrency, args.duration, args.warmup))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
