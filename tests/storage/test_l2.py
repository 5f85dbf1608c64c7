"""L2 tiers (local disk, real redis-server): write-through, promotion after an L1 miss,
and no corrupted chunk ever served."""

from __future__ import annotations

import numpy as np
import pytest

from pdx.storage.l2.base import HEADER
from tests.storage.helpers import CHUNK, make_chunk, make_keys


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.redis)])
def l2_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path / 'l2'}"
    return request.getfixturevalue("redis_server").url


def save_and_write_through(store, client, keys):
    target = store.stats()["l2_writes"] + len(keys)
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == len(keys)
    assert store.wait_stat("l2_writes", target)["l2_writes"] == target


def load(client, keys) -> tuple[int, list[np.ndarray]]:
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    return client.load(keys, dsts), dsts


def test_l1_clear_then_load_promotes_from_l2(l2_url, store_factory, client_factory):
    store = store_factory(l2=l2_url)
    client = client_factory(store.socket)
    keys = make_keys(6, "promo")
    save_and_write_through(store, client, keys)
    assert store.post("/clear", {}) == {"num_chunks": 6}
    assert store.post("/lookup", {"keys": [k.hex() for k in keys]}) == {
        "num_chunks": 6,
        "num_l1": 0,
    }
    num, dsts = load(client, keys)
    assert num == 6
    assert all(np.array_equal(d, make_chunk(k)) for d, k in zip(dsts, keys, strict=False))
    stats = store.stats()
    assert stats["l2_promotions"] == 6 and stats["num_chunks"] == 6 and stats["l2_corrupt"] == 0
    assert stats["hits_l2"] == 6 and stats["hits_l1"] == 0
    assert stats["l2_writes"] == 6  # promoted chunks are not written back


def test_second_store_reads_chunks_of_the_first_through_l2(l2_url, store_factory, client_factory):
    node_a, node_b = store_factory(l2=l2_url), store_factory(l2=l2_url)
    keys = make_keys(4, "share")
    save_and_write_through(node_a, client_factory(node_a.socket), keys)
    client_b = client_factory(node_b.socket)
    assert client_b.lookup_prefix(keys) == 4
    num, dsts = load(client_b, keys)
    assert num == 4 and all(
        np.array_equal(d, make_chunk(k)) for d, k in zip(dsts, keys, strict=False)
    )


def test_lookup_with_no_l2_budget_answers_from_l1_without_l2_errors(
    l2_url, store_factory, client_factory
):
    store = store_factory(l2=l2_url)
    keys = make_keys(3, "nobudget")
    save_and_write_through(store, client_factory(store.socket), keys)
    store.post("/clear", {})
    assert client_factory(store.socket, l2_budget_s=0.0).lookup_prefix(keys) == 0
    stats = store.stats()
    assert stats["l2_errors"] == 0 and stats["l2_promotions"] == 0, stats
    assert client_factory(store.socket, l2_budget_s=2.0).lookup_prefix(keys) == 3


def test_clear_with_l2_empties_both_tiers(l2_url, store_factory, client_factory):
    store = store_factory(l2=l2_url)
    client = client_factory(store.socket)
    keys = make_keys(3, "wipe")
    save_and_write_through(store, client, keys)
    store.post("/clear", {"l2": True})
    assert client.lookup_prefix(keys) == 0
    assert load(client, keys)[0] == 0


def corrupt_file(url: str, key: bytes, how: str) -> None:
    from pathlib import Path

    path = Path(url.removeprefix("file://")) / key.hex()[:2] / f"{key.hex()}.chunk"
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[HEADER.size + 1000] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:  # another key's value under this name
        other = sorted(path.parent.parent.glob("*/*.chunk"))
        data = bytearray(next(p for p in other if p != path).read_bytes())
    path.write_bytes(bytes(data))


