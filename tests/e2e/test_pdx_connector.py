"""pdx 1P1D (PdxConnector, layer-wise push) on vLLM's CPU build equals a single engine.

For each transport: greedy token ids and logprobs of the pair equal the single
engine's for prompts of 10 to 2000 tokens; D's /metrics show every prompt token
came from the transfer and none was computed locally; a transfer whose KV is
damaged on purpose (``debug_corrupt_prefix``) changes the output, which proves
the comparison catches bad KV. Afterwards both engines hold no KV blocks.

The same pair (P with a short lease, D with a short receive timeout and a small
KV cache) then runs the failure contract, in ``test_pdx_failures.py``'s cases,
on ``tcp`` only: they are collected here so one engine pair serves both.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.e2e import pdx_failure_cases as cases
from tests.e2e.harness import PROMPTS, Output, assert_outputs_match
from tests.e2e.pdx_helpers import (
    CORRUPT_PREFIX,
    DECODE_BLOCKS,
    LEASE_S,
    RECV_TIMEOUT_S,
    pdx_kv_configs,
    run_pdx,
    wait_blocks_free,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

@pytest.fixture(scope="module", params=["tcp", "nixl"])
def pdx_pair(request, pd_pair_factory):
    from pdx.transports import available_transports

    from pdx.harness.process import free_port

    transport = request.param
    if transport == "nixl" and importlib.util.find_spec("nixl") is None:
        pytest.skip("nixl is not installed")
    if transport not in available_transports():
        pytest.skip(f"transport {transport} is not available here")
    port = free_port()
    policy = "recompute" if transport == "tcp" else "fail"  # each policy on one pair
    prefill_config, decode_config = pdx_kv_configs(port, transport, policy, lease_s=LEASE_S,
                                                   recv_timeout_s=RECV_TIMEOUT_S)
    pair = pd_pair_factory(prefill_config, decode_config, name=f"pdx-{transport}",
                           decode_overrides={"extra_args": ("--num-gpu-blocks-override", str(DECODE_BLOCKS))})
    pair.extras["control_port"] = port
    pair.extras["transport"] = transport
    pair.extras["policy"] = policy
    yield pair
    pair.stop()


def test_pdx_1p1d_equals_single_engine_and_decoder_recomputes_nothing(pdx_pair, single_reference):
    before = pdx_pair.decode.scrape_metrics()
    answers = run_pdx(pdx_pair, PROMPTS)
    after = pdx_pair.decode.scrape_metrics()

    assert_outputs_match(single_reference, [Output.from_response(a) for a in answers])

    def delta(source: str) -> float:
        name = "prompt_tokens_by_source"
        return after.sum(name, source=source) - before.sum(name, source=source)

    # D loads every prompt token and recomputes none (the last one is re-run for its logits,
    # which vLLM still books as loaded).
    assert delta("external_kv_transfer") == sum(len(p) for p in PROMPTS)
    assert delta("local_compute") == 0
    for answer, prompt in zip(answers, PROMPTS, strict=True):
        stats = answer["kv_transfer_params"]["pdx_transfer_stats"]
        assert stats["ok"] and stats["num_tokens"] == len(prompt) and stats["nbytes"] > 0
    wait_blocks_free(pdx_pair)


def test_damaged_kv_changes_the_output(pdx_pair, single_reference):
    import secrets

    i = PROMPTS.index(max(PROMPTS, key=len))
    answer = run_pdx(pdx_pair, [PROMPTS[i]], [CORRUPT_PREFIX + secrets.token_hex(14)])[0]
    with pytest.raises(AssertionError):
        assert_outputs_match([single_reference[i]], [Output.from_response(answer)])
    wait_blocks_free(pdx_pair)


def test_unreachable_prefill_is_recomputed_or_fails_by_policy(pdx_pair, single_reference):
    cases.case_unreachable_prefill_is_recomputed_or_fails_by_policy(pdx_pair, single_reference)


# The failure contract, on the same pair and on tcp only (one engine pair less), after the
# tests above; killing P comes last.
def _tcp_only(pdx_pair) -> None:
    if pdx_pair.extras["transport"] != "tcp":
        pytest.skip("the failure contract runs on tcp only")


def test_client_named_peer_is_never_contacted(pdx_pair, single_reference):
    _tcp_only(pdx_pair)
    cases.case_client_named_peer_is_never_contacted(pdx_pair, single_reference)


def test_lease_frees_prefill_blocks_when_the_decoder_never_comes(pdx_pair):
    _tcp_only(pdx_pair)
    cases.case_lease_frees_prefill_blocks_when_the_decoder_never_comes(pdx_pair)


def test_decoder_abort_frees_both_sides(pdx_pair):
    _tcp_only(pdx_pair)
    cases.case_decoder_abort_frees_both_sides(pdx_pair)


def test_32_concurrent_long_prompts_with_a_small_decoder_cache_all_finish(pdx_pair):
    _tcp_only(pdx_pair)
    cases.case_32_concurrent_long_prompts_with_a_small_decoder_cache_all_finish(pdx_pair)


def test_killed_prefill_decoder_recomputes_and_answers(pdx_pair, single_reference):
    _tcp_only(pdx_pair)
    cases.case_killed_prefill_decoder_recomputes_and_answers(pdx_pair, single_reference)
