"""PdxConnector with the shared storage tier: a prefix computed by one engine is reused by another.

One ``pdx store`` and two ``kv_both`` engines that share it, one after the other (two
cores fit one engine beside the store): engine A serves the prompts (saving their
full chunks), stops; engine B, fresh (empty prefix cache), serves the same prompts and
must load them from the store: greedy ids and logprobs equal a single engine's, and
B's /metrics book the stored chunks as external KV and only the rest as computed.
Then the store is killed and B keeps serving correct outputs (recomputing).
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import (
    PROMPTS,
    WARMUP_PROMPT,
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

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NEW_PROMPTS = make_prompts((300, 900), seed=99)  # served only after the store is gone


@pytest.fixture(scope="module")
def store_proc(tmp_path_factory, engine_lock):
    from tests.storage.helpers import StoreProc

    proc = StoreProc(tmp_path_factory.mktemp("store"), capacity_gb=0.2, slab_mb=4.0)
    yield proc
    if proc.proc.poll() is None:
        proc.stop()


def test_second_engine_loads_prefix_from_store_then_survives_store_loss(
    store_proc, single_reference, tiny_model, engine_log_dir
):
    # Engine A: store empty, computes everything and saves its full chunks.
    with store_engine(tiny_model, "store-a", store_proc.socket, engine_log_dir) as a:
        run_completions(a.url, [completion_body(WARMUP_PROMPT)])
        assert_outputs_match(single_reference, serve(a, PROMPTS))
        new_reference = serve(a, NEW_PROMPTS)
        wait_blocks_free(a)
    want_chunks = sum(stored_tokens(p) // CHUNK for p in PROMPTS)
    stats = store_proc.wait_stat("num_chunks", want_chunks)
    assert stats["num_chunks"] >= want_chunks, stats

    # Engine B: fresh, loads the stored prefixes instead of computing them.
    with store_engine(tiny_model, "store-b", store_proc.socket, engine_log_dir) as b:
        run_completions(b.url, [completion_body(WARMUP_PROMPT)])
        sources = TokenSources(b)
        got = serve(b, PROMPTS)
        sources.update()
        assert_outputs_match(single_reference, got)

        loaded = sum(stored_tokens(p) for p in PROMPTS)
        assert loaded > 0
        assert sources["external_kv_transfer"] == loaded
        assert sources["local_compute"] == sum(len(p) for p in PROMPTS) - loaded

        wait_blocks_free(b)  # blocks held for saves were released

        # The store dies: B keeps serving, recomputing what it cannot load.
        store_proc.kill()
        assert_outputs_match(new_reference, serve(b, NEW_PROMPTS))
        assert b.is_alive()
