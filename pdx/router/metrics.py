"""The router's Prometheus metrics: plain counters on the hot path, a custom collector on scrape.

prometheus_client's ``Counter.labels(...).inc()`` and ``Histogram.observe()`` take
a lock and a label lookup per update; the dispatcher instead bumps a few ints and
one bucket list per request (event-loop thread only), and ``RouterCollector``
turns them into metric families when ``/metrics`` is read. Each app has its own
``CollectorRegistry`` (tests run many apps in one process).

Names (all prefixed ``pdx_router_``; docs/router.md has the table):

- ``requests_total{route,code}``, ``errors_total{kind}``, ``retries_total``,
  ``decode_only_total`` (conditional disaggregation)
- ``ttft_seconds`` (request arrival to first body byte sent), ``latency_seconds`` (to last byte)
- ``kv_transfer_reports_total`` and, from the figures D reports in
  ``kv_transfer_params.pdx_transfer_stats``, ``kv_transfer_bytes_total``,
  ``kv_transfer_tokens_total``, ``kv_transfer_writes_total``,
  ``kv_transfer_{busy,wait,exposed,last_post,last_write}_seconds_total``,
  ``kv_transfer_failures_total``
- per engine ``{engine,role}``: ``engine_in_flight``, ``engine_healthy``,
  ``engine_circuit_open``, ``engine_requests_total``, ``engine_failures_total``;
  read from the engine's own ``/metrics`` (only once it answered):
  ``engine_requests_running``, ``engine_requests_waiting``, ``engine_kv_usage_ratio``,
  ``engine_prompt_tokens_total{source}`` (``external_kv_transfer`` is KV that
  arrived from a peer), ``engine_kv_failed_transfers_total`` (engines that count them)
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "pdx_router_"

# pdx_transfer_stats figure -> (metric name without prefix, scale to the base unit, help)
KV_FIGURES: dict[str, tuple[str, float, str]] = {
    "nbytes": ("kv_transfer_bytes", 1.0, "KV bytes decode engines reported received from prefill engines"),
    "num_tokens": ("kv_transfer_tokens", 1.0, "Prompt tokens whose KV decode engines reported received"),
    "num_writes": ("kv_transfer_writes", 1.0, "Layer writes (notifications) decode engines reported received"),
    "transfer_ms": ("kv_transfer_busy_seconds", 1e-3, "Sum over layer writes of landed on D minus posted by P"),
    "wait_ms": ("kv_transfer_wait_seconds", 1e-3, "D registered its blocks to everything landed"),
    "exposed_ms": ("kv_transfer_exposed_seconds", 1e-3, "Transfer time after the prefill engine's last layer"),
    "last_post_ms": ("kv_transfer_last_post_seconds", 1e-3, "Part of exposed time before the last write was posted"),
    "last_write_ms": ("kv_transfer_last_write_seconds", 1e-3, "Part of exposed time the last write was in flight"),
}


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

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets, cumulative = [], 0
        for bound, count in zip(BUCKETS, self.counts, strict=False):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", self.num))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class RouterMetrics:
    """Request counters, updated by the dispatcher only (event-loop thread, no locks)."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.errors: defaultdict[str, int] = defaultdict(int)
        self.retries = 0
        self.decode_only = 0
        self.ttft = Histogram()
        self.latency = Histogram()
        self.kv_figures: defaultdict[str, float] = defaultdict(float)  # KV_FIGURES key -> sum in base units
        self.kv_reports = 0
        self.kv_failures = 0

    def record_kv_stats(self, stats: Any) -> None:
        """Add one ``pdx_transfer_stats`` report (figures in the units D reports them)."""
        if not isinstance(stats, dict):
            return
        self.kv_reports += 1
        if stats.get("ok") is False:
            self.kv_failures += 1
        for key, (_, scale, _) in KV_FIGURES.items():
            value = stats.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.kv_figures[key] += value * scale


