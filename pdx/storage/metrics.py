"""Store counters and their Prometheus rendering.

The server keeps plain integers (``StoreCounters``, event-loop thread only); the
``/metrics`` endpoint and the ``stats`` op read the same numbers, so the two never
disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EWMA_ALPHA = 0.2


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


# stats key -> (metric name, type, help, labels)
_METRICS: list[tuple[str, str, str, str, dict[str, str]]] = [
    ("hits_l1", "pdx_store_hits_total", "counter", "Chunks served from the store", {"tier": "l1"}),
    ("hits_l2", "pdx_store_hits_total", "counter", "Chunks served from the store", {"tier": "l2"}),
    ("misses", "pdx_store_misses_total", "counter", "Chunks asked for and not served", {}),
    ("lookup_chunks", "pdx_store_lookup_chunks_total", "counter", "Keys named in lookups", {}),
    ("lookup_hits", "pdx_store_lookup_hits_total", "counter", "Keys found by lookups", {}),
    ("loaded_bytes", "pdx_store_loaded_bytes_total", "counter", "Bytes loaded by engines", {}),
    ("saved_bytes", "pdx_store_saved_bytes_total", "counter", "Bytes saved by engines", {}),
    ("load_seconds", "pdx_store_load_seconds_total", "counter", "Engine copy time for loads", {}),
    ("save_seconds", "pdx_store_save_seconds_total", "counter", "Engine copy time for saves", {}),
    ("load_gbps", "pdx_store_load_gbps", "gauge", "Recent load copy speed (GB/s)", {}),
    ("save_gbps", "pdx_store_save_gbps", "gauge", "Recent save copy speed (GB/s)", {}),
    ("evictions", "pdx_store_evictions_total", "counter", "Chunks evicted from L1", {}),
    ("evicted_bytes", "pdx_store_evicted_bytes_total", "counter", "Bytes evicted from L1", {}),
    ("reserve_no_space", "pdx_store_save_rejected_total", "counter", "Chunks not saved", {"reason": "no_space"}),
    ("reserve_too_large", "pdx_store_save_rejected_total", "counter", "Chunks not saved", {"reason": "too_large"}),
    ("leases_expired", "pdx_store_leases_expired_total", "counter", "Leases ended by TTL", {}),
    ("l2_writes", "pdx_store_l2_writes_total", "counter", "Chunks written through to L2", {}),
    ("l2_write_dropped", "pdx_store_l2_write_dropped_total", "counter", "Write-throughs dropped (queue full)", {}),
    ("l2_promotions", "pdx_store_l2_promotions_total", "counter", "Chunks promoted from L2 to L1", {}),
    ("l2_errors", "pdx_store_l2_errors_total", "counter", "L2 operations that failed", {}),
    ("l2_corrupt", "pdx_store_l2_corrupt_total", "counter", "L2 values that failed their checks", {}),
    ("remote_loaded_chunks", "pdx_store_remote_loaded_chunks_total", "counter", "Chunks read by remote clients", {}),
    ("remote_loaded_bytes", "pdx_store_remote_loaded_bytes_total", "counter", "Bytes read by remote clients", {}),
    ("remote_saved_chunks", "pdx_store_remote_saved_chunks_total", "counter", "Chunks saved by remote clients", {}),
    ("remote_saved_bytes", "pdx_store_remote_saved_bytes_total", "counter", "Bytes saved by remote clients", {}),
    ("remote_save_corrupt", "pdx_store_remote_save_corrupt_total", "counter", "Remote saves refused at commit (checksum)", {}),
    ("remote_refused", "pdx_store_remote_refused_total", "counter", "Remote connections refused", {}),
    ("remote_clients", "pdx_store_remote_clients", "gauge", "Remote clients connected", {}),
    ("capacity_bytes", "pdx_store_capacity_bytes", "gauge", "L1 arena capacity", {}),
    ("used_bytes", "pdx_store_used_bytes", "gauge", "L1 slot bytes in use", {}),
    ("num_chunks", "pdx_store_chunks", "gauge", "Chunks stored in L1", {}),
    ("num_pinned", "pdx_store_pinned_chunks", "gauge", "Chunks pinned by operators", {}),
    ("num_leases", "pdx_store_leases", "gauge", "Open read and write leases", {}),
    ("l2_queue_depth", "pdx_store_l2_queue_depth", "gauge", "Write-throughs waiting", {}),
]  # fmt: skip


def render_prometheus(stats: dict[str, Any]) -> bytes:
    """Prometheus text exposition (format 0.0.4) of a stats dict."""
    lines: list[str] = []
    seen: set[str] = set()
    for key, name, kind, help_, labels in _METRICS:
        if key not in stats:
            continue
        if name not in seen:
            seen.add(name)
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(
            f"{name}{{{label_text}}} {float(stats[key])!r}"
            if labels
            else f"{name} {float(stats[key])!r}"
        )
    return ("\n".join(lines) + "\n").encode()
