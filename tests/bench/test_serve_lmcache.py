"""``LMCacheFleet``: LMCache's MP server behind real vLLM CPU engines, the topology kept as given.

The end-to-end test needs ``.venv-lmcache`` (``scripts/setup-lmcache.sh``) and skips
without it; it holds the machine-wide engine lock while its engine runs.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pdx.bench.serve_lmcache import (
    CONNECTOR_MODULE,
    VENV_ENV,
    LMCacheFleet,
    lmcache_engine_spec,
    lmcache_site_packages,
    lmcache_venv,
)
from pdx.engines.metrics import parse_prometheus_text
from pdx.errors import ConfigError
from pdx.harness.process import free_port

ROOT = Path(__file__).parents[2]
PROMPT = [(i * 7) % 500 + 10 for i in range(1000)]  # token ids: 3 full 256-token chunks + 232


def _topology(tmp_path: Path, router_port: int, engine_port: int) -> Path:
    """One role-both engine without vLLM's own prefix cache (hits can only come from LMCache)."""
    path = tmp_path / "lmcache.yaml"
    path.write_text(f"""
model: {{name: tiny, path: "builtin:tiny", max_model_len: 2048, dtype: float32}}
engines:
  - id: e0
    url: http://127.0.0.1:{engine_port}
    role: both
    kind: vllm
    connector: pdx
    kv_port: {free_port()}
    local: {{cpu: 0, kv_cache_gib: 1, extra_args: ["--no-enable-prefix-caching"]}}
router:
  host: 127.0.0.1
  port: {router_port}
  policies: {{disaggregate_min_tokens: 1000000, decode: round_robin}}
storage:
  capacity_gb: 1
  connector: {{store: {{chunk_size: 256}}}}
""")
    return path


def test_engine_spec_keeps_the_topology_and_swaps_only_the_connector() -> None:
    from pdx.config import load_topology
    from pdx.launch import engine_spec, with_fleet_secret

    topo = with_fleet_secret(load_topology(str(ROOT / "configs" / "local-2x-store.yaml")))  # as LMCacheFleet
    engine = topo.engines[1]
    spec = engine_spec(topo, engine, "/models/tiny")
    out = lmcache_engine_spec(spec, 6555, Path("/v/lib/python3.11/site-packages"))
    for field in ("model", "port", "host", "cpu_bind", "kv_cache_gib", "max_model_len", "dtype",
                  "max_num_seqs", "extra_args", "served_model_name", "enable_prefix_caching"):  # fmt: skip
        assert getattr(out, field) == getattr(spec, field), field
    kv = out.kv_transfer_config
    assert (
        kv["kv_connector"] == "LMCacheMPConnector"
        and kv["kv_connector_module_path"] == CONNECTOR_MODULE
    )
    assert kv["kv_role"] == "kv_both"
    assert kv["kv_connector_extra_config"] == {
        "lmcache.mp.host": "tcp://127.0.0.1",
        "lmcache.mp.port": 6555,
    }
    assert dict(out.extra_env)["PYTHONPATH"].split(":")[0] == "/v/lib/python3.11/site-packages"


def test_a_missing_venv_is_a_clear_error_and_starts_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(VENV_ENV, str(tmp_path / "nowhere"))
    fleet = LMCacheFleet(_topology(tmp_path, free_port(), free_port()), tmp_path / "logs")
    with pytest.raises(ConfigError, match="setup-lmcache.sh"):
        fleet.start()
    assert fleet.store_url is None and fleet.engines == []


def _lmcache_installed() -> bool:
    try:
        lmcache_site_packages(lmcache_venv())
    except ConfigError:
        return False
    return True


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(3600)  # includes waiting for the engine lock
@pytest.mark.skipif(not _lmcache_installed(), reason="no .venv-lmcache (scripts/setup-lmcache.sh)")
def test_a_repeated_prompt_prefix_is_served_by_lmcache(tmp_path) -> None:
    from pdx.harness.lock import engine_lock

    topo = _topology(tmp_path, free_port(), free_port())
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with engine_lock(), LMCacheFleet(topo, tmp_path / "logs") as fleet:
        assert fleet.store_url is not None
        texts = []
        with httpx.Client(base_url=fleet.url, timeout=120) as client:
            for _ in range(2):
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["text"])
        engine = parse_prometheus_text(
            httpx.get(fleet.engine_urls[0] + "/metrics", timeout=10).text
        )
        server = httpx.get(fleet.store_url + "/metrics", timeout=10).text
    assert texts[0] == texts[1]  # the loaded KV gives the same greedy answer
    # The second request's three full chunks came from LMCache, none from vLLM's (disabled) cache.
    assert engine.sum("prompt_tokens_by_source", source="external_kv_transfer") == 768
    assert engine.sum("prompt_tokens_by_source", source="local_cache_hit") == 0
    assert "lmcache_mp_l1_memory_usage_bytes" in server
    assert fleet.store_url is None and fleet.engines == []  # stopped
