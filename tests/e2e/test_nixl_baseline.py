"""Stock vLLM NixlConnector 1P1D on the CPU build equals a single engine (proves the e2e harness).

The decode engine's /metrics must show that every prompt token came from the
transfer (external_kv_transfer) and none was recomputed (local_compute).
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from tests.e2e.harness import (
    PROMPTS,
    Output,
    assert_outputs_match,
    completion_body,
    nixl_kv_configs,
)

pytestmark = [pytest.mark.vllm, pytest.mark.nixl, pytest.mark.slow]


@pytest.fixture(scope="module")
def nixl_pair(pd_pair_factory):
    if importlib.util.find_spec("nixl") is None:
        pytest.skip("nixl is not installed")
    prefill_config, decode_config = nixl_kv_configs()
    pair = pd_pair_factory(prefill_config, decode_config, name="nixl")
    yield pair
    pair.stop()


def _run_through_pair(pair, prompts):
    import httpx

    from pdx.harness.pd_client import nixl_completion

    async def run():
        async with httpx.AsyncClient() as client:
            return [
                await nixl_completion(client, pair.prefill.url, pair.decode.url, completion_body(p))
                for p in prompts
            ]

    return asyncio.run(run())


def test_nixl_1p1d_equals_single_engine_and_decoder_recomputes_nothing(nixl_pair, single_reference):
    before = nixl_pair.decode.scrape_metrics()
    answers = _run_through_pair(nixl_pair, PROMPTS)
    after = nixl_pair.decode.scrape_metrics()

    assert_outputs_match(single_reference, [Output.from_response(a) for a in answers])

    def delta(source: str) -> float:
        name = "prompt_tokens_by_source"
        return after.sum(name, source=source) - before.sum(name, source=source)

    assert delta("external_kv_transfer") == sum(len(p) for p in PROMPTS)
    assert delta("local_compute") == 0
    assert after.sum("nixl_num_failed_transfers") == 0
