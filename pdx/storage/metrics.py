"""Store counters and their Prometheus rendering (prometheus_client, one registry per server).

The server keeps plain integers (``StoreCounters``, event-loop thread only); the
``/metrics`` endpoint (``StoreCollector``, read at scrape time) and the ``stats``
op read the same numbers, so the two never disagree. Metrics are in base units:
the ``stats`` op's ``load_gbps`` is ``pdx_store_load_speed_bytes_per_second``.
prometheus_client is imported where used, not at ``import pdx.storage``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

EWMA_ALPHA = 0.2


@dataclass(frozen=True)
class ClientStats:
    """What one engine's store client did (``StoreClient.stats()``)."""

    num_loaded: int  # chunks read out of the store
    num_saved: int  # chunks committed into the store
    num_save_dropped: int  # chunks not saved: queue full, store down or full
    num_errors: int  # calls that failed because the store was slow or gone
    num_corrupt: int  # loaded chunks that failed verification (verify_loads)
    loaded_bytes: int
    saved_bytes: int
    load_seconds: float  # time spent reading out of the arena
    save_seconds: float  # time spent writing into the arena (and checksumming)


@dataclass
class StoreCounters:
    hits_l1: int = 0  # chunks served by acquire straight from L1
    hits_l2: int = 0  # chunks served by acquire after promotion from L2
    misses: int = 0  # chunks asked by acquire and not served
    lookup_chunks: int = 0  # keys named in lookups
    lookup_hits: int = 0  # keys found by lookups (L1 + L2 leading run)
    loaded_bytes: int = 0  # bytes clients copied out of L1
    saved_bytes: int = 0  # bytes clients committed into L1
    load_seconds: float = 0.0  # client copy time reported at release
    save_seconds: float = 0.0  # client copy time reported at commit
    load_gbps: float = 0.0  # EWMA of per-lease copy speed
    save_gbps: float = 0.0
    reserve_no_space: int = 0  # chunks not saved: everything evictable pinned or in use
    reserve_too_large: int = 0  # chunks not saved: larger than a slab
    leases_expired: int = 0
    l2_writes: int = 0
    l2_write_dropped: int = 0  # write-through queue full
    l2_promotions: int = 0
    l2_errors: int = 0  # backend unreachable or failed
    l2_corrupt: int = 0  # values that failed their checks (served as misses)
    remote_loaded_chunks: int = 0  # chunks remote clients read over the transport (released leases)
    remote_loaded_bytes: int = 0
    remote_saved_chunks: int = 0  # chunks remote clients wrote and committed
    remote_saved_bytes: int = 0
    remote_save_corrupt: int = 0  # remotely written chunks whose bytes did not match at commit
    remote_refused: int = 0  # remote connections refused: bad token or hello, malformed frame

    def record_copy(self, kind: str, nbytes: int, seconds: float) -> None:
        if kind == "load":
            self.loaded_bytes += nbytes
            self.load_seconds += seconds
        else:
            self.saved_bytes += nbytes
            self.save_seconds += seconds
        if seconds > 0 and nbytes > 0:
            gbps = nbytes / seconds / 1e9
            old = getattr(self, f"{kind}_gbps")
            setattr(self, f"{kind}_gbps", gbps if old == 0 else old + EWMA_ALPHA * (gbps - old))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# stats key -> (metric name, type, help, labels, scale to the base unit)
