"""``pdx bench pd``: TTFT and end-to-end latency of single, vLLM NIXL 1P1D and pdx 1P1D.

    pdx bench pd [--quick] [--json FILE] [--transport tcp|shm|nixl|ucx|auto]
                 [--sizes 1024,4096] [--reps N] [--systems single,vllm-nixl,pdx]
                 [--model-layers 2]

It builds the tiny model (``--model-layers`` decoder layers), then for each system
in turn starts its engines (P on core 0, D on core 1; the single engine on core 0),
sends warm-up requests, then for each prompt size ``--reps`` streaming requests one
at a time, and stops the engines. Every request is a distinct seeded random prompt
(the same set for every system), so vLLM's prefix cache (left at its default) never
hits. TTFT is from sending the request (P's leg included) to D's first streamed
token; e2e is to the end of the stream (16 output tokens). A system that fails to
start or serve gets an ``error`` entry; the others still run.

pdx's exposed transfer time is measured two ways, both over ``transfer_ms``: from P
having its last layer's KV written (``exposed_transfer_fraction``) and from P's last
layer's attention done (``exposed_after_attention_fraction``), each to D's load complete.

JSON: ``{"results": [{"system", "prompt_tokens", "ttft_ms_p50", "ttft_ms_p99",
"e2e_ms_p50", ...}], "pdx_exposed_transfer_fraction": <at the largest size>,
"pdx_exposed_after_attention_fraction": ..., "transport": ..., "model_layers": ...}``.
Engines hold the machine-wide engine lock while they run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SYSTEMS = ("single", "vllm-nixl", "pdx")
FULL_REPS, QUICK_REPS, WARMUP_REPS = 10, 3, 2


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def prompts_for(size: int, count: int, offset: int) -> list[list[int]]:
    """``count`` distinct seeded prompts of ``size`` tokens; ``offset`` separates sets."""
    import numpy as np

    return [
        np.random.default_rng([size, offset + i]).integers(3, 4096, size=size).tolist()
        for i in range(count)
    ]


def _summary(system: str, size: int, timings: list) -> dict[str, Any]:
    ttft = [1e3 * t.ttft_s for t in timings]
    e2e = [1e3 * t.e2e_s for t in timings]
    return {
        "system": system,
        "prompt_tokens": size,
        "num_requests": len(timings),
        "ttft_ms_p50": round(percentile(ttft, 50), 2),
        "ttft_ms_p99": round(percentile(ttft, 99), 2),
        "e2e_ms_p50": round(percentile(e2e, 50), 2),
        "e2e_ms_p99": round(percentile(e2e, 99), 2),
    }


def _exposed_fraction(figures: dict[str, dict], transfer_ids: list[str]) -> float | None:
    records = [figures[t] for t in transfer_ids if t in figures]
    transfer = math.fsum(float(r.get("transfer_ms") or 0.0) for r in records)
    exposed = math.fsum(float(r.get("exposed_ms") or 0.0) for r in records)
    return round(exposed / transfer, 4) if transfer > 0 else None


def _exposed_after_attention_ms(record: dict[str, Any]) -> float | None:
    """D's load complete minus P's last layer's attention done (P's and D's wall clocks)."""
    if record.get("t_done") is None or record.get("t_attention_done") is None:
        return None
    return max(1e3 * (float(record["t_done"]) - float(record["t_attention_done"])), 0.0)


def _exposed_after_attention_fraction(
    figures: dict[str, dict], transfer_ids: list[str]
) -> float | None:
    records = [figures[t] for t in transfer_ids if t in figures]
    exposed = [_exposed_after_attention_ms(r) for r in records]
    if not records or any(e is None for e in exposed):
        return None
    transfer = math.fsum(float(r.get("transfer_ms") or 0.0) for r in records)
    return (
        round(math.fsum(e for e in exposed if e is not None) / transfer, 4)
        if transfer > 0
        else None
    )


def _figure_p50s(figures: dict[str, dict], transfer_ids: list[str]) -> dict[str, float]:
    """p50 of D's per-transfer times: where exposed time goes (``exposed_ms`` = P posting
    its last layer ``last_post_ms`` + that write ``last_write_ms``)."""
    records = [figures[t] for t in transfer_ids if t in figures]
    out = {}
    for key in ("transfer_ms", "exposed_ms", "last_post_ms", "last_write_ms"):
        values = [float(r[key]) for r in records if r.get(key) is not None]
        if values:
            out[f"{key}_p50"] = round(percentile(values, 50), 3)
    after = [e for e in map(_exposed_after_attention_ms, records) if e is not None]
    if after:
        out["exposed_after_attention_ms_p50"] = round(percentile(after, 50), 3)
    return out


def _error_entry(system: str, size: int, exc: BaseException) -> dict[str, Any]:
    message = " ".join(f"{type(exc).__name__}: {exc}".splitlines())
    return {"system": system, "prompt_tokens": size, "error": message[:400]}


async def _measure_size(system, client, size: int, reps: int) -> dict[str, Any]:
    for prompt in prompts_for(size, WARMUP_REPS, offset=10_000):
        await system.request(client, prompt)
    before = system.decode.scrape_metrics()
    first_tid = len(system.transfer_ids)
    timings = [await system.request(client, p) for p in prompts_for(size, reps, 0)]
    after = system.decode.scrape_metrics()
    entry = _summary(system.name, size, timings)
    prefill_legs = [1e3 * t.prefill_leg_s for t in timings if t.prefill_leg_s is not None]
    if prefill_legs:  # vllm-nixl: how much of TTFT is P's leg
        entry["prefill_leg_ms_p50"] = round(percentile(prefill_legs, 50), 2)
    if system.prefill is not None:  # proof the decoder did not recompute the prompt
        name = "prompt_tokens_by_source"
        for key, source in (
            ("decode_external_kv_tokens", "external_kv_transfer"),
            ("decode_local_compute_tokens", "local_compute"),
        ):
            entry[key] = int(after.sum(name, source=source) - before.sum(name, source=source))
    if system.stats_path is not None:
        tids = system.transfer_ids[first_tid:]
        figures = system.transfer_figures()
        entry["exposed_transfer_fraction"] = _exposed_fraction(figures, tids)
        entry["exposed_after_attention_fraction"] = _exposed_after_attention_fraction(figures, tids)
        entry.update(_figure_p50s(figures, tids))
    return entry


