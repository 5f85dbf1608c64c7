"""PdxConnector with the shared storage tier: a prefix computed by one engine is reused by another.

One ``pdx store`` and two ``kv_both`` engines that share it, one after the other (two
cores fit one engine beside the store): engine A serves the prompts (saving their
full chunks), stops; engine B, fresh (empty prefix cache), serves the same prompts and
must load them from the store: greedy ids and logprobs equal a single engine's, and
B's /metrics book the stored chunks as external KV and only the rest as computed.
Then the store is killed and B keeps serving correct outputs (recomputing).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.e2e.harness import (
    ENGINE_SETTINGS,
    PROMPTS,
    WARMUP_PROMPT,
    Output,
    assert_outputs_match,
    completion_body,
    make_prompts,
    run_completions,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHUNK = 256
NEW_PROMPTS = make_prompts((300, 900), seed=99)  # served only after the store is gone


def _store_kv_config(socket: str) -> dict:
    return {
        "kv_connector": "PdxConnector",
        "kv_connector_module_path": "pdx.engines.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "auth_token": "e2e-token",
            "store": {"socket": socket, "timeout_s": 1.0, "l2_budget_s": 0.0, "chunk_size": CHUNK},
        },
    }


def _engine(model: Path, name: str, socket: str, log_dir: Path):
    from pdx.engines.process import EngineSpec, VllmEngine, free_port

    spec = EngineSpec(model=str(model), port=free_port(), cpu_bind="0", name=name, **ENGINE_SETTINGS)
    spec = replace(spec, kv_transfer_config=_store_kv_config(socket))
    return VllmEngine(spec, log_path=log_dir / f"{name}.log")


def _serve(engine, prompts) -> list[Output]:
    return [Output.from_response(a) for a in run_completions(engine.url, [completion_body(p) for p in prompts])]


def _stored_tokens(prompt: list[int]) -> int:
    return (len(prompt) - 1) // CHUNK * CHUNK  # whole chunks, never the last prompt token


def _wait_blocks_free(engine, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while engine.scrape_metrics().sum("vllm:kv_cache_usage_perc") > 0:
        assert time.monotonic() < deadline, "KV blocks still held after every request finished"
        time.sleep(0.5)


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
    with _engine(tiny_model, "store-a", store_proc.socket, engine_log_dir) as a:
        run_completions(a.url, [completion_body(WARMUP_PROMPT)])
        assert_outputs_match(single_reference, _serve(a, PROMPTS))
        new_reference = _serve(a, NEW_PROMPTS)
        _wait_blocks_free(a)
    want_chunks = sum(_stored_tokens(p) // CHUNK for p in PROMPTS)
    stats = store_proc.wait_stat("num_chunks", want_chunks)
    assert stats["num_chunks"] >= want_chunks, stats

    # Engine B: fresh, loads the stored prefixes instead of computing them.
    with _engine(tiny_model, "store-b", store_proc.socket, engine_log_dir) as b:
        run_completions(b.url, [completion_body(WARMUP_PROMPT)])
        before = b.scrape_metrics()
        got = _serve(b, PROMPTS)
        after = b.scrape_metrics()
        assert_outputs_match(single_reference, got)

        def delta(source: str) -> float:
            name = "prompt_tokens_by_source"
            return after.sum(name, source=source) - before.sum(name, source=source)

        loaded = sum(_stored_tokens(p) for p in PROMPTS)
        assert loaded > 0
        assert delta("external_kv_transfer") == loaded
        assert delta("local_compute") == sum(len(p) for p in PROMPTS) - loaded

        _wait_blocks_free(b)  # blocks held for saves were released

        # The store dies: B keeps serving, recomputing what it cannot load.
        store_proc.kill()
        assert_outputs_match(new_reference, _serve(b, NEW_PROMPTS))
        assert b.is_alive()