def _engine_families(engines: list[Any]) -> Iterator[Metric]:
    labels = ["engine", "role"]
    router_side = (
        ("engine_in_flight", GaugeMetricFamily, "Requests the router has open on the engine",
         lambda e: e.in_flight),
        ("engine_healthy", GaugeMetricFamily, "1 while the engine passes its health checks",
         lambda e: int(e.is_healthy)),
        ("engine_circuit_open", GaugeMetricFamily, "1 while the engine's circuit breaker is open",
         lambda e: int(e.is_circuit_open_now())),
        ("engine_requests", CounterMetricFamily, "Legs the router sent to the engine",
         lambda e: e.num_requests),
        ("engine_failures", CounterMetricFamily, "Legs that failed on the engine (5xx, reset, timeout)",
         lambda e: e.num_failures),
    )  # fmt: skip
    for name, cls, doc, get in router_side:
        fam = cls(PREFIX + name, doc, labels=labels)
        for e in engines:
            fam.add_metric([e.id, e.engine.role], get(e))
        yield fam
    scraped = [e for e in engines if e.has_scraped_metrics]  # no series for an engine that never answered
    engine_side = (
        ("engine_requests_running", "Requests running on the engine (its own /metrics)", lambda e: e.num_running),
        ("engine_requests_waiting", "Requests queued on the engine (its own /metrics)", lambda e: e.num_waiting),
        ("engine_kv_usage_ratio", "KV cache in use on the engine, 0 to 1 (its own /metrics)", lambda e: e.kv_usage),
    )
    for name, doc, get in engine_side:
        fam = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
        for e in scraped:
            fam.add_metric([e.id, e.engine.role], get(e))
        yield fam
    fam = CounterMetricFamily(PREFIX + "engine_kv_failed_transfers",
                              "KV transfers the engine's connector counted as failed (its own /metrics)",
                              labels=labels)  # fmt: skip
    for e in scraped:
        if e.kv_failed_transfers is not None:
            fam.add_metric([e.id, e.engine.role], e.kv_failed_transfers)
    yield fam
    fam = CounterMetricFamily(PREFIX + "engine_prompt_tokens",
                              "Prompt tokens by where their KV came from (external_kv_transfer: from a peer)",
                              labels=[*labels, "source"])  # fmt: skip
    for e in scraped:
        for source, value in sorted(e.prompt_tokens_by_source.items()):
            fam.add_metric([e.id, e.engine.role, source], value)
    yield fam


class RouterCollector:
    """Reads ``RouterMetrics`` and the engine states when the registry is scraped."""

    def __init__(self, metrics: RouterMetrics, engines: Callable[[], Iterable[Any]]) -> None:
        self.metrics = metrics
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        fam = CounterMetricFamily(PREFIX + "requests", "Generation requests answered, by route and status",
                                  labels=["route", "code"])  # fmt: skip
        for (route, code), n in sorted(m.requests.items()):
            fam.add_metric([route, str(code)], n)
        yield fam
        fam = CounterMetricFamily(PREFIX + "errors", "Failed requests by kind (bad_request, engine, no_engine, "
                                  "client_disconnect, stream_broken)", labels=["kind"])  # fmt: skip
        for kind, n in sorted(m.errors.items()):
            fam.add_metric([kind], n)
        yield fam
        yield CounterMetricFamily(PREFIX + "retries", "Attempts retried on another pair", value=m.retries)
        yield CounterMetricFamily(PREFIX + "decode_only", "Requests served by a decode engine alone",
                                  value=m.decode_only)  # fmt: skip
        yield m.ttft.family(PREFIX + "ttft_seconds", "Request arrival to the first body byte sent to the client")
        yield m.latency.family(PREFIX + "latency_seconds", "Request arrival to the last body byte sent")
        yield CounterMetricFamily(PREFIX + "kv_transfer_reports", "pdx_transfer_stats reports decode engines sent",
                                  value=m.kv_reports)  # fmt: skip
        yield CounterMetricFamily(PREFIX + "kv_transfer_failures", "pdx_transfer_stats reports with ok: false",
                                  value=m.kv_failures)  # fmt: skip
        for key, (name, _, doc) in KV_FIGURES.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=m.kv_figures.get(key, 0.0))
        yield from _engine_families(list(self.engines()))


def create_registry(metrics: RouterMetrics, engines: Callable[[], Iterable[Any]]) -> CollectorRegistry:
    """A registry of its own for one router app (never prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(metrics, engines))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, bytes]:
    """(body, content type) of the Prometheus text exposition."""
    return generate_latest(registry), CONTENT_TYPE_LATEST.encode()