async def _measure(system, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    import httpx

    entries = []
    async with httpx.AsyncClient() as client:
        for size in sizes:
            try:
                entry = await _measure_size(system, client, size, reps)
            except Exception as exc:  # a failed size must not hide the other sizes
                logger.error("%s at %d tokens failed: %s", system.name, size, exc)
                entry = _error_entry(system.name, size, exc)
            entries.append(entry)
            logger.info("%s", entry)
    return entries


def run_system(
    name: str, base, log_dir: Path, transport: str, sizes, reps, nixl_threads=None
) -> list[dict]:
    from pdx.bench import pd_systems

    if name == "single":
        system = pd_systems.make_single(base, log_dir)
    elif name == "vllm-nixl":
        system = pd_systems.make_vllm_nixl(base, log_dir, nixl_threads)
    else:
        system = pd_systems.make_pdx(base, log_dir, transport)
    try:
        system.start()
        return asyncio.run(_measure(system, sizes, reps))
    except Exception as exc:  # one broken system must not hide the others' figures
        logger.error("%s failed: %s", name, exc)
        return [_error_entry(name, size, exc) for size in sizes]
    finally:
        system.stop()


def format_table(results: list[dict[str, Any]]) -> str:
    baseline = {
        r["prompt_tokens"]: r for r in results if r["system"] == "vllm-nixl" and "error" not in r
    }
    lines = [
        f"{'system':<10} {'prompt':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'e2e p50':>9} "
        f"{'TTFT/nixl':>9} {'e2e/nixl':>9}",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['system']:<10} {r['prompt_tokens']:>6}  error: {r['error'][:70]}")
            continue
        base = baseline.get(r["prompt_tokens"])
        ttft_ratio = f"{r['ttft_ms_p50'] / base['ttft_ms_p50']:.2f}x" if base else "-"
        e2e_ratio = f"{r['e2e_ms_p50'] / base['e2e_ms_p50']:.2f}x" if base else "-"
        lines.append(
            f"{r['system']:<10} {r['prompt_tokens']:>6} {r['ttft_ms_p50']:>7.1f}ms "
            f"{r['ttft_ms_p99']:>7.1f}ms {r['e2e_ms_p50']:>7.1f}ms {ttft_ratio:>9} {e2e_ratio:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdx bench pd", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REPS} repetitions, not {FULL_REPS}"
    )
    parser.add_argument("--json", metavar="FILE", help="write results as JSON")
    parser.add_argument("--transport", default="tcp", help="pdx transport (default tcp)")
    parser.add_argument("--sizes", default="1024,4096", help="prompt sizes in tokens")
    parser.add_argument("--reps", type=int, default=None, help="measured requests per size")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="subset to run")
    parser.add_argument(
        "--nixl-threads", type=int, default=None, help="NixlConnector num_threads (vLLM: 4)"
    )
    parser.add_argument(
        "--model-layers",
        type=int,
        default=2,
        help="tiny model decoder layers (default 2; real models have 24-80)",
    )
    parser.add_argument("--log-dir", default=None, help="engine logs (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    sizes = [int(s) for s in args.sizes.split(",")]
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not sizes or min(sizes) < 1:
        parser.error(f"unknown systems {sorted(unknown)} or bad sizes {args.sizes!r}")
    if args.model_layers < 1:
        parser.error("--model-layers must be at least 1")
    reps = args.reps or (QUICK_REPS if args.quick else FULL_REPS)

    from pdx.harness.lock import engine_lock
    from pdx.harness.process import EngineSpec
    from pdx.models.tiny import build_tiny_model

    max_model_len = max(sizes) + 512
    model = build_tiny_model(max_model_len=max(8192, max_model_len), num_layers=args.model_layers)
    base = EngineSpec(model=str(model), port=0, max_model_len=max_model_len, max_num_seqs=4)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdx-bench-pd-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    results: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    with engine_lock():
        for name in systems:
            results += run_system(
                name, replace(base), log_dir, args.transport, sizes, reps, args.nixl_threads
            )

    pdx_at_largest = [
        r for r in results if r["system"] == "pdx" and r["prompt_tokens"] == max(sizes)
    ]
    report = {
        "results": results,
        "pdx_exposed_transfer_fraction": (
            pdx_at_largest[0].get("exposed_transfer_fraction") if pdx_at_largest else None
        ),
        "pdx_exposed_after_attention_fraction": (
            pdx_at_largest[0].get("exposed_after_attention_fraction") if pdx_at_largest else None
        ),
        "transport": args.transport,
        "model": str(model),
        "model_layers": args.model_layers,
        "nixl_num_threads": args.nixl_threads,
        "reps": reps,
        "max_tokens": 16,
        "prefix_caching": "vLLM default (on); every request is a distinct prompt",
        "log_dir": str(log_dir),
        "num_cpus": os.cpu_count(),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # start, end
    }
    print(format_table(results))
    print(
        f"pdx exposed-transfer fraction at {max(sizes)} tokens ({args.model_layers}-layer model): "
        f"{report['pdx_exposed_transfer_fraction']} from its KV written, "
        f"{report['pdx_exposed_after_attention_fraction']} from its attention done"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
