"""L1 bookkeeping: LRU eviction, pins and read leases protect chunks, slabs move between sizes."""

from __future__ import annotations

import pytest

from pdx.storage.allocator import SlabAllocator
from pdx.storage.index import ChunkIndex, EntryState, ReserveStatus

SLOT = 4096


def put(index: ChunkIndex, key: bytes, nbytes: int = SLOT) -> int:
    status, entry = index.reserve(key, nbytes)
    assert status is ReserveStatus.RESERVED and entry is not None
    assert index.commit(entry, checksum=1)
    return entry.offset


def make_index(num_slots: int = 4, slab_slots: int = 2) -> ChunkIndex:
    return ChunkIndex(SlabAllocator(num_slots * SLOT, slab_slots * SLOT))


def test_lru_evicts_least_recently_used_first():
    index = make_index(num_slots=4)
    for k in b"abcd":
        put(index, bytes([k]))
    assert index.lookup_prefix([b"a"]) == 1  # a is now most recent
    put(index, b"e")  # evicts b
    assert index.get_ready(b"b") is None
    assert [index.get_ready(k) is not None for k in (b"a", b"c", b"d", b"e")] == [True] * 4
    put(index, b"f")  # evicts c
    assert index.get_ready(b"c") is None
    assert index.num_evictions == 2


def test_pinned_and_read_chunks_are_never_evicted():
    index = make_index(num_slots=4)
    for k in b"abcd":
        put(index, bytes([k]))
    assert index.pin(b"a")
    reader = index.acquire(b"b")
    assert reader is not None
    put(index, b"e")
    put(index, b"f")  # c and d go; a (pinned) and b (being read) stay
    assert index.get_ready(b"a") is not None and index.get_ready(b"b") is not None
    assert index.get_ready(b"c") is None and index.get_ready(b"d") is None
    index.acquire(b"e"), index.acquire(b"f")
    status, _ = index.reserve(b"g", SLOT)
    assert status is ReserveStatus.NO_SPACE  # nothing evictable is left
    assert index.unpin(b"a")
    status, _ = index.reserve(b"g", SLOT)
    assert status is ReserveStatus.RESERVED  # a was evicted once unpinned


def test_filling_chunks_are_invisible_and_not_evictable():
    index = make_index(num_slots=2, slab_slots=2)
    status, filling = index.reserve(b"a", SLOT)
    assert status is ReserveStatus.RESERVED and filling is not None
    assert index.lookup_prefix([b"a"]) == 0 and index.acquire(b"a") is None
    assert index.reserve(b"a", SLOT)[0] is ReserveStatus.BUSY
    put(index, b"b")
    assert index.reserve(b"c", SLOT)[0] is ReserveStatus.RESERVED  # evicts b, not the filling a
    assert filling.state is EntryState.FILLING and index.get_ready(b"b") is None
    index.abort(filling)
    assert index.allocator.used_bytes == SLOT


def test_clear_frees_slots_of_read_chunks_only_at_release():
    index = make_index(num_slots=2, slab_slots=2)
    put(index, b"a")
    put(index, b"b")
    reader = index.acquire(b"a")
    assert reader is not None
    assert index.clear() == 2
    assert index.lookup_prefix([b"a"]) == 0
    assert index.allocator.used_bytes == SLOT  # a's slot is still being read
    index.release(reader)
    assert index.allocator.used_bytes == 0


def test_commit_after_clear_is_refused_and_slot_freed():
    index = make_index()
    _, entry = index.reserve(b"a", SLOT)
    assert entry is not None
    index.clear()  # does not touch FILLING entries
    assert index.commit(entry, 7)
    assert index.reserve(b"a", SLOT)[0] is ReserveStatus.EXISTS


def test_slab_moves_to_another_size_class():
    index = make_index(num_slots=4, slab_slots=2)  # two slabs of 2 slots
    for k in b"abcd":
        put(index, bytes([k]))
    offset = put(index, b"big", 2 * SLOT)  # needs a whole slab: the older slab (a, b) is emptied
    assert offset == 0 or offset == 2 * SLOT
    assert index.get_ready(b"a") is None and index.get_ready(b"b") is None
    assert index.get_ready(b"c") is not None and index.get_ready(b"d") is not None


def test_chunk_larger_than_a_slab_is_rejected():
    index = make_index()
    assert index.reserve(b"huge", 3 * SLOT)[0] is ReserveStatus.TOO_LARGE


def test_allocator_rejects_capacity_below_one_slab():
    with pytest.raises(ValueError, match="at least one slab"):
        SlabAllocator(SLOT, 2 * SLOT)
