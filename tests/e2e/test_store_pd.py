"""The storage tier beside PD: a prefill engine saves to the store, later loads from it, and
pushes the loaded KV to its decoder with the rest.

One ``pdx store``, a 1P1D pdx pair on ``tcp`` whose P also has the store setting; both
engines' own prefix caches are off (so a second pass can only reuse through the store, and
D can only get the KV from P). First pass: P
computes every prompt and pushes it to D; outputs equal a single engine's; P's full chunks
reach the store. Second pass, same prompts: P loads the stored chunks instead of computing
them (P's /metrics), D still receives every prompt token from P and computes none, and the
outputs are unchanged. Both engines end holding no KV blocks.
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import PROMPTS, Output, assert_outputs_match
from tests.e2e.pdx_helpers import pdx_kv_configs, run_pdx, wait_blocks_free
from tests.e2e.store_helpers import CHUNK, TokenSources, stored_tokens

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def store_proc(tmp_path_factory, engine_lock):
    from tests.storage.helpers import StoreProc

    proc = StoreProc(tmp_path_factory.mktemp("pd-store"), capacity_gb=0.2, slab_mb=4.0)
    yield proc
    if proc.proc.poll() is None:
        assert proc.stop() == 0


def test_prefill_engine_saves_then_loads_through_the_store_and_its_decoder_gets_everything(
    store_proc, pd_pair_factory, single_reference
):
    from pdx.harness.process import free_port

    port = free_port()
    prefill_config, decode_config = pdx_kv_configs(port, "tcp")
    prefill_config = {
        **prefill_config,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            **prefill_config["kv_connector_extra_config"],
            "store": {"socket": store_proc.socket, "timeout_s": 1.0, "l2_budget_s": 0.0, "chunk_size": CHUNK},
        },
    }
    no_prefix_cache = {"extra_args": ("--no-enable-prefix-caching",)}  # reuse only through the store
    pair = pd_pair_factory(prefill_config, decode_config, name="pd-store",
                           prefill_overrides=no_prefix_cache, decode_overrides=no_prefix_cache)  # fmt: skip
    pair.extras["control_port"] = port
    try:
        # First pass: P computes and pushes; its full chunks are saved to the store.
        first = [Output.from_response(a) for a in run_pdx(pair, PROMPTS)]
        assert_outputs_match(single_reference, first)
        wait_blocks_free(pair)
        want = sum(stored_tokens(p) // CHUNK for p in PROMPTS)
        assert store_proc.wait_stat("num_chunks", want)["num_chunks"] >= want

        # Second pass: P loads the stored chunks, D receives every prompt token from P.
        p_sources, d_sources = TokenSources(pair.prefill), TokenSources(pair.decode)
        second = [Output.from_response(a) for a in run_pdx(pair, PROMPTS)]
        assert_outputs_match(single_reference, second)
        p_sources.update()
        d_sources.update()
        loaded = sum(stored_tokens(p) for p in PROMPTS)
        assert loaded > 0
        assert p_sources["external_kv_transfer"] == loaded
        assert p_sources["local_compute"] == sum(len(p) for p in PROMPTS) - loaded
        assert d_sources["external_kv_transfer"] == sum(len(p) for p in PROMPTS)
        assert d_sources["local_compute"] == 0
        wait_blocks_free(pair)
    finally:
        pair.stop()
