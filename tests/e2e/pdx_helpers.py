"""Helpers shared by the PdxConnector end-to-end tests: configs, requests, leak checks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.e2e.harness import completion_body

CORRUPT_PREFIX = "bad0"
LEASE_S = 10.0
RECV_TIMEOUT_S = 20.0
DECODE_BLOCKS = 48  # x 128 tokens: about five 1000-token requests at a time
TOKEN = "e2e-token"
KV_SECRET = "e2e-fleet-secret-0123456789abcdef"  # what the router would sign the legs with


def pdx_kv_configs(control_port: int, transport: str, policy: str = "recompute",
                   **extra: Any) -> tuple[dict, dict]:
    base = {"kv_connector": "PdxConnector", "kv_connector_module_path": "pdx.engines.vllm"}
    common = {"transport": transport, "auth_token": TOKEN, "kv_secret": KV_SECRET, **extra}
    prefill = {
        **base,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {**common, "control_port": control_port},
    }
    decode = {
        **base,
        "kv_role": "kv_consumer",
        "kv_load_failure_policy": policy,
        "kv_connector_extra_config": {**common, "debug_corrupt_prefix": CORRUPT_PREFIX},
    }
    return prefill, decode


def run_pdx(pair, prompts, transfer_ids=None) -> list[dict]:
    import httpx

    from pdx.harness.pd_client import pdx_completion, pdx_legs, post_json

    async def one(client, prompt, tid):
        if tid is None:
            return await pdx_completion(
                client,
                pair.prefill.url,
                pair.decode.url,
                pair.extras["control_port"],
                completion_body(prompt),
                kv_secret=KV_SECRET,
            )
        p_body, d_body = pdx_legs(
            completion_body(prompt), "127.0.0.1", pair.extras["control_port"], tid, kv_secret=KV_SECRET
        )
        _, answer = await asyncio.gather(
            post_json(client, pair.prefill.url + "/v1/completions", p_body),
            post_json(client, pair.decode.url + "/v1/completions", d_body),
        )
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
    raise AssertionError(
        f"KV blocks still held: P {kv_usage(pair.prefill)}, D {kv_usage(pair.decode)}"
    )
