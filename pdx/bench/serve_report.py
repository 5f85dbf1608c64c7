"""Figures of ``pdx bench serve``: latency summary, prefix hit rate, JSON, table and plot.

Definitions (docs/bench-serve.md):

- TTFT percentiles use linear interpolation between closest ranks (numpy's default)
  over successful requests;
- ITL mean is the mean of every inter-token gap of every successful request;
- tokens/s are the prompt (output) tokens of successful requests divided by the
  time from the first request sent to the last answer completed;
- hit rate is ``1 - local_compute / total`` over the engines' counter
  ``vllm:prompt_tokens_by_source_total`` (deltas across the run, summed over
  engines; total = all sources: ``local_compute``, ``local_cache_hit``,
  ``external_kv_transfer``), i.e. the share of prompt tokens an engine did not
  compute itself (its own prefix cache or KV loaded through its connector).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pdx.bench.serve_client import RequestRecord

NO_TIER = "none"
RESULT_KEYS = (
    "workload", "store", "system", "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_mean",
    "input_tokens_per_s", "output_tokens_per_s", "hit_rate",
)  # fmt: skip
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


@dataclass(frozen=True)
class ServeResult:
    """One (workload, storage tier) run: exactly the JSON result keys.

    ``system``: the tier that served it: ``pdx-store``, ``lmcache`` (LMCache's MP server) or
    ``none`` (engines' own prefix caches only); ``store`` is ``system != "none"``.
    """

    workload: str
    store: bool
    system: str
    ttft_ms_mean: float | None
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    ttft_ms_p99: float | None
    itl_ms_mean: float | None
    input_tokens_per_s: float
    output_tokens_per_s: float
    hit_rate: float | None


@dataclass(frozen=True)
class PromptSources:
    """Prompt tokens by where the engines got their KV (counter deltas over one run)."""

    local_compute: float = 0.0
    local_cache_hit: float = 0.0
    external_kv_transfer: float = 0.0

    @property
    def total(self) -> float:
        return self.local_compute + self.local_cache_hit + self.external_kv_transfer

    @property
    def hit_rate(self) -> float | None:
        return None if self.total <= 0 else 1.0 - self.local_compute / self.total


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), digits)


def summarize(
    workload: str, system: str, records: list[RequestRecord], sources: PromptSources | None
) -> ServeResult:
    ok = [r for r in records if r.is_ok]
    ttft = np.array([1e3 * r.ttft_s for r in ok if r.ttft_s is not None])
    gaps = [g for r in ok for g in r.itl_s]
    elapsed = 0.0
    if ok:
        elapsed = max(r.t_sent + (r.e2e_s or 0.0) for r in ok) - min(r.t_sent for r in ok)

    def pct(q: float) -> float | None:
        return _round(float(np.percentile(ttft, q))) if ttft.size else None

    def per_s(total: int) -> float:
        return round(total / elapsed, 2) if elapsed > 0 else 0.0

    return ServeResult(
        workload=workload,
        store=system != NO_TIER,
        system=system,
        ttft_ms_mean=_round(float(ttft.mean())) if ttft.size else None,
        ttft_ms_p50=pct(50),
        ttft_ms_p90=pct(90),
        ttft_ms_p99=pct(99),
        itl_ms_mean=_round(1e3 * float(np.mean(gaps)), 3) if gaps else None,
        input_tokens_per_s=per_s(sum(r.num_prompt_tokens for r in ok)),
        output_tokens_per_s=per_s(sum(r.num_output_tokens for r in ok)),
        hit_rate=None if sources is None else _round(sources.hit_rate, 4),
    )


def sources_delta(before: list[Any], after: list[Any]) -> PromptSources | None:
    """Counter deltas summed over engines (``MetricSamples`` before/after); None if not exposed."""
    if not after or any(s is None for s in before + after):
        return None
    name = "prompt_tokens_by_source"
    if not any(s.find(name) for s in after):
        return None
    values = {
        source: sum(
            a.sum(name, source=source) - b.sum(name, source=source)
            for b, a in zip(before, after, strict=False)
        )
        for source in SOURCES
    }
    return PromptSources(**values)


def results_json(results: list[ServeResult]) -> dict[str, list[dict[str, Any]]]:
    return {"results": [{k: asdict(r)[k] for k in RESULT_KEYS} for r in results]}


def write_json(results: list[ServeResult], path: str | Path) -> None:
    Path(path).write_text(json.dumps(results_json(results), indent=2) + "\n")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}x" if a and b else "-"


def format_table(results: list[ServeResult]) -> str:
    head = f"{'workload':<18} {'tier':<9} {'TTFT mean':>10} {'p50':>8} {'p90':>8} {'p99':>8} " \
           f"{'ITL ms':>7} {'in tok/s':>9} {'out tok/s':>9} {'hit rate':>8}"  # fmt: skip
    lines = [head, "-" * len(head)]

    def f(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    for r in results:
        lines.append(
            f"{r.workload:<18} {r.system:<9} {f(r.ttft_ms_mean):>10} {f(r.ttft_ms_p50):>8} "
            f"{f(r.ttft_ms_p90):>8} {f(r.ttft_ms_p99):>8} {f(r.itl_ms_mean, '.2f'):>7} "
            f"{f(r.input_tokens_per_s):>9} {f(r.output_tokens_per_s):>9} {f(r.hit_rate, '.3f'):>8}"
        )
    by_key = {(r.workload, r.system): r for r in results}
    for (workload, system), r in by_key.items():
        for base_system in (NO_TIER, "lmcache"):
            base = by_key.get((workload, base_system))
            if (
                system in (NO_TIER, base_system)
                or base is None
                or (base_system == "lmcache" and system != "pdx-store")
            ):
                continue
            lines.append(f"{workload}: {system}/{base_system} TTFT mean = {_ratio(r.ttft_ms_mean, base.ttft_ms_mean)}, "
                         f"input tok/s = {_ratio(r.input_tokens_per_s, base.input_tokens_per_s)}")  # fmt: skip
    return "\n".join(lines)


def plot_ttft(runs: list[tuple[str, list[RequestRecord]]], path: str | Path) -> None:
    """TTFT (ms) against send time (s), one series per run label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (label, records) in enumerate(runs):
        ok = [r for r in records if r.is_ok and r.ttft_s is not None]
        ax.plot([r.t_sent for r in ok], [1e3 * (r.ttft_s or 0.0) for r in ok], ".-", color=f"C{i}", alpha=0.8,
                label=label, markersize=4, linewidth=0.8)  # fmt: skip
    ax.set_xlabel("request sent at (s from run start)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title("pdx bench serve: TTFT over time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
