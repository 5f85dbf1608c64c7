"""Thread-safe region bookkeeping for transports whose I/O runs in threads.

I/O threads pin the regions a frame touches for as long as they read or write
them; ``RegionPins.remove`` (called by ``MemoryRegion.release``) waits until the
last pin is gone, so no byte is written into memory after its owner released it.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from .base import MemoryRegion


def region_ids_of(column: np.ndarray) -> list[int]:
    """The distinct region ids of a table column; one region needs no sort or hash."""
    if len(column) == 0:
        return []
    first = int(column[0])
    if len(column) == 1 or bool((column == first).all()):
        return [first]
    return np.unique(column).tolist()


def region_addresses(region_ids: np.ndarray, regions: dict[int, tuple[int, int, memoryview]]) -> np.ndarray:
    """Base address of each row's region (0 where the region is not in ``regions``), int64."""
    ids = region_ids_of(region_ids)
    if len(ids) == 1:
        return np.full(len(region_ids), regions[ids[0]][0] if ids[0] in regions else 0, dtype=np.int64)
    base = np.zeros(len(region_ids), dtype=np.int64)
    for rid in ids:
        if rid in regions:
            base[region_ids == rid] = regions[rid][0]
    return base


def memory_view(addr: int, nbytes: int) -> memoryview:
    """A writable byte memoryview over raw process memory."""
    return memoryview((ctypes.c_ubyte * nbytes).from_address(addr)).cast("B")


class RegionPins:
    """Live regions (id -> address, size, view) with pin counts."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live: dict[int, tuple[int, int, memoryview]] = {}
        self._pins: dict[int, int] = {}

    def add(self, region: MemoryRegion) -> None:
        view = memory_view(region.addr, region.nbytes) if region.device == "cpu" else memoryview(b"")
        with self._cond:
            self._live[region.region_id] = (region.addr, region.nbytes, view)
            self._pins[region.region_id] = 0

    def remove(self, region_id: int, timeout: float | None = None) -> bool:
        """Stop new pins of the region, then wait until none is held. False on timeout."""
        with self._cond:
            self._live.pop(region_id, None)
            ok = self._cond.wait_for(lambda: self._pins.get(region_id, 0) == 0, timeout)
            if ok:
                self._pins.pop(region_id, None)
            return ok

    def is_pinned(self, region_id: int) -> bool:
        with self._cond:
            return self._pins.get(region_id, 0) > 0

    def acquire(
        self, region_ids: np.ndarray, offsets: np.ndarray, nbytes: np.ndarray
    ) -> tuple[np.ndarray, list[int], dict[int, tuple[int, int, memoryview]]]:
        """Validate rows against live regions and pin those used by valid rows.

        Returns ``(bad, pinned, regions)``: a bool mask of rows that name an unknown
        region or fall outside it, the pinned region ids (pass to ``unpin``), and
        ``{region_id: (addr, nbytes, view)}`` for the pinned ones.
        """
        bad = (offsets < 0) | (nbytes <= 0)
        pinned: list[int] = []
        regions: dict[int, tuple[int, int, memoryview]] = {}
        ends = offsets + nbytes
        ids = region_ids_of(region_ids)
        with self._cond:
            for rid in ids:
                rows = region_ids == rid if len(ids) > 1 else True  # one region (the common case): every row
                entry = self._live.get(rid)
                if entry is None:
                    bad |= rows
                    continue
                bad |= rows & (ends > entry[1])
                if (rows & ~bad).any():
                    self._pins[rid] += 1
                    pinned.append(rid)
                    regions[rid] = entry
        return bad, pinned, regions

    def unpin(self, region_ids: list[int]) -> None:
        if not region_ids:
            return
        with self._cond:
            for rid in region_ids:
                self._pins[rid] -= 1
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._live)
