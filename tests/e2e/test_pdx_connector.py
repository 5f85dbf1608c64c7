"""pdx 1P1D (PdxConnector, layer-wise push) on vLLM's CPU build equals a single engine.

For each transport: greedy token ids and logprobs of the pair equal the single
engine's for prompts of 10 to 2000 tokens; D's /metrics show every prompt token
came from the transfer and none was computed locally; a transfer whose KV is
damaged on purpose (``debug_corrupt_prefix``) changes the output, which proves
the comparison catches bad KV. Afterwards both engines hold no KV blocks.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from typing import Any

import pytest

from tests.e2e.harness import PROMPTS, Output, assert_outputs_match, completion_body

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CORRUPT_PREFIX = "bad0"
TOKEN = "e2e-token"


def pdx_kv_configs(control_port: int, transport: str, **extra: Any) -> tuple[dict, dict]:
    base = {"kv_connector": "PdxConnector", "kv_connector_module_path": "pdx.engines.vllm"}
    common = {"transport": transport, "auth_token": TOKEN, **extra}
    prefill = {**base, "kv_role": "kv_producer",
               "kv_connector_extra_config": {**common, "control_port": control_port}}
    decode = {**base, "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {**common, "debug_corrupt_prefix": CORRUPT_PREFIX}}
    return prefill, decode


@pytest.fixture(scope="module", params=["tcp", "nixl"])
def pdx_pair(request, pd_pair_factory):
    from pdx.engines.process import free_port
    from transports import available_transports

    transport = request.param
    if transport == "nixl" and importlib.util.find_spec("nixl") is None:
        pytest.skip("nixl is not installed")
    if transport not in available_transports():
        pytest.skip(f"transport {transport} is not available here")
    port = free_port()
    prefill_config, decode_config = pdx_kv_configs(port, transport)
    pair = pd_pair_factory(prefill_config, decode_config, name=f"pdx-{transport}")
    pair.extras["control_port"] = port
    yield pair
    pair.stop()


def run_pdx(pair, prompts, transfer_ids=None) -> list[dict]:
    import httpx

    from pdx.engines.pd_client import pdx_completion, pdx_legs, post_json

    async def one(client, prompt, tid):
        if tid is None:
            return await pdx_completion(client, pair.prefill.url, pair.decode.url,
                                        pair.extras["control_port"], completion_body(prompt))
        p_body, d_body = pdx_legs(completion_body(prompt), "127.0.0.1", pair.extras["control_port"], tid)
        _, answer = await asyncio.gather(post_json(client, pair.prefill.url + "/v1/completions", p_body),
                                         post_json(client, pair.decode.url + "/v1/completions", d_body))
        return answer

    async def run():
        async with httpx.AsyncClient() as client:
            tids = transfer_ids or [None] * len(prompts)
            return [await one(client, p, t) for p, t in zip(prompts, tids, strict=True)]

    return asyncio.run(run())


def kv_usage(engine) -> float:
    return engine.scrape_metrics().sum("vllm:kv_cache_usage_perc")


def wait_blocks_free(pair, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if kv_usage(pair.prefill) == 0 and kv_usage(pair.decode) == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"KV blocks still held: P {kv_usage(pair.prefill)}, D {kv_usage(pair.decode)}")


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
