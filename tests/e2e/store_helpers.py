"""Shared pieces of the storage-tier end-to-end tests: a store-connector engine and what it booked."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.e2e.harness import ENGINE_SETTINGS, Output, completion_body, run_completions

CHUNK = 256  # tokens per stored chunk


def store_kv_config(socket: str, *, l2_budget_s: float = 0.0) -> dict[str, Any]:
    """A ``kv_both`` PdxConnector config on the store at ``socket`` (recompute on load failure)."""
    return {
        "kv_connector": "PdxConnector",
        "kv_connector_module_path": "pdx.engines.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "auth_token": "e2e-token",
            "kv_secret": "e2e-fleet-secret-0123456789abcdef",
            "store": {
                "socket": socket,
                "timeout_s": 1.0,
                "l2_budget_s": l2_budget_s,
                "chunk_size": CHUNK,
            },
        },
    }


def store_engine(model: Path, name: str, socket: str, log_dir: Path, *, l2_budget_s: float = 0.0):
    """A VllmEngine on core 0 with the store connector (a context manager: starts, stops)."""
    from pdx.harness.process import EngineSpec, VllmEngine, free_port

    spec = EngineSpec(
        model=str(model), port=free_port(), cpu_bind="0", name=name, **ENGINE_SETTINGS
    )
    spec = replace(spec, kv_transfer_config=store_kv_config(socket, l2_budget_s=l2_budget_s))
    return VllmEngine(spec, log_path=log_dir / f"{name}.log")


def serve(engine, prompts: list[list[int]]) -> list[Output]:
    """Greedy outputs of ``prompts``, one request after the other."""
    return [
        Output.from_response(a)
        for a in run_completions(engine.url, [completion_body(p) for p in prompts])
    ]


def stored_tokens(prompt: list[int]) -> int:
    """Prompt tokens a store holds after serving ``prompt``: whole chunks, never the last token."""
    return (len(prompt) - 1) // CHUNK * CHUNK


def wait_blocks_free(engine, timeout_s: float = 30.0) -> None:
    """Wait until the engine holds no KV blocks (saves copied, holds released)."""
    deadline = time.monotonic() + timeout_s
    while engine.scrape_metrics().sum("vllm:kv_cache_usage_perc") > 0:
        assert time.monotonic() < deadline, "KV blocks still held after every request finished"
        time.sleep(0.5)


class TokenSources:
    """``vllm:prompt_tokens_by_source`` deltas of one engine between two scrapes."""

    def __init__(self, engine):
        self._engine = engine
        self._before = engine.scrape_metrics()
        self._after = self._before

    def update(self) -> TokenSources:
        self._after = self._engine.scrape_metrics()
        return self

    def __getitem__(self, source: str) -> float:
        name = "prompt_tokens_by_source"
        return self._after.sum(name, source=source) - self._before.sum(name, source=source)
