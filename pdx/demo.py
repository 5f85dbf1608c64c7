"""``pdx demo [--topology FILE]``: the main job, end to end on this machine.

Launches the topology's local engines (default ``configs/local-1p1d.yaml``: the
tiny model on two vLLM CPU engines with the pdx connector), starts the router,
sends one chat request through it, prints the answer and the KV-transfer
figures (prompt tokens whose KV D received from P, transfer stats), then stops
everything. Holds ``/tmp/pdx-vllm.lock`` while engines run.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import sys
import threading
import time
from pathlib import Path

DEFAULT_TOPOLOGY = "configs/local-1p1d.yaml"
QUESTION = "In one sentence: what does a prefill-decode disaggregation router do?"


def _find_topology(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    beside_repo = Path(__file__).resolve().parents[1] / name
    return beside_repo if beside_repo.exists() else path


class _RouterThread:
    """The router served by uvicorn in a background thread."""

    def __init__(self, topology) -> None:
        import uvicorn

        from pdx.router.app import RouterApp
        from pdx.router.cli import check_exposure
        from pdx.router.server import uvicorn_options

        r = topology.router
        check_exposure(r, r.host)  # the same listener rules as ``pdx route``: token, timeouts
        config = uvicorn.Config(RouterApp(topology), host=r.host, port=r.port, log_level="error",
                                access_log=False, **uvicorn_options(r))  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> _RouterThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdx demo", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default=DEFAULT_TOPOLOGY, help=f"default {DEFAULT_TOPOLOGY}")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import httpx

    from pdx.config import load_topology
    from pdx.errors import PdxError
    from pdx.launch import start_local_engines, stop_engines, with_fleet_secret

    try:
        topology = with_fleet_secret(load_topology(_find_topology(args.topology)))
    except PdxError as exc:
        print(f"pdx demo: {exc}", file=sys.stderr)
        return 1
    lock = open("/tmp/pdx-vllm.lock", "a")  # noqa: SIM115 - released at exit
    if any(e.local is not None for e in topology.engines):  # one local vLLM fleet at a time
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("[pdx demo] another vLLM fleet runs on this machine; waiting for it to stop", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
    engines: list = []
    try:
        print(f"[pdx demo] {topology.source}: {len(topology.engines)} engines, {topology.protocol} protocol",
              file=sys.stderr)  # fmt: skip
        engines = start_local_engines(topology, Path("/tmp/pdx-demo"))
        r = topology.router
        url = f"http://{r.host}:{r.port}"
        with _RouterThread(topology), httpx.Client(base_url=url, timeout=300) as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            body = {"model": topology.model, "messages": [{"role": "user", "content": args.question}],
                    "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
            client.post("/v1/chat/completions", json={**body, "max_tokens": 1})  # warm-up
            decoders = [e for e in topology.engines if e.can_decode]
            before = {e.id: _prompt_tokens_by_source(e.url) for e in decoders}  # the warm-up's
            t0 = time.perf_counter()
            resp = client.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - t0
            if resp.status_code != 200:
                print(f"pdx demo: the router answered {resp.status_code}: {resp.text}", file=sys.stderr)
                return 1
            answer = resp.json()
            print(f"Q: {args.question}")
            print(f"A: {answer['choices'][0]['message']['content']!r}")
            usage = answer.get("usage", {})
            print(f"   {usage.get('prompt_tokens')} prompt tokens, {usage.get('completion_tokens')} generated, "
                  f"{elapsed * 1e3:.0f} ms through the router")
            for engine in decoders:
                now = _prompt_tokens_by_source(engine.url)
                external, local = (now[i] - before[engine.id][i] for i in range(2))
                print(f"KV: decode engine {engine.id}: {external:.0f} prompt tokens' KV received from P, "
                      f"{local:.0f} computed locally")
            stats = answer.get("kv_transfer_params") or {}
            if isinstance(stats, dict) and stats.get("pdx_transfer_stats"):
                print(f"KV: transfer stats reported by D: {stats['pdx_transfer_stats']}")
        return 0
    except PdxError as exc:
        print(f"pdx demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stop_engines(engines)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _prompt_tokens_by_source(url: str) -> tuple[float, float]:
    """A vLLM engine's prompt tokens so far: (KV received from outside, computed locally)."""
    import httpx

    from pdx.engines.metrics import parse_prometheus_text

    samples = parse_prometheus_text(httpx.get(url + "/metrics", timeout=10).text)
    return (samples.sum("prompt_tokens_by_source", source="external_kv_transfer"),
            samples.sum("prompt_tokens_by_source", source="local_compute"))
