"""Slab allocator over the arena: fixed-size slabs, each carved into equal slots of one
size class (memcached-style).

A model's chunks all have the same size, so one class usually owns every slab and
there is no fragmentation. A slab whose slots are all free goes back to the pool
and can be taken by another class. The allocator only does arithmetic; eviction
decisions belong to ``ChunkIndex``.
"""

from __future__ import annotations

ALIGN = 4096  # slot sizes are rounded up to whole pages


class SlabAllocator:
    """Hands out slot offsets in ``[0, capacity)``.

    ``allocate(nbytes)`` returns an offset or None (no free slot of that class and no
    free slab); ``free(offset)`` returns a slot. Not thread-safe: the store server
    calls it from its event loop only.
    """

    def __init__(self, capacity: int, slab_bytes: int):
        if slab_bytes <= 0 or capacity < slab_bytes:
            raise ValueError(
                f"capacity ({capacity} bytes) must hold at least one slab ({slab_bytes} bytes)"
            )
        self.slab_bytes = slab_bytes
        self.num_slabs = capacity // slab_bytes
        self.capacity = self.num_slabs * slab_bytes
        self._free_slabs: list[int] = list(range(self.num_slabs - 1, -1, -1))
        self._slab_class: dict[int, int] = {}  # slab id -> slot size
        self._slab_num_used: dict[int, int] = {}  # slab id -> slots in use
        self._class_free: dict[int, dict[int, list[int]]] = {}  # slot size -> slab -> free offsets
        self.used_bytes = 0  # slot bytes handed out

    @staticmethod
    def slot_size(nbytes: int) -> int:
        return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)

    def can_fit(self, nbytes: int) -> bool:
        return 0 < nbytes and self.slot_size(nbytes) <= self.slab_bytes

    def slab_of(self, offset: int) -> int:
        return offset // self.slab_bytes

    def allocate(self, nbytes: int) -> int | None:
        if not self.can_fit(nbytes):
            return None
        size = self.slot_size(nbytes)
        by_slab = self._class_free.setdefault(size, {})
        if not by_slab:
            if not self._free_slabs:
                return None
            slab = self._free_slabs.pop()
            base = slab * self.slab_bytes
            num_slots = self.slab_bytes // size
            self._slab_class[slab] = size
            self._slab_num_used[slab] = 0
            by_slab[slab] = [base + i * size for i in range(num_slots - 1, -1, -1)]
        slab, offsets = next(iter(by_slab.items()))
        offset = offsets.pop()
        if not offsets:
            del by_slab[slab]
        self._slab_num_used[slab] += 1
        self.used_bytes += size
        return offset

    def free(self, offset: int) -> None:
        slab = self.slab_of(offset)
        size = self._slab_class[slab]
        self._slab_num_used[slab] -= 1
        self.used_bytes -= size
        by_slab = self._class_free[size]
        if self._slab_num_used[slab] == 0:  # whole slab free: back to the pool
            by_slab.pop(slab, None)
            del self._slab_class[slab], self._slab_num_used[slab]
            self._free_slabs.append(slab)
            return
        by_slab.setdefault(slab, []).append(offset)

    def num_free_slots(self, nbytes: int) -> int:
        """Slots of this size class available without eviction."""
        size = self.slot_size(nbytes)
        per_slab = self.slab_bytes // size
        in_class = sum(len(v) for v in self._class_free.get(size, {}).values())
        return in_class + per_slab * len(self._free_slabs)
