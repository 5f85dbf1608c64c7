"""Shared pieces of the end-to-end tests: prompts, request body, output comparison, pairs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

PROMPT_LENGTHS = (10, 100, 257, 700, 1000, 2000)
PROMPT_SEED = 20261123
MAX_TOKENS = 16
LOGPROB_TOL = 1e-5
ENGINE_SETTINGS: dict[str, Any] = {
    "max_model_len": 4096,
    "kv_cache_gib": 1,
    "max_num_seqs": 8,
}


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = PROMPT_SEED) -> list[list[int]]:
    """Seeded random token-id prompts (ids 3.. avoid the special tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, 4096, size=n).tolist() for n in lengths]


PROMPTS = make_prompts()
WARMUP_PROMPT = make_prompts((64,), seed=7)[0]


def completion_body(prompt: list[int], max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """A greedy /v1/completions request that returns token ids and logprobs."""
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "logprobs": 1,
        "ignore_eos": True,  # full-length outputs: more tokens to compare
        "return_token_ids": True,
    }


@dataclass(frozen=True)
class Output:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token

    @classmethod
    def from_response(cls, response: dict[str, Any]) -> Output:
        choice = response["choices"][0]
        return cls(list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"]))


def assert_outputs_match(expected: list[Output], got: list[Output], tol: float = LOGPROB_TOL):
    """Same token ids and logprobs within ``tol``, prompt by prompt."""
    assert len(expected) == len(got)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        n = len(PROMPTS[i]) if i < len(PROMPTS) else "?"
        assert have.token_ids == want.token_ids, f"prompt {i} ({n} tokens): token ids differ"
        worst = max(abs(a - b) for a, b in zip(want.logprobs, have.logprobs, strict=True))
        assert worst <= tol, f"prompt {i} ({n} tokens): logprobs differ by {worst:.3g} > {tol}"


def run_completions(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POST each body in order to ``url``/v1/completions; the JSON answers."""
    import httpx

    from pdx.harness.pd_client import post_json

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            return [await post_json(client, url + "/v1/completions", b) for b in bodies]

    return asyncio.run(run())


@dataclass
class PDPair:
    """A prefill engine and a decode engine, started together."""

    prefill: Any  # VllmEngine
    decode: Any  # VllmEngine
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the pdx control port

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()

    def is_alive(self) -> bool:
        return self.prefill.is_alive() and self.decode.is_alive()


def nixl_kv_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """Stock vLLM NixlConnector configs for (P, D) on CPU memory."""
    base = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
    return {**base, "kv_role": "kv_producer"}, {**base, "kv_role": "kv_consumer"}
