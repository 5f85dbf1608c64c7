"""Capacity pressure on a real store: LRU order, operator pins and in-flight reads survive."""

from __future__ import annotations

import numpy as np

from pdx.storage.channel import StoreChannel
from pdx.storage.client import StoreClient
from pdx.storage.messages import Acquire, Release
from tests.storage.helpers import CHUNK, make_chunk, make_keys

CAPACITY_GB = 0.0042  # four 1 MiB slabs: 16 chunks of 256 KiB


def load_all(client: StoreClient, keys: list[bytes]) -> list[bool]:
    """Per key: loaded with intact bytes."""
    out = []
    for key in keys:
        dst = np.zeros(CHUNK, np.uint8)
        out.append(client.load([key], [dst]) == 1 and np.array_equal(dst, make_chunk(key)))
    return out


def test_lru_eviction_keeps_recent_and_pinned_chunks(store_factory, client_factory):
    store = store_factory(capacity_gb=CAPACITY_GB, slab_mb=1)
    client = client_factory(store.socket)
    old = make_keys(16, "old")
    assert client.save(old, [make_chunk(k) for k in old]).result(10) == 16
    assert store.post("/pin", {"keys": [old[0].hex()]}) == {"num_chunks": 1}
    assert load_all(client, old[8:12]) == [True] * 4  # recently used
    new = make_keys(8, "new")
    assert client.save(new, [make_chunk(k) for k in new]).result(10) == 8

    survivors = load_all(client, old)
    assert survivors[0]  # pinned
    assert survivors[8:12] == [True] * 4  # recently read
    assert survivors.count(True) == 8  # 16 slots - 8 new
    assert load_all(client, new) == [True] * 8
    stats = store.stats()
    assert stats["evictions"] == 8 and stats["num_pinned"] == 1 and stats["num_chunks"] == 16


def test_chunk_under_a_read_lease_is_never_evicted_or_overwritten(store_factory, client_factory):
    store = store_factory(capacity_gb=CAPACITY_GB, slab_mb=1)
    writer = client_factory(store.socket)
    keys = make_keys(16, "held")
    assert writer.save(keys, [make_chunk(k) for k in keys]).result(10) == 16

    reader = StoreChannel(store.socket, 5.0, 1.0, _attach)
    reply = reader.call(Acquire(keys=[keys[0].hex()]))  # a reader mid-copy
    offset, nbytes, _ = reply.chunks[0]
    churn = make_keys(48, "churn")
    for i in range(0, 48, 8):
        writer.save(churn[i : i + 8], [make_chunk(k) for k in churn[i : i + 8]]).result(10)
    arena = reader.arena.array
    assert np.array_equal(arena[offset : offset + nbytes], make_chunk(keys[0]))
    reader.call(Release(lease=reply.lease))
    assert store.stats()["num_leases"] == 0
    reader.close()
    reader.arena.close()
    assert load_all(writer, keys[:1]) == [True]  # still stored: it was in use the whole time


def test_store_full_of_pinned_chunks_rejects_saves(store_factory, client_factory):
    store = store_factory(capacity_gb=CAPACITY_GB, slab_mb=1)
    client = client_factory(store.socket)
    keys = make_keys(16, "pin")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 16
    store.post("/pin", {"keys": [k.hex() for k in keys]})
    extra = make_keys(2, "extra")
    assert client.save(extra, [make_chunk(k) for k in extra]).result(10) == 0
    assert store.stats()["reserve_no_space"] == 2
    assert client.stats().num_save_dropped == 2
    store.post("/unpin", {"keys": [k.hex() for k in keys]})
    assert client.save(extra, [make_chunk(k) for k in extra]).result(10) == 2


def _attach(name: str, nbytes: int):
    from pdx.storage.arena import SharedArena

    return SharedArena.attach(name, nbytes)


def test_concurrent_writers_and_readers_under_eviction_never_see_wrong_bytes(store_factory):
    import json
    import subprocess
    import sys
    from pathlib import Path

    store = store_factory(capacity_gb=CAPACITY_GB, slab_mb=1)  # 16 slots for 40 keys
    worker = str(Path(__file__).with_name("client_worker.py"))
    procs = [
        subprocess.Popen(
            [sys.executable, worker, mode, store.socket, "stress", "40", "150"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for mode in ("churn", "churn", "read-loop", "read-loop")
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    writers, readers = results[:2], results[2:]
    assert all(r["ops"] == 150 for r in results)
    assert sum(w["chunks"] for w in writers) > 16  # enough saves to force evictions
    assert sum(r["chunks"] for r in readers) > 0  # reads did hit
    assert all(r["bad"] == 0 and r["corrupt"] == 0 for r in readers)
    stats = store.stats()
    assert stats["evictions"] > 0 and stats["num_leases"] == 0
