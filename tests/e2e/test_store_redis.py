"""Two nodes share prefixes through one Redis: the store tier across nodes, end to end.

Node A and node B each run their own ``pdx store`` (own socket, own L1 arena) with the
same real ``redis-server`` as L2; nothing else connects them. Engine A (``kv_both``
PdxConnector on store A) serves the prompts; store A writes their full chunks
through to Redis. Engine A and store A stop. Engine B, fresh, on store B whose L1 is
empty, serves the same prompts: greedy ids and logprobs equal a single engine's, B's
/metrics book every stored whole chunk as external KV on the first request, and store
B counts each chunk promoted from L2 and served once. Then a value damaged in Redis is
never served: B loads the chunks before it, recomputes the rest with the same outputs,
and its own write-through replaces the damaged value.
"""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.harness import (
    PROMPTS,
    WARMUP_PROMPT,
    Output,
    assert_outputs_match,
    completion_body,
    make_prompts,
    run_completions,
)
from tests.e2e.store_helpers import (
    CHUNK,
    TokenSources,
    serve,
    store_engine,
    stored_tokens,
    wait_blocks_free,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.redis]

# A lookup that reaches L2 waits at most this long for Redis (presence check), a load for the
# promotions into L1. 0 would never consult L2; the connector's default 0.5 s is enough on
# an idle box, this leaves room for a loaded one.
L2_BUDGET_S = 2.0
REDIS_PREFIX = b"pdx:chunk:"  # the store's default key prefix in Redis
NUM_CHUNKS = sum(stored_tokens(p) // CHUNK for p in PROMPTS)

# The damaged value must be one whose place in a prompt is known: BASE is saved first (its
# one chunk), then DAMAGED_PROMPT, whose first chunk is BASE's and whose second is new.
BASE = make_prompts((300,), seed=31)[0]
DAMAGED_PROMPT = BASE[:CHUNK] + make_prompts((344,), seed=32)[0]  # 600 tokens, 2 chunks


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory, engine_lock):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("redis")
    from tests.storage.helpers import RedisProc

    server = RedisProc(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node_stores(tmp_path_factory, redis_proc):
    """Store A and store B: separate sockets and arenas, one Redis as their L2."""
    from tests.storage.helpers import StoreProc

    stores = [
        StoreProc(
            tmp_path_factory.mktemp(f"node-{n}"), capacity_gb=0.2, slab_mb=4.0, l2=redis_proc.url
        )
        for n in ("a", "b")
    ]
    yield stores
    for store in stores:
        if store.proc.poll() is None:
            store.stop()


def _redis_names(client) -> set[bytes]:
    return set(client.scan_iter(match=REDIS_PREFIX + b"*"))


def _wait_l2_writes(store, num: int) -> dict:
    stats = store.wait_stat("l2_writes", num, timeout=30.0)
    assert stats["l2_writes"] == num and stats["l2_queue_depth"] == 0, stats
    assert stats["l2_errors"] == 0 and stats["l2_write_dropped"] == 0, stats
    return stats


def _assert_valid_value(client, name: bytes) -> None:
    """The Redis value under ``name`` is a whole pdx chunk whose checks pass."""
    from pdx.storage.l2.base import decode_value

    key = bytes.fromhex(name[len(REDIS_PREFIX) :].decode())
    decode_value(key, client.get(name))  # raises ChunkCorrupt otherwise


def _serve_on_node_a(
    store_a, redis_client, tiny_model, log_dir, single_reference
) -> tuple[Output, bytes]:
    """Engine A serves PROMPTS, BASE, DAMAGED_PROMPT; returns DAMAGED_PROMPT's output and the
    Redis name of its second chunk."""
    with store_engine(tiny_model, "redis-a", store_a.socket, log_dir, l2_budget_s=L2_BUDGET_S) as a:
        run_completions(a.url, [completion_body(WARMUP_PROMPT)])
        assert_outputs_match(single_reference, serve(a, PROMPTS))
        wait_blocks_free(a)
        _wait_l2_writes(store_a, NUM_CHUNKS)
        names = _redis_names(redis_client)
        assert len(names) == NUM_CHUNKS
        for name in names:
            _assert_valid_value(redis_client, name)

        serve(a, [BASE])
        wait_blocks_free(a)
        _wait_l2_writes(store_a, NUM_CHUNKS + 1)
        before = _redis_names(redis_client)
        (reference,) = serve(a, [DAMAGED_PROMPT])
        wait_blocks_free(a)
        _wait_l2_writes(store_a, NUM_CHUNKS + 2)
        (second,) = _redis_names(redis_client) - before
    return reference, second


def _delta(before: dict, after: dict, name: str) -> int:
    return after[name] - before[name]


def test_engine_on_another_node_loads_prefixes_through_redis(
    node_stores, redis_proc, single_reference, tiny_model, engine_log_dir
):
    store_a, store_b = node_stores
    rds = redis_proc.client()
    damaged_reference, damaged_name = _serve_on_node_a(
        store_a, rds, tiny_model, engine_log_dir, single_reference
    )
    assert store_a.stop() == 0  # node A is gone: Redis is all B can load from
    assert store_b.stats()["num_chunks"] == 0

    with store_engine(
        tiny_model, "redis-b", store_b.socket, engine_log_dir, l2_budget_s=L2_BUDGET_S
    ) as b:
        run_completions(b.url, [completion_body(WARMUP_PROMPT)])
        sources = TokenSources(b)
        stats0 = store_b.stats()
        got = serve(b, PROMPTS)
        sources.update()
        assert_outputs_match(single_reference, got)

        # The first request of each prompt loads every stored chunk (promoted from Redis).
        loaded = sum(stored_tokens(p) for p in PROMPTS)
        assert sources["external_kv_transfer"] == loaded
        assert sources["local_compute"] == sum(len(p) for p in PROMPTS) - loaded
        wait_blocks_free(b)
        stats1 = store_b.stats()
        assert _delta(stats0, stats1, "l2_promotions") == NUM_CHUNKS, stats1
        assert _delta(stats0, stats1, "hits_l2") == NUM_CHUNKS, stats1
        assert stats1["hits_l1"] == 0 and stats1["misses"] == 0, stats1
        assert stats1["l2_errors"] == 0 and stats1["l2_corrupt"] == 0, stats1
        assert stats1["l2_writes"] == 0, stats1  # nothing B loaded is written back

        # A damaged value in Redis: B loads DAMAGED_PROMPT's first chunk, never the second.
        value = rds.get(damaged_name)
        rds.set(damaged_name, value[:-64] + bytes(x ^ 0xFF for x in value[-64:]))
        (got,) = serve(b, [DAMAGED_PROMPT])
        assert_outputs_match([damaged_reference], [got])
        wait_blocks_free(b)
        stats2 = store_b.stats()
        assert _delta(stats1, stats2, "l2_corrupt") == 1, stats2
        assert _delta(stats1, stats2, "hits_l2") == 1, stats2
        assert _delta(stats1, stats2, "misses") == 1, stats2
        # B recomputed the second chunk and saved it: its write-through replaces the value.
        _wait_l2_writes(store_b, 1)
        _assert_valid_value(rds, damaged_name)
        assert b.is_alive()
