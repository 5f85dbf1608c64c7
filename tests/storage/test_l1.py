"""L1 through real processes: a chunk written by one engine process is read by another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.storage.helpers import CHUNK, make_chunk, make_keys

WORKER = str(Path(__file__).with_name("client_worker.py"))


def run_worker(mode: str, socket_path: str, tag: str, n: int) -> dict:
    out = subprocess.run([sys.executable, WORKER, mode, socket_path, tag, str(n)],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_chunks_round_trip_between_two_client_processes(store):
    assert run_worker("save", store.socket, "rt", 8) == {"num_saved": 8}
    assert run_worker("load", store.socket, "rt", 8) == {
        "num_loaded": 8,
        "intact": True,
        "lookup": 8,
    }
    stats = store.stats()
    assert stats["num_chunks"] == 8 and stats["hits_l1"] == 8 and stats["num_leases"] == 0


def test_lookup_and_load_stop_at_the_first_missing_chunk(store, client_factory):
    client = client_factory(store.socket)
    keys = make_keys(6, "gap")
    stored = keys[:2] + keys[3:]  # key 2 missing
    assert client.save(stored, [make_chunk(k) for k in stored]).result(10) == 5
    assert client.lookup_prefix(keys) == 2
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    assert client.load(keys, dsts) == 2
    assert np.array_equal(dsts[1], make_chunk(keys[1])) and not dsts[2].any()


def test_saving_a_stored_key_again_is_skipped(store, client_factory):
    client = client_factory(store.socket)
    keys = make_keys(3, "dup")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 3
    assert client.save(keys, [np.zeros(CHUNK, np.uint8)] * 3).result(10) == 0
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    assert client.load(keys, dsts) == 3
    assert all(np.array_equal(d, make_chunk(k)) for d, k in zip(dsts, keys, strict=False))


def test_size_mismatch_is_a_miss_not_a_partial_copy(store, client_factory):
    client = client_factory(store.socket)
    keys = make_keys(2, "size")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 2
    dsts = [np.zeros(CHUNK, np.uint8), np.zeros(CHUNK // 2, np.uint8)]
    assert client.load(keys, dsts) == 1
    assert not dsts[1].any()


def test_bad_buffers_raise_clear_errors(store, client_factory):
    client = client_factory(store.socket)
    keys = make_keys(2, "bad")
    with pytest.raises(ValueError, match="2 keys but 1"):
        client.load(keys, [np.zeros(CHUNK, np.uint8)])
    with pytest.raises(ValueError, match="read-only"):
        client.load(keys[:1], [bytes(CHUNK)])
    with pytest.raises(ValueError, match="contiguous"):
        client.save(keys[:1], [np.zeros((CHUNK, 2), np.uint8)[:, 0]])


def test_typed_arrays_and_torch_tensors_round_trip(store, client_factory):
    client = client_factory(store.socket)
    keys = make_keys(2, "typed")
    halves = np.random.default_rng(0).standard_normal((2, 64, 512)).astype(np.float16)
    assert client.save(keys, list(halves)).result(10) == 2
    out = np.zeros_like(halves)
    assert client.load(keys, list(out)) == 2
    assert np.array_equal(out, halves)
    torch = pytest.importorskip("torch")
    t_keys = make_keys(1, "torch")
    src = torch.randn(4, 256, 64).to(torch.bfloat16)
    assert client.save(t_keys, [src]).result(10) == 1
    dst = torch.zeros_like(src)
    assert client.load(t_keys, [dst]) == 1
    assert torch.equal(dst, src)


def test_zero_copy_views_round_trip_and_abort(store, client_factory):
    client = client_factory(store.socket)
    keys = make_keys(3, "views")
    with client.write_views(keys[:2], [CHUNK, CHUNK]) as views:
        assert all(v is not None and v.nbytes == CHUNK for v in views)
        for view, key in zip(views, keys, strict=False):
            view[:] = make_chunk(key)
    with pytest.raises(RuntimeError, match="gather failed"):
        with client.write_views(keys[2:], [CHUNK]) as views:
            raise RuntimeError("gather failed")
    assert client.lookup_prefix(keys) == 2  # the aborted chunk was not stored
    assert store.stats()["used_bytes"] == 2 * CHUNK  # and its slot is free again
    with client.write_views(keys[:1], [CHUNK]) as views:
        assert views == [None]  # already stored: nothing to write

    with client.read_views(keys) as views:
        assert len(views) == 2
        assert all(np.array_equal(v, make_chunk(k)) for v, k in zip(views, keys, strict=False))
        assert not views[0].flags.writeable
        assert store.stats()["num_leases"] == 1
    assert _leases_end(store)  # release is sent without waiting for a reply


def _leases_end(store) -> bool:
    import time

    deadline = time.monotonic() + 10
    while store.stats()["num_leases"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return store.stats()["num_leases"] == 0
