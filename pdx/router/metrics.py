"""The router's Prometheus metrics: plain counters on the hot path, rendered on scrape.

prometheus_client takes a lock and a label lookup per update; the router updates
a few ints and one bucket list per request instead and renders the text format
itself when ``/metrics`` is read. Names (all prefixed ``pdx_router_``):

- ``requests_total{route,code}``, ``errors_total{kind}``, ``retries_total``,
  ``decode_only_total`` (conditional disaggregation)
- ``ttft_seconds`` (request arrival to first body byte sent), ``latency_seconds`` (to last byte)
- per engine: ``engine_in_flight``, ``engine_healthy``, ``engine_circuit_open``,
  ``engine_requests_total``, ``engine_failures_total``, and the figures read from
  the engine's own ``/metrics``: ``engine_num_running``, ``engine_num_waiting``,
  ``engine_kv_usage``, ``engine_prompt_tokens{source}`` (``external_kv_transfer``
  is KV that arrived from a peer), ``engine_kv_failed_transfers``
- ``kv_transfer_stat_total{name}``: sums of numeric figures D reported in
  ``kv_transfer_params.pdx_transfer_stats``; ``kv_transfer_reports_total``
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    __slots__ = ("counts", "total", "num")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.num = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.num += 1

    def render(self, name: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(BUCKETS, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.num}')
        lines.append(f"{name}_sum {self.total}")
        lines.append(f"{name}_count {self.num}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class RouterMetrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.errors: defaultdict[str, int] = defaultdict(int)
        self.retries = 0
        self.decode_only = 0
        self.ttft = Histogram()
        self.latency = Histogram()
        self.kv_stats: defaultdict[str, float] = defaultdict(float)
        self.kv_reports = 0

    def record_kv_stats(self, stats: Any) -> None:
        if not isinstance(stats, dict):
            return
        self.kv_reports += 1
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.kv_stats[key] += value

    def render(self, engines: Iterable[Any]) -> bytes:
        p = "pdx_router_"
        lines = [f"# TYPE {p}requests_total counter"]
        lines += [f'{p}requests_total{{route="{r}",code="{c}"}} {n}' for (r, c), n in sorted(self.requests.items())]
        lines.append(f"# TYPE {p}errors_total counter")
        lines += [f'{p}errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())]
        lines += [f"# TYPE {p}retries_total counter", f"{p}retries_total {self.retries}"]
        lines += [f"# TYPE {p}decode_only_total counter", f"{p}decode_only_total {self.decode_only}"]
        lines += self.ttft.render(f"{p}ttft_seconds")
        lines += self.latency.render(f"{p}latency_seconds")
        lines += [f"# TYPE {p}kv_transfer_reports_total counter", f"{p}kv_transfer_reports_total {self.kv_reports}"]
        lines.append(f"# TYPE {p}kv_transfer_stat_total counter")
        lines += [f'{p}kv_transfer_stat_total{{name="{_escape(k)}"}} {v}' for k, v in sorted(self.kv_stats.items())]
        per_engine = (
            ("engine_in_flight", "gauge", lambda e: e.in_flight),
            ("engine_healthy", "gauge", lambda e: int(e.is_healthy)),
            ("engine_circuit_open", "gauge", lambda e: int(e.is_circuit_open_now())),
            ("engine_requests_total", "counter", lambda e: e.num_requests),
            ("engine_failures_total", "counter", lambda e: e.num_failures),
            ("engine_num_running", "gauge", lambda e: e.num_running),
            ("engine_num_waiting", "gauge", lambda e: e.num_waiting),
            ("engine_kv_usage", "gauge", lambda e: e.kv_usage),
            ("engine_kv_failed_transfers", "gauge", lambda e: e.kv_failed_transfers),
        )
        engines = list(engines)
        for name, kind, get in per_engine:
            lines.append(f"# TYPE {p}{name} {kind}")
            for e in engines:
                lines.append(f'{p}{name}{{engine="{_escape(e.id)}",role="{e.engine.role}"}} {get(e)}')
        lines.append(f"# TYPE {p}engine_prompt_tokens gauge")
        for e in engines:
            for source, value in sorted(e.prompt_tokens_by_source.items()):
                lines.append(f'{p}engine_prompt_tokens{{engine="{_escape(e.id)}",source="{_escape(source)}"}} {value}')
        return ("\n".join(lines) + "\n").encode()