def corrupt_redis(redis_server, key: bytes, how: str) -> None:
    r = redis_server.client()
    name = f"pdx:chunk:{key.hex()}"
    if how == "flip":
        byte = r.getrange(name, HEADER.size + 1000, HEADER.size + 1000)
        r.setrange(name, HEADER.size + 1000, bytes([byte[0] ^ 0xFF]))
    elif how == "truncate":
        r.set(name, r.get(name)[: CHUNK // 2])
    else:
        other = next(n for n in r.keys("pdx:chunk:*") if n.decode() != name)
        r.set(name, r.get(other))


@pytest.mark.parametrize("how", ["flip", "truncate", "wrong_key"])
def test_corrupted_l2_value_is_a_miss_never_served(
    how, l2_url, store_factory, client_factory, request
):
    store = store_factory(l2=l2_url)
    client = client_factory(store.socket)
    keys = make_keys(4, "corrupt")
    save_and_write_through(store, client, keys)
    if l2_url.startswith("file://"):
        corrupt_file(l2_url, keys[2], how)
    else:
        corrupt_redis(request.getfixturevalue("redis_server"), keys[2], how)
    store.post("/clear", {})
    num, dsts = load(client, keys)
    assert num == 2  # chunks 0 and 1; the corrupted third ends the run
    assert all(np.array_equal(d, make_chunk(k)) for d, k in zip(dsts[:2], keys, strict=False))
    assert not dsts[2].any()
    assert store.stats()["l2_corrupt"] == 1
    assert client.lookup_prefix(keys) == 2  # the bad value was deleted


@pytest.mark.redis
def test_redis_restart_never_serves_stale_or_corrupt_chunks(
    redis_server, store_factory, client_factory
):
    store = store_factory(l2=redis_server.url)
    client = client_factory(store.socket, l2_budget_s=2.0)
    keys = make_keys(4, "restart")
    save_and_write_through(store, client, keys)

    redis_server.stop()  # Redis gone: L1 still serves, L2 misses, nothing raises
    num, _ = load(client, keys)
    assert num == 4
    store.post("/clear", {})
    assert client.lookup_prefix(keys) == 0
    assert load(client, keys)[0] == 0
    more = make_keys(2, "while-down")
    assert client.save(more, [make_chunk(k) for k in more]).result(10) == 2  # L1 still takes saves
    stats = store.wait_stat("l2_errors", 1)
    assert stats["l2_errors"] >= 1

    redis_server.start()  # back, empty (no persistence): misses, then write-through resumes
    store.post("/clear", {})
    assert load(client, keys)[0] == 0
    save_and_write_through(store, client, keys)
    store.post("/clear", {})
    num, dsts = load(client, keys)
    assert num == 4 and all(
        np.array_equal(d, make_chunk(k)) for d, k in zip(dsts, keys, strict=False)
    )
    assert store.stats()["l2_corrupt"] == 0


def test_unknown_l2_scheme_is_a_clear_error():
    from pdx.errors import ConfigError
    from pdx.storage.l2 import create_l2

    with pytest.raises(ConfigError, match="unknown L2 URL scheme"):
        create_l2("s3://bucket/x")


@pytest.mark.redis
def test_slow_l2_never_blocks_saves_and_drops_are_counted(
    redis_server, store_factory, client_factory
):
    import os
    import signal

    store = store_factory(l2=redis_server.url, extra=["--l2-queue", "2", "--l2-workers", "1"])
    client = client_factory(store.socket)
    keys = make_keys(12, "slow-l2")
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # Redis hangs: write-through stalls
    try:
        for i in range(0, 12, 3):
            assert (
                client.save(keys[i : i + 3], [make_chunk(k) for k in keys[i : i + 3]]).result(10)
                == 3
            )
        stats = store.stats()
        assert stats["num_chunks"] == 12  # L1 took every chunk
        assert stats["l2_write_dropped"] >= 12 - 2 - 1  # queue of 2, one in flight
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    num, dsts = load(client, keys)
    assert num == 12 and all(
        np.array_equal(d, make_chunk(k)) for d, k in zip(dsts, keys, strict=True)
    )


def test_disk_l2_stays_under_max_gb_evicting_least_recently_used(tmp_path):
    from pdx.storage.checksum import checksum
    from pdx.storage.l2 import create_l2

    keys = make_keys(5, "disk-lru")
    value_bytes = CHUNK + 40  # payload + header
    l2 = create_l2(f"file://{tmp_path}/l2?max_gb={3.5 * value_bytes / 1e9}")
    for key in keys[:3]:
        l2.put(key, memoryview(make_chunk(key)), checksum(make_chunk(key)))
    assert l2.get(keys[0]) is not None  # keys[0] becomes most recent
    l2.put(keys[3], memoryview(make_chunk(keys[3])), checksum(make_chunk(keys[3])))
    assert [l2.get(k) is not None for k in keys[:4]] == [True, False, True, True]
    reopened = create_l2(
        f"file://{tmp_path}/l2?max_gb={2.5 * value_bytes / 1e9}"
    )  # counts files found
    assert sum(reopened.get(k) is not None for k in keys[:4]) == 2


@pytest.mark.redis
def test_redis_l2_ttl_expires_values(redis_server):
    from pdx.storage.checksum import checksum
    from pdx.storage.l2 import create_l2

    key = make_keys(1, "ttl")[0]
    l2 = create_l2(f"{redis_server.url}?ttl_s=100&prefix=t:")
    try:
        l2.put(key, memoryview(make_chunk(key)), checksum(make_chunk(key)))
        assert 0 < redis_server.client().ttl(f"t:{key.hex()}") <= 100
        value = l2.get(key)
        assert value is not None and bytes(value.payload) == make_chunk(key).tobytes()
    finally:
        l2.close()


def test_disk_errors_are_store_unavailable_and_an_operator_clear_gets_an_error_reply(tmp_path):
    """OS errors of the disk L2 surface as StoreUnavailable (mapped at the edge, cause kept);
    the store answers a clear that hits one with an error, never a dropped connection."""
    import asyncio
    import shutil

    from pdx.errors import StoreUnavailable
    from pdx.storage.checksum import checksum
    from pdx.storage.config import StoreConfig
    from pdx.storage.l2 import create_l2
    from pdx.storage.messages import Clear, ErrorReply
    from pdx.storage.server import StoreServer

    key = make_keys(1, "disk-err")[0]
    l2 = create_l2(f"file://{tmp_path}/l2")
    (tmp_path / "l2" / key.hex()[:2]).write_bytes(b"")  # a file where the key's directory goes
    with pytest.raises(StoreUnavailable, match="failed to write") as info:
        l2.put(key, memoryview(make_chunk(key)), checksum(make_chunk(key)))
    assert isinstance(info.value.__cause__, OSError)

    async def main() -> ErrorReply:
        server = StoreServer(StoreConfig(socket=str(tmp_path / "s.sock"), capacity_bytes=1 << 20,
                                         slab_bytes=1 << 20, http_port=-1, l2_url=f"file://{tmp_path}/gone"))  # fmt: skip
        await server.start()
        try:
            shutil.rmtree(tmp_path / "gone")
            return await server.dispatch(Clear(l2=True), None)  # type: ignore[return-value]
        finally:
            await server.aclose()

    reply = asyncio.run(main())
    assert isinstance(reply, ErrorReply) and "'clear' failed" in reply.error and "failed to clear" in reply.error
    assert reply.is_unavailable  # the HTTP API answers it 503: the store failed, not the request


def test_operator_clear_that_hits_a_failed_l2_is_a_503_naming_the_failure(tmp_path, store_factory):
    """An L2 failure is the store's fault, not the operator's input: 503 with the cause, the
    store keeps serving."""
    import json
    import shutil
    import urllib.error

    store = store_factory(l2=f"file://{tmp_path}/l2")
    shutil.rmtree(tmp_path / "l2")
    with pytest.raises(urllib.error.HTTPError) as info:
        store.post("/clear", {"l2": True})
    assert info.value.code == 503
    assert "failed to clear" in json.loads(info.value.read())["error"]
    assert store.get("/stats")["num_chunks"] == 0  # still serving
