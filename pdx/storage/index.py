"""The L1 chunk index: chunk key -> slot in the arena, with LRU eviction.

Entry life cycle::

    reserve ──> FILLING ──commit──> READY ──evict/clear──> freed
                   └──abort──> freed        (readers > 0: freed at the last release)

A READY entry is evictable only when no reader holds it (``acquire``/``release``)
and no operator pinned it (``pin``/``unpin``). FILLING entries are invisible to
lookups and never evicted. Pure bookkeeping, no I/O; the server calls it from its
event loop only.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Sequence

from pdx.storage.allocator import SlabAllocator


class EntryState(enum.Enum):
    FILLING = "filling"  # reserved; a writer is copying bytes in
    READY = "ready"  # committed; readable


class ReserveStatus(enum.Enum):
    RESERVED = "reserved"
    EXISTS = "exists"  # already stored (READY): nothing to write
    BUSY = "busy"  # another writer is filling it
    NO_SPACE = "no_space"  # everything evictable is pinned or being read
    TOO_LARGE = "too_large"  # larger than a slab


class Entry:
    __slots__ = (
        "key", "offset", "nbytes", "checksum", "state", "num_readers",
        "is_pinned", "is_removed", "last_used", "is_from_l2", "num_reads",
    )  # fmt: skip

    def __init__(self, key: bytes, offset: int, nbytes: int):
        self.key = key
        self.offset = offset  # into the arena
        self.nbytes = nbytes  # payload bytes (the slot may be larger)
        self.checksum = 0  # xxh3_64 of the payload, set at commit
        self.state = EntryState.FILLING
        self.num_readers = 0
        self.is_pinned = False  # operator pin
        self.is_removed = False  # dropped from the index, slot freed at last release
        self.last_used = 0
        self.is_from_l2 = False  # promoted from L2: no write-through needed
        self.num_reads = 0  # acquires by engines (write-through reads not counted)

    @property
    def is_evictable(self) -> bool:
        return self.state is EntryState.READY and self.num_readers == 0 and not self.is_pinned


class ChunkIndex:
    def __init__(self, allocator: SlabAllocator):
        self.allocator = allocator
        self._entries: dict[bytes, Entry] = {}  # FILLING and READY
        self._lru: OrderedDict[bytes, Entry] = OrderedDict()  # READY, least recently used first
        self._slab_entries: dict[int, set[Entry]] = {}  # every entry holding a slot
        self._tick = itertools.count(1)
        self.num_evictions = 0
        self.evicted_bytes = 0

    # -- reads ---------------------------------------------------------------------------
    def get_ready(self, key: bytes) -> Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.state is EntryState.READY else None

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys that are READY."""
        n = 0
        for key in keys:
            entry = self.get_ready(key)
            if entry is None:
                break
            self._touch(entry)
            n += 1
        return n

    def acquire(self, key: bytes, *, touch: bool = True) -> Entry | None:
        """Take a read lease on a READY entry (it cannot be evicted until ``release``)."""
        entry = self.get_ready(key)
        if entry is None:
            return None
        entry.num_readers += 1
        if touch:
            entry.num_reads += 1
            self._touch(entry)
        return entry

    def release(self, entry: Entry) -> None:
        assert entry.num_readers > 0, "release without acquire"
        entry.num_readers -= 1
        if entry.num_readers == 0 and entry.is_removed:
            self._free_slot(entry)

    # -- writes --------------------------------------------------------------------------
    def reserve(self, key: bytes, nbytes: int) -> tuple[ReserveStatus, Entry | None]:
        """Allocate a slot for a new chunk, evicting LRU chunks if needed."""
        existing = self._entries.get(key)
        if existing is not None:
            if existing.state is EntryState.READY:
                return ReserveStatus.EXISTS, None
            return ReserveStatus.BUSY, None
        if not self.allocator.can_fit(nbytes):
            return ReserveStatus.TOO_LARGE, None
        offset = self._allocate(nbytes)
        if offset is None:
            return ReserveStatus.NO_SPACE, None
        entry = Entry(key, offset, nbytes)
        self._entries[key] = entry
        self._slab_entries.setdefault(self.allocator.slab_of(offset), set()).add(entry)
        return ReserveStatus.RESERVED, entry

    def commit(self, entry: Entry, checksum: int) -> bool:
        """Publish a FILLING entry. False if it was removed meanwhile (clear, lease expiry)."""
        if entry.state is not EntryState.FILLING or entry.is_removed:
            return False
        entry.checksum = checksum
        entry.state = EntryState.READY
        self._lru[entry.key] = entry
        self._touch(entry)
        return True

    def abort(self, entry: Entry) -> None:
        """Give back a FILLING entry's slot (the writer failed or gave up)."""
        if entry.state is EntryState.FILLING and not entry.is_removed:
            self._entries.pop(entry.key, None)
            entry.is_removed = True
            self._free_slot(entry)

    # -- operator controls ---------------------------------------------------------------
    def pin(self, key: bytes) -> bool:
        entry = self.get_ready(key)
        if entry is None:
            return False
        entry.is_pinned = True
        return True

    def unpin(self, key: bytes) -> bool:
        entry = self.get_ready(key)
        if entry is None or not entry.is_pinned:
            return False
        entry.is_pinned = False
        return True

    def clear(self) -> int:
        """Drop every READY chunk (slots held by readers are freed at their release)."""
        entries = list(self._lru.values())
        for entry in entries:
            self._remove(entry)
        return len(entries)

    # -- introspection -------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return len(self._lru)

    @property
    def num_pinned(self) -> int:
        return sum(1 for e in self._lru.values() if e.is_pinned)

    @property
    def stored_bytes(self) -> int:
        return sum(e.nbytes for e in self._lru.values())

    def keys_lru_order(self) -> list[bytes]:
        return list(self._lru)

    # -- internals -----------------------------------------------------------------------
    def _touch(self, entry: Entry) -> None:
        entry.last_used = next(self._tick)
        if entry.key in self._lru:
            self._lru.move_to_end(entry.key)

    def _remove(self, entry: Entry) -> None:
        self._entries.pop(entry.key, None)
        self._lru.pop(entry.key, None)
        entry.is_removed = True
        if entry.num_readers == 0:
            self._free_slot(entry)

    def _free_slot(self, entry: Entry) -> None:
        slab = self.allocator.slab_of(entry.offset)
        members = self._slab_entries.get(slab)
        if members is not None:
            members.discard(entry)
            if not members:
                del self._slab_entries[slab]
        self.allocator.free(entry.offset)

    def _evict(self, entry: Entry) -> None:
        self.num_evictions += 1
        self.evicted_bytes += entry.nbytes
        self._remove(entry)

    def _allocate(self, nbytes: int) -> int | None:
        offset = self.allocator.allocate(nbytes)
        if offset is not None:
            return offset
        size = self.allocator.slot_size(nbytes)
        # 1. the least recently used evictable chunk of the same size class
        for entry in self._lru.values():
            if entry.is_evictable and self.allocator.slot_size(entry.nbytes) == size:
                self._evict(entry)
                return self.allocator.allocate(nbytes)
        # 2. empty the whole slab of another class whose newest chunk is oldest
        best_slab, best_age = None, None
        for slab, members in self._slab_entries.items():
            if all(e.is_evictable and not e.is_removed for e in members):
                age = max(e.last_used for e in members)
                if best_age is None or age < best_age:
                    best_slab, best_age = slab, age
        if best_slab is None:
            return None
        for entry in list(self._slab_entries[best_slab]):
            self._evict(entry)
        return self.allocator.allocate(nbytes)
