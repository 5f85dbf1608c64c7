"""``pdx bench serve``: TTFT, ITL, throughput and prefix hit rate of an OpenAI endpoint under load.

    pdx bench serve --url http://127.0.0.1:8000 [--model tiny] [--workload multi-round-chat,long-doc-qa,random]
                    [--qps 2] [--duration 60] [--json FILE] [--plot FILE.png] [--engine-url URL ...]
                    [--store-url URL]
    pdx bench serve --launch [--topology configs/local-2x-store.yaml] [--compare-no-store]
                    [--compare-lmcache] [--quick]

Each workload (see ``pdx.bench.workloads``) runs for ``--duration`` seconds at
``--qps`` (Poisson arrivals unless ``--arrival uniform``), sending streaming
``/v1/completions`` requests with token-id prompts. Engines' ``/metrics`` are read
before and after each run for the hit rate (``--engine-url``, default ``--url``;
with ``--launch`` the fleet's engines). ``--launch`` starts a local store, two vLLM
CPU engines and the router (``pdx.bench.serve_fleet``) while holding the engine
lock; ``--compare-no-store`` then runs the same workloads (same seeds) on a fresh
fleet without the store, and ``--compare-lmcache`` on the same fleet with LMCache's
multi-process server in place of pdx's store (``pdx.bench.serve_lmcache``; needs
``scripts/setup-lmcache.sh``). Table to stdout, progress to stderr; ``--json`` writes
``{"results": [{"workload", "store", "system", "ttft_ms_mean", ..., "hit_rate"}]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdx.bench.serve_client import LoadSpec, RequestRecord, run_load
from pdx.bench.serve_report import (
    ServeResult,
    format_table,
    plot_ttft,
    sources_delta,
    summarize,
    write_json,
)
from pdx.bench.workloads import (
    WORKLOADS,
    WorkloadSpec,
    create_workload,
    model_shape,
    users_for_kv_volume,
)

logger = logging.getLogger(__name__)

DEFAULT_TOPOLOGY = "configs/local-2x-store.yaml"
# Chat users open with a long context of their own (LMCache's multi-round QA shape) and
# their KV (kv_gb) exceeds the engines' own caches in configs/local-2x-store.yaml.
# random runs at random_qps, past what two CPU engines serve, so its tokens/s is the fleet's
# capacity (a tier's cost shows as lost throughput, not only as TTFT).
# --quick: (120 + 20 + 20) s of arrivals x 2 fleets + 2 fleet start-ups (~1.5 min each) < 15 min.
QUICK = {"qps": 1.0, "random_qps": 24.0, "duration": 120.0, "short_duration": 20.0, "kv_gb": 0.12, "system_tokens": 1024,
         "user_context_tokens": 4096, "answer_tokens": 96, "max_prompt_tokens": 7168, "doc_tokens": 2048,
         "random_tokens": 1024}  # fmt: skip
FULL = {"qps": 1.0, "random_qps": 24.0, "duration": 240.0, "short_duration": 60.0, "kv_gb": 0.12, "system_tokens": 1024,
        "user_context_tokens": 4096, "answer_tokens": 96, "max_prompt_tokens": 7168, "doc_tokens": 2048,
        "random_tokens": 1024}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """Where one run sends requests and reads counters."""

    url: str
    model: str
    engine_urls: tuple[str, ...]
    store_url: str | None
    system: str  # the label of the run's results: pdx-store, lmcache or none


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdx bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="OpenAI endpoint http://HOST:PORT (not with --launch)")
    p.add_argument("--model", default="tiny", help="model name sent in requests")
    p.add_argument(
        "--model-dir", help="model directory (vocab size, KV bytes/token); default the tiny model"
    )
    p.add_argument(
        "--workload", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS)
    )
    p.add_argument("--qps", type=float)
    p.add_argument("--duration", type=float,
                   help="seconds of arrivals per workload (default: the preset's, shorter for long-doc-qa and random)")  # fmt: skip
    p.add_argument("--arrival", choices=["poisson", "uniform"], default="poisson")
    p.add_argument("--max-requests", type=int, default=10_000, help="per workload")
    p.add_argument(
        "--drain", type=float, default=60.0, help="seconds to wait for open answers at the end"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--users", type=int, help="chat users (default: sized to --kv-gb)")
    p.add_argument("--kv-gb", type=float, help="chat users' KV volume (GB) that sizes --users")
    p.add_argument("--system-tokens", type=int)
    p.add_argument("--user-context-tokens", type=int,
                   help="each chat conversation's own opening context (after the system prompt)")  # fmt: skip
    p.add_argument("--user-turn-tokens", type=int, default=32)
    p.add_argument("--answer-tokens", type=int)
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--num-docs", type=int, default=2)
    p.add_argument("--doc-tokens", type=int)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--random-tokens", type=int)
    p.add_argument(
        "--engine-url", action="append", default=[], help="engine whose /metrics give the hit rate"
    )
    p.add_argument(
        "--store-url",
        help="pdx store HTTP URL whose /metrics are read too (marks results store=true)",
    )
    p.add_argument(
        "--launch", action="store_true", help="start a local store + 2-engine fleet + router"
    )
    p.add_argument("--topology", default=DEFAULT_TOPOLOGY)
    p.add_argument(
        "--compare-no-store", action="store_true", help="with --launch: rerun without the store"
    )
    p.add_argument("--compare-lmcache", action="store_true",
                   help="with --launch: rerun with LMCache's MP server in place of pdx's store")  # fmt: skip
    p.add_argument("--no-store-first", action="store_true",
                   help="with --compare-no-store: run the no-store fleet first (order effects)")  # fmt: skip
    p.add_argument("--log-dir", default="/tmp/pdx-bench-serve")
    p.add_argument(
        "--quick", action="store_true", help="short runs: the whole comparison under 15 minutes"
    )
    p.add_argument("--json", help="write results JSON here")
    p.add_argument("--plot", help="write a TTFT-over-time PNG here")
    p.add_argument("--no-progress", action="store_true")
    return p


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    preset = QUICK if args.quick else FULL
    vocab, kv_bytes = model_shape(args.model_dir)
    max_prompt = args.max_prompt_tokens or int(preset["max_prompt_tokens"])
    users = args.users or users_for_kv_volume(args.kv_gb or preset["kv_gb"], kv_bytes, max_prompt)
    return WorkloadSpec(
        seed=args.seed, vocab_size=vocab, output_tokens=args.output_tokens, num_users=users,
        system_tokens=args.system_tokens or int(preset["system_tokens"]), user_turn_tokens=args.user_turn_tokens,
        user_context_tokens=int(preset["user_context_tokens"] if args.user_context_tokens is None
                                else args.user_context_tokens),
        answer_tokens=args.answer_tokens or int(preset["answer_tokens"]), max_prompt_tokens=max_prompt, num_docs=args.num_docs,
        doc_tokens=args.doc_tokens or int(preset["doc_tokens"]), question_tokens=args.question_tokens,
        random_tokens=args.random_tokens or int(preset["random_tokens"]),
    )  # fmt: skip


async def _scrape(client: Any, urls: tuple[str, ...]) -> list[Any]:
    from pdx.engines.metrics import parse_prometheus_text

    samples = []
    for url in urls:
        try:
            resp = await client.get(url + "/metrics", timeout=10.0)
            samples.append(parse_prometheus_text(resp.text) if resp.status_code == 200 else None)
        except Exception as exc:  # the figure becomes null; the run goes on
            logger.warning("could not read %s/metrics: %s", url, exc)
            samples.append(None)
    return samples


def _store_line(before: list[Any], after: list[Any]) -> str | None:
    if not after or after[0] is None or before[0] is None:
        return None
    b, a = before[0], after[0]
    lookups = a.sum("pdx_store_lookup_chunks") - b.sum("pdx_store_lookup_chunks")
    hits = a.sum("pdx_store_lookup_hits") - b.sum("pdx_store_lookup_hits")
    saved = a.sum("pdx_store_saved_bytes") - b.sum("pdx_store_saved_bytes")
    loaded = a.sum("pdx_store_loaded_bytes") - b.sum("pdx_store_loaded_bytes")
    return f"store: {hits:.0f}/{lookups:.0f} chunk lookups hit, {saved / 1e6:.1f} MB saved, {loaded / 1e6:.1f} MB loaded"


async def run_workloads(
    target: Target,
    names: list[str],
    spec: WorkloadSpec,
    loads: LoadSpec | dict[str, LoadSpec],
    progress: bool,
    transport: Any = None,
) -> list[tuple[ServeResult, list[RequestRecord]]]:
    """Run each workload in turn against ``target`` (``loads``: one load, or one per workload name);
    ``transport`` is an httpx transport (tests)."""
    import httpx
    from tqdm import tqdm

    out = []
    first = loads if isinstance(loads, LoadSpec) else next(iter(loads.values()))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(first.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport) as client:
        for name in names:
            load = loads if isinstance(loads, LoadSpec) else loads[name]
            workload = create_workload(name, spec)
            before = await _scrape(client, target.engine_urls)
            store_before = await _scrape(client, (target.store_url,)) if target.store_url else []
            expected = min(load.max_requests, int(load.qps * load.duration_s))
            label = f"{name} tier={target.system}"
            with tqdm(
                total=expected, desc=label, unit="req", file=sys.stderr, disable=not progress
            ) as bar:
                records = await run_load(workload, client, target.url, target.model, load, spec.output_tokens,
                                         on_done=lambda _r: bar.update(1))  # fmt: skip
            after = await _scrape(client, target.engine_urls)
            sources = sources_delta(before, after)
            result = summarize(name, target.system, records, sources)
            if sources is not None:
                print(f"[pdx bench serve] {label}: prompt tokens {sources.local_compute:.0f} computed, "
                      f"{sources.local_cache_hit:.0f} from the engine's prefix cache, "
                      f"{sources.external_kv_transfer:.0f} loaded through the connector", file=sys.stderr)  # fmt: skip
            errors = [r.error for r in records if not r.is_ok]
            logger.info("%s: %d requests, %d errors%s", label, len(records), len(errors),
                        f" (first: {errors[0]})" if errors else "")  # fmt: skip
            if errors:
                print(f"[pdx bench serve] {label}: {len(errors)}/{len(records)} requests failed; first: {errors[0]}",
                      file=sys.stderr)  # fmt: skip
            if target.store_url and target.system == "pdx-store":
                line = _store_line(store_before, await _scrape(client, (target.store_url,)))
                if line:
                    print(f"[pdx bench serve] {label}: {line}", file=sys.stderr)
            out.append((result, records))
    return out


async def _warm_up(url: str, model: str) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=120.0) as client:
        for i in range(2):
            body = {"model": model, "prompt": [3 + i] * 64, "max_tokens": 4, "ignore_eos": True}
            await client.post(url + "/v1/completions", json=body)


_TIER_NAMES = {
    "pdx-store": "with pdx store",
    "none": "without a store",
    "lmcache": "with LMCache's MP server",
}


def _fleet(args: argparse.Namespace, system: str) -> Any:
    from pdx.bench.serve_fleet import LocalFleet

    log_dir = (
        Path(args.log_dir)
        / {"pdx-store": "store", "none": "no-store", "lmcache": "lmcache"}[system]
    )
    if system == "lmcache":
        from pdx.bench.serve_lmcache import LMCacheFleet

        return LMCacheFleet(args.topology, log_dir)
    return LocalFleet(args.topology, system == "pdx-store", log_dir)


def _run_launched(
    args: argparse.Namespace, names: list[str], spec: WorkloadSpec, loads: dict[str, LoadSpec]
) -> list:
    from pdx.config import load_topology
    from pdx.harness.lock import engine_lock

    runs = []
    systems = [
        "pdx-store",
        *(["lmcache"] if args.compare_lmcache else []),
        *(["none"] if args.compare_no_store else []),
    ]
    if args.no_store_first:
        systems.reverse()
    has_engines = any(e.local is not None for e in load_topology(args.topology).engines)
    if has_engines:
        print(
            "[pdx bench serve] taking the engine lock (waits while other engines run)",
            file=sys.stderr,
        )
    with engine_lock() if has_engines else contextlib.nullcontext():
        for system in systems:
            print(
                f"[pdx bench serve] starting the fleet of {args.topology} ({_TIER_NAMES[system]})",
                file=sys.stderr,
            )
            with _fleet(args, system) as fleet:
                if system == "pdx-store" and not fleet.store_connected:
                    print("[pdx bench serve] the installed PdxConnector takes no store settings: the engines "
                          "use their private prefix caches only", file=sys.stderr)  # fmt: skip
                asyncio.run(_warm_up(fleet.url, fleet.topology.model))
                target = Target(
                    fleet.url,
                    fleet.topology.model,
                    tuple(fleet.engine_urls),
                    fleet.store_url,
                    system,
                )
                runs += asyncio.run(run_workloads(target, names, spec, loads, not args.no_progress))
    return runs


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    names = [n.strip() for n in args.workload.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        print(
            f"pdx bench serve: unknown workload {unknown}; choose from {','.join(WORKLOADS)}",
            file=sys.stderr,
        )
        return 2
    if bool(args.url) == bool(args.launch):
        print("pdx bench serve: give exactly one of --url and --launch", file=sys.stderr)
        return 2
    if (args.compare_no_store or args.compare_lmcache) and not args.launch:
        print("pdx bench serve: --compare-no-store and --compare-lmcache need --launch (they restart the fleet)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.compare_lmcache:
        from pdx.bench.serve_lmcache import lmcache_site_packages, lmcache_venv
        from pdx.errors import ConfigError

        try:
            lmcache_site_packages(lmcache_venv())  # before any fleet starts
        except ConfigError as exc:
            print(f"pdx bench serve: --compare-lmcache: {exc}", file=sys.stderr)
            return 2
    preset = QUICK if args.quick else FULL
    spec = workload_spec(args)
    loads = {
        name: LoadSpec(qps=args.qps or preset["random_qps" if name == "random" else "qps"], max_requests=args.max_requests, arrival=args.arrival,
                       duration_s=args.duration or preset["duration" if name == "multi-round-chat" else "short_duration"],
                       drain_s=args.drain, seed=args.seed)
        for name in names
    }  # fmt: skip
    shape = ", ".join(f"{n} {ld.qps:g} QPS for {ld.duration_s:.0f} s" for n, ld in loads.items())
    print(f"[pdx bench serve] {shape}; {spec.num_users} chat users, conversations "
          f"of {spec.system_tokens} system + {spec.user_context_tokens} own context tokens up to "
          f"{spec.max_prompt_tokens}", file=sys.stderr)  # fmt: skip
    if args.launch:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_exit)  # SIGTERM unwinds: the fleet is stopped
        runs = _run_launched(args, names, spec, loads)
    else:
        url = args.url.rstrip("/")
        target = Target(url, args.model, tuple(u.rstrip("/") for u in (args.engine_url or [url])),
                        args.store_url, "pdx-store" if args.store_url else "none")  # fmt: skip
        runs = asyncio.run(run_workloads(target, names, spec, loads, not args.no_progress))
    results = [r for r, _ in runs]
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        plot_ttft([(f"{r.workload} tier={r.system}", recs) for r, recs in runs], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