_METRICS: list[tuple[str, str, str, str, dict[str, str], float]] = [
    ("hits_l1", "pdx_store_hits_total", "counter", "Chunks served by loads, from L1 or promoted from L2", {"tier": "l1"}, 1),
    ("hits_l2", "pdx_store_hits_total", "counter", "Chunks served by loads, from L1 or promoted from L2", {"tier": "l2"}, 1),
    ("misses", "pdx_store_misses_total", "counter", "Chunks asked for by loads and not served", {}, 1),
    ("lookup_chunks", "pdx_store_lookup_chunks_total", "counter", "Keys named in lookups", {}, 1),
    ("lookup_hits", "pdx_store_lookup_hits_total", "counter", "Keys found by lookups", {}, 1),
    ("loaded_bytes", "pdx_store_loaded_bytes_total", "counter", "Bytes engines copied out of L1", {}, 1),
    ("saved_bytes", "pdx_store_saved_bytes_total", "counter", "Bytes engines copied into L1", {}, 1),
    ("load_seconds", "pdx_store_load_seconds_total", "counter", "Engine copy time for loads", {}, 1),
    ("save_seconds", "pdx_store_save_seconds_total", "counter", "Engine copy time for saves", {}, 1),
    ("load_gbps", "pdx_store_load_speed_bytes_per_second", "gauge", "Recent load copy speed (EWMA per lease)", {}, 1e9),
    ("save_gbps", "pdx_store_save_speed_bytes_per_second", "gauge", "Recent save copy speed (EWMA per lease)", {}, 1e9),
    ("evictions", "pdx_store_evictions_total", "counter", "Chunks evicted from L1", {}, 1),
    ("evicted_bytes", "pdx_store_evicted_bytes_total", "counter", "Bytes evicted from L1", {}, 1),
    ("reserve_no_space", "pdx_store_save_rejected_total", "counter", "Chunks not saved", {"reason": "no_space"}, 1),
    ("reserve_too_large", "pdx_store_save_rejected_total", "counter", "Chunks not saved", {"reason": "too_large"}, 1),
    ("leases_expired", "pdx_store_leases_expired_total", "counter", "Leases ended by TTL", {}, 1),
    ("l2_writes", "pdx_store_l2_writes_total", "counter", "Chunks written through to L2", {}, 1),
    ("l2_write_dropped", "pdx_store_l2_write_dropped_total", "counter", "Write-throughs dropped (queue full)", {}, 1),
    ("l2_promotions", "pdx_store_l2_promotions_total", "counter", "Chunks promoted from L2 to L1", {}, 1),
    ("l2_errors", "pdx_store_l2_errors_total", "counter", "L2 operations that failed", {}, 1),
    ("l2_corrupt", "pdx_store_l2_corrupt_total", "counter", "L2 values that failed their checks", {}, 1),
    ("remote_loaded_chunks", "pdx_store_remote_loaded_chunks_total", "counter", "Chunks read by remote clients", {}, 1),
    ("remote_loaded_bytes", "pdx_store_remote_loaded_bytes_total", "counter", "Bytes read by remote clients", {}, 1),
    ("remote_saved_chunks", "pdx_store_remote_saved_chunks_total", "counter", "Chunks saved by remote clients", {}, 1),
    ("remote_saved_bytes", "pdx_store_remote_saved_bytes_total", "counter", "Bytes saved by remote clients", {}, 1),
    ("remote_save_corrupt", "pdx_store_remote_save_corrupt_total", "counter", "Remote saves refused at commit (checksum)", {}, 1),
    ("remote_refused", "pdx_store_remote_refused_total", "counter", "Remote connections refused", {}, 1),
    ("remote_clients", "pdx_store_remote_clients", "gauge", "Remote clients connected", {}, 1),
    ("capacity_bytes", "pdx_store_capacity_bytes", "gauge", "L1 arena capacity", {}, 1),
    ("used_bytes", "pdx_store_used_bytes", "gauge", "L1 slot bytes in use", {}, 1),
    ("num_chunks", "pdx_store_chunks", "gauge", "Chunks stored in L1", {}, 1),
    ("num_pinned", "pdx_store_pinned_chunks", "gauge", "Chunks pinned by operators", {}, 1),
    ("num_leases", "pdx_store_leases", "gauge", "Open read and write leases", {}, 1),
    ("l2_queue_depth", "pdx_store_l2_queue_depth", "gauge", "Write-throughs waiting", {}, 1),
]  # fmt: skip


class StoreCollector:
    """prometheus_client collector over ``stats()``: read at scrape time, nothing on the hot path."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.stats()
        families: dict[str, Any] = {}
        for key, name, kind, help_, labels, scale in _METRICS:
            if key not in stats:
                continue
            fam = families.get(name)
            if fam is None:
                if kind == "counter":
                    fam = CounterMetricFamily(name.removesuffix("_total"), help_, labels=list(labels))
                else:
                    fam = GaugeMetricFamily(name, help_, labels=list(labels))
                families[name] = fam
            fam.add_metric(list(labels.values()), float(stats[key]) * scale)
        yield from families.values()


def create_registry(stats: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own for one store server (never prometheus_client's global one)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(stats))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of the Prometheus text exposition."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
