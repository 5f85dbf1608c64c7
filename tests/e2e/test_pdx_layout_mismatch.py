"""Two real vLLM CPU engines whose KV layouts differ refuse to pair, at once and by name.

P runs ``--dtype float32``, D ``--dtype bfloat16`` (same model, block size and heads).
D's ``register`` carries its layout and fingerprint; P refuses it with an error naming
both layouts. D's request does not wait for its receive timeout: it recomputes the
prompt (``kv_load_failure_policy: recompute``, counted in D's ``/metrics`` as local
compute, nothing from the transfer) and answers. P frees its blocks without waiting for
its lease (both are far longer than the test allows), and both logs name the mismatch.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.harness import MAX_TOKENS, PROMPTS
from tests.e2e.pdx_helpers import pdx_kv_configs, run_pdx, wait_blocks_free

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LONG_S = 300.0  # lease and receive timeout: the refusal must beat both by far


@pytest.fixture(scope="module")
def mismatched_pair(pd_pair_factory):
    from pdx.harness.process import free_port

    port = free_port()
    prefill_config, decode_config = pdx_kv_configs(port, "tcp", "recompute", lease_s=LONG_S,
                                                   recv_timeout_s=LONG_S)
    pair = pd_pair_factory(prefill_config, decode_config, name="pdx-layouts",
                           decode_overrides={"dtype": "bfloat16"}, env={"PDX_LOG_LEVEL": "INFO"})
    pair.extras["control_port"] = port
    yield pair
    pair.stop()


def test_a_float32_prefill_refuses_a_bfloat16_decoder_which_recomputes_without_hanging(mismatched_pair):
    pair = mismatched_pair
    prompts = [PROMPTS[1], PROMPTS[2]]  # 100 and 257 tokens
    before = pair.decode.scrape_metrics()
    t0 = time.monotonic()
    answers = run_pdx(pair, prompts)
    elapsed = time.monotonic() - t0
    assert elapsed < LONG_S / 5, f"the pair took {elapsed:.0f}s: it waited for a timeout"
    assert all(len(a["choices"][0]["token_ids"]) == MAX_TOKENS for a in answers)

    after = pair.decode.scrape_metrics()
    name = "prompt_tokens_by_source"
    for source, want in (("local_compute", sum(len(p) for p in prompts)), ("external_kv_transfer", 0)):
        assert after.sum(name, source=source) - before.sum(name, source=source) == want, source

    wait_blocks_free(pair, timeout_s=30)  # P freed its blocks on the refusal, not at its lease
    p_log, d_log = pair.prefill.log_path.read_text(), pair.decode.log_path.read_text()
    for log in (p_log, d_log):
        assert "KV layout mismatch: decoder vllm_cpu" in log
        assert "bfloat16" in log and "prefill vllm_cpu" in log and "float32" in log
    assert d_log.count("prefill refused the transfer: KV layout mismatch") >= len(prompts)
