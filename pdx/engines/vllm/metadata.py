"""What PdxConnector's scheduler side tells its workers each step, and what they answer.

The specs themselves are engine-agnostic (``pdx.connector.specs``); this module wraps them in
vLLM's metadata types.

Scheduler -> worker: ``PdxConnectorMetadata`` (pickled into every step).
Worker -> scheduler: ``PdxWorkerMeta`` (per-request ``TransferFigures``, aggregated
over workers) and ``PdxKVConnectorStats`` (vLLM's connector stats/logging).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from pdx.connector.figures import TransferFigures, aggregate_figures
from pdx.connector.specs import (
    FinishSpec,
    RecvSpec,
    ReleaseSpec,
    SaveSpec,
    StoreLoadSpec,
    StoreSaveSpec,
)


@dataclass
class PdxConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    finishes: list[FinishSpec] = field(default_factory=list)
    releases: list[ReleaseSpec] = field(default_factory=list)
    store_saves: list[StoreSaveSpec] = field(default_factory=list)
    store_loads: list[StoreLoadSpec] = field(default_factory=list)


@dataclass
class PdxWorkerMeta(KVConnectorWorkerMetadata):
    stats: dict[str, TransferFigures] = field(default_factory=dict)  # by req_id

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PdxWorkerMeta)
        merged = dict(self.stats)
        for rid, fig in other.stats.items():
            mine = merged.get(rid)
            merged[rid] = fig if mine is None else aggregate_figures(mine, fig)
        return PdxWorkerMeta(merged)


@dataclass
class PdxKVConnectorStats(KVConnectorStats):
    """Per interval: transfers completed/failed, bytes, transfer and exposed seconds."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"num_transfers": 0, "num_failed": 0, "nbytes": 0, "transfer_s": 0.0, "exposed_s": 0.0}

    def record(self, figures: TransferFigures) -> None:
        if figures.is_ok:
            self.data["num_transfers"] += 1
        else:
            self.data["num_failed"] += 1
            return
        self.data["nbytes"] += figures.nbytes
        self.data["transfer_s"] += figures.transfer_ms / 1e3
        self.data["exposed_s"] += (figures.exposed_ms or 0.0) / 1e3

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        n = max(self.data["num_transfers"], 1)
        return {
            "Num transfers": self.data["num_transfers"],
            "Num failed transfers": self.data["num_failed"],
            "MB moved": round(self.data["nbytes"] / 2**20, 3),
            "Avg transfer time (ms)": round(1e3 * self.data["transfer_s"] / n, 3),
            "Avg exposed transfer time (ms)": round(1e3 * self.data["exposed_s"] / n, 3),
        }

    def is_empty(self) -> bool:
        return self.data["num_transfers"] == 0 and self.data["num_failed"] == 0


__all__ = [
    "FinishSpec", "PdxConnectorMetadata", "PdxKVConnectorStats", "PdxWorkerMeta", "RecvSpec",
    "ReleaseSpec", "SaveSpec", "StoreLoadSpec", "StoreSaveSpec",
]
