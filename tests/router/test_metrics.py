"""The router's /metrics (prometheus_client, one registry per app) and its reading of engines' /metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdx.config.topology import Engine
from pdx.engines.metrics import parse_prometheus_text
from pdx.router.health import read_engine_figures
from pdx.router.metrics import RouterMetrics, create_registry, render
from pdx.router.state import EngineState


def vllm_metrics_text() -> str:
    """/metrics of a vLLM NixlConnector engine, made the way vLLM makes it (prometheus_client), with
    an exemplar on a histogram bucket as exporters that record them write it."""
    reg = CollectorRegistry()
    labels = ["engine", "model_name"]
    Gauge("vllm:num_requests_running", "Running.", labels, registry=reg).labels("0", "tiny").set(2)
    Gauge("vllm:num_requests_waiting", "Waiting.", labels, registry=reg).labels("0", "tiny").set(3)
    Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent.", labels, registry=reg).labels(
        "0", "tiny").set(0.25)  # fmt: skip
    by_source = Counter("vllm:prompt_tokens_by_source", "Prompt tokens by source.", [*labels, "source"], registry=reg)
    by_source.labels("0", "tiny", "local_compute").inc(16)
    by_source.labels("0", "tiny", "external_kv_transfer").inc(112)
    Counter("vllm:nixl_num_failed_transfers", "Failed NIXL transfers, notifications included.", labels,
            registry=reg).labels("0", "tiny").inc(2)  # fmt: skip
    Counter("vllm:nixl_num_failed_notifications", "Failed NIXL notifications.", labels, registry=reg).labels(
        "0", "tiny").inc(1)  # fmt: skip
    latency = Histogram("vllm:e2e_request_latency_seconds", "E2E latency.", labels, buckets=(0.5, 1.0), registry=reg)
    latency.labels("0", "tiny").observe(0.7, exemplar={"trace_id": "abc123"})
    text = generate_latest(reg).decode()
    bucket = 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="tiny"} 1.0'
    assert bucket in text
    return text.replace(bucket, bucket + ' # {trace_id="abc123"} 0.7 1.7654321e+09')


def engine_state(engine_id: str = "d0", role: str = "decode") -> EngineState:
    engine = Engine(id=engine_id, url="http://127.0.0.1:1", role=role, connector="nixl")
    return EngineState(engine, None, failure_threshold=3, cooldown_s=1.0, client_auth=True)  # type: ignore[arg-type]


def families(registry: CollectorRegistry) -> dict:
    body, content_type = render(registry)
    assert content_type.startswith(b"text/plain")
    return {fam.name: fam for fam in text_string_to_metric_families(body.decode())}


def test_vllm_created_samples_and_exemplars_are_not_read_as_figures():
    text = vllm_metrics_text()
    assert "vllm:nixl_num_failed_transfers_created" in text  # a Unix timestamp, ~1.8e9
    samples = parse_prometheus_text(text)
    assert samples.sum("nixl_num_failed_transfers") == 2
    assert samples.sum("e2e_request_latency_seconds_bucket", le="1.0") == 1  # the exemplar is not the value
    assert all("trace_id" not in dict(s.labels) for s in samples.samples)
    state = engine_state()
    read_engine_figures(state, samples)
    assert state.kv_failed_transfers == 2  # not the _created timestamp, and notifications not counted twice
    assert state.prompt_tokens_by_source == {"local_compute": 16, "external_kv_transfer": 112}
    assert (state.num_running, state.num_waiting, state.kv_usage) == (2, 3, 0.25)


def test_engine_without_the_counter_exports_no_failed_transfers_series():
    state = engine_state()
    read_engine_figures(state, parse_prometheus_text('vllm:num_requests_running{model_name="tiny"} 1.0\n'))
    fams = families(create_registry(RouterMetrics(), lambda: [state]))
    assert fams["pdx_router_engine_requests_running"].samples[0].value == 1
    assert fams["pdx_router_engine_kv_failed_transfers"].samples == []


def test_every_metric_has_help_and_one_base_unit():
    m = RouterMetrics()
    m.requests[("/v1/completions", 200)] += 1
    m.ttft.observe(0.02)
    m.record_kv_stats({"ok": False, "nbytes": 4096, "transfer_ms": 1.5, "t_done": 1.7e9, "transfer_id": "ab"})
    state = engine_state()
    read_engine_figures(state, parse_prometheus_text(vllm_metrics_text()))
    body, _ = render(create_registry(m, lambda: [state]))
    text = body.decode()
    fams = families(create_registry(m, lambda: [state]))
    for name, fam in fams.items():
        assert f"# HELP {name}" in text and fam.documentation, name
        assert name.startswith("pdx_router_")
    assert fams["pdx_router_kv_transfer_bytes"].samples[0].value == 4096
    assert fams["pdx_router_kv_transfer_busy_seconds"].samples[0].value == pytest.approx(0.0015)
    assert fams["pdx_router_kv_transfer_failures"].samples[0].value == 1
    assert "1.7e9" not in text and "1700000000" not in text  # a wall-clock figure is never summed
    assert fams["pdx_router_engine_kv_usage_ratio"].samples[0].value == 0.25
    for fam in fams.values():  # engine series all carry the same labels
        for s in fam.samples:
            if fam.name.startswith("pdx_router_engine_"):
                assert {"engine", "role"} <= set(s.labels), s


def test_no_engine_series_until_the_engine_answered_and_registries_are_per_app():
    silent, scraped = engine_state("d0"), engine_state("p0", "prefill")
    read_engine_figures(scraped, parse_prometheus_text(vllm_metrics_text()))
    m1, m2 = RouterMetrics(), RouterMetrics()
    m1.retries = 3
    fams = families(create_registry(m1, lambda: [silent, scraped]))
    for name in ("pdx_router_engine_requests_running", "pdx_router_engine_kv_usage_ratio",
                 "pdx_router_engine_prompt_tokens", "pdx_router_engine_kv_failed_transfers"):  # fmt: skip
        assert {s.labels["engine"] for s in fams[name].samples} == {"p0"}, name
    assert {s.labels["engine"] for s in fams["pdx_router_engine_healthy"].samples} == {"d0", "p0"}
    assert fams["pdx_router_retries"].samples[0].value == 3
    assert families(create_registry(m2, lambda: []))["pdx_router_retries"].samples[0].value == 0
