"""The router in front of fake engines over loopback: all three PD protocols end to end."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest
from harness import start_fleet

from pdx.connector import protocol as pdx_keys
from pdx.engines.metrics import MetricSamples, parse_prometheus_text
from pdx.testing.fake_engine import FakeEngine

PROTOCOLS = ["pdx", "nixl", "sglang"]
C = httpx.Client(timeout=10)  # one client: a new one per call costs an SSL context


def fakes_for(protocol: str, num_prefill: int = 1, num_decode: int = 1, **kw) -> list[FakeEngine]:
    kind = "sglang" if protocol == "sglang" else "vllm"
    connector = "nixl" if protocol == "nixl" else "pdx"
    return [FakeEngine(f"p{i}", role="prefill", kind=kind, connector=connector, **kw) for i in range(num_prefill)] + [
        FakeEngine(f"d{i}", role="decode", kind=kind, connector=connector, **kw) for i in range(num_decode)
    ]


def scrape(url: str) -> MetricSamples:
    r = C.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_prometheus_text(r.text)


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_completion_goes_through_both_legs(harness, protocol):
    p, d = fakes_for(protocol)
    url, _ = start_fleet(harness, [p, d])
    r = C.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5},
                   headers={"x-request-id": "req-42", "authorization": "Bearer client"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "hello" and r.json()["id"] == "cmpl-d0"  # D's answer
    assert r.headers["x-request-id"] == "req-42"
    (pr,), (dr,) = p.requests, d.requests
    for leg in (pr, dr):  # request id and the client's token reach both legs
        assert leg.headers["x-request-id"] == "req-42" and leg.headers["authorization"] == "Bearer client"
    if protocol == "pdx":
        pp, dp = pdx_keys.parse(pr.body["kv_transfer_params"]), pdx_keys.parse(dr.body["kv_transfer_params"])
        assert pp.transfer_id == dp.transfer_id and pp.role == "prefill" and str(dp.peer) == "127.0.0.1:5700"
        assert pr.body["max_tokens"] == 1 and dr.body["max_tokens"] == 5
        assert abs(pr.t - dr.t) < 1.0  # concurrent: the fakes' rendezvous needs both at once
    elif protocol == "nixl":
        assert pr.body["kv_transfer_params"]["do_remote_decode"] is True and pr.body["max_tokens"] == 1
        assert dr.body["kv_transfer_params"]["remote_block_ids"] == [[1, 2]]  # P's params, verbatim
        assert pr.t <= dr.t
    else:
        assert pr.body == dr.body and pr.body["bootstrap_port"] == 8998
        assert pr.body["bootstrap_host"] == "127.0.0.1" and isinstance(pr.body["bootstrap_room"], int)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_streaming_is_relayed_chunk_for_chunk(harness, protocol):
    p, d = fakes_for(protocol, num_chunks=5)
    url, _ = start_fleet(harness, [p, d])
    with C.stream("POST", url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]" and len(events) == 6
    assert [orjson.loads(e)["choices"][0]["text"] for e in events[:-1]] == [f"t{i} " for i in range(5)]
    if protocol != "sglang":
        assert p.requests[0].body["stream"] is False  # P never streams in vLLM protocols
    assert d.requests[0].body["stream"] is True


def test_sglang_generate_merges_input_logprobs(harness):
    p, d = fakes_for("sglang")
    url, _ = start_fleet(harness, [p, d])
    r = C.post(url + "/generate", json={"text": "hi", "return_logprob": True})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["input_token_logprobs"] == [[-0.5, 7, None], [-0.25, 8, None], [-0.125, 9, None]]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404, "does not exist"),
        ("/v1/completions", b'{"model": "tiny"}', 400, "'prompt'"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', 400, "'messages'"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "'stream'"),
        ("/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}', 413, "over"),
        ("/generate", b'{"text": "x"}', 400, "SGLang fleets only"),
        ("/v1/nothing", b"{}", 404, "no route"),
    ],
)
def test_bad_input_gets_an_openai_error_and_never_reaches_engines(harness, path, body, status, fragment):
    p, d = fakes_for("pdx")
    url, _ = start_fleet(harness, [p, d], router="  max_body_bytes: 4096")
    r = C.post(url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and {"type", "code", "param"} <= set(err)
    assert p.requests == [] and d.requests == []


def test_engine_client_errors_pass_through_without_retry(harness):
    p, d = fakes_for("nixl")
    d.fail_status = 400
    url, app = start_fleet(harness, [p, d])
    r = C.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400 and "d0 fails" in r.json()["error"]["message"]
    assert len(d.requests) == 1 and app.metrics.retries == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_failed_prefill_is_retried_on_another_pair_with_a_fresh_id(harness, protocol):
    fakes = fakes_for(protocol, num_prefill=2)
    p0, p1, d = fakes
    p0.fail_status = 503
    url, app = start_fleet(harness, fakes, router="  policies: {prefill: round_robin}")
    for _ in range(4):
        r = C.post(url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 200, r.text
    assert len(p1.requests) == 4 and app.metrics.retries == len(p0.requests) >= 1
    if protocol == "pdx":
        ids = [x.body["kv_transfer_params"]["pdx_transfer_id"] for x in p0.requests + p1.requests]
        assert len(set(ids)) == len(ids)  # never reused across attempts
    if protocol == "sglang":
        rooms = [x.body["bootstrap_room"] for x in p0.requests + p1.requests]
        assert len(set(rooms)) == len(rooms)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_engine_failure_after_retries_is_a_502(harness, protocol):
    p, d = fakes_for(protocol)
    d.fail_status = 500
    url, app = start_fleet(harness, [p, d])
    r = C.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 502
    assert "after 3 attempts" in r.json()["error"]["message"] and len(d.requests) == 3
    assert app.metrics.retries == 2


def test_unreachable_engine_is_a_502_then_503_once_health_checks_notice(harness):
    p, d = fakes_for("pdx")
    url, app = start_fleet(harness, [p, d])
    harness.shutdown(app.fleet.get("d0").engine.url)  # nothing listens there any more
    r = C.post(url + "/v1/completions", json={"prompt": "hi"})
    # 502 naming the engine, or 503 if a health check already took it out of rotation
    assert (r.status_code, "d0" in r.json()["error"]["message"]) in {(502, True), (503, False)}
    deadline = time.monotonic() + 5
    while C.get(url + "/ready").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert C.get(url + "/ready").status_code == 503
    r = C.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_engine"


def test_unhealthy_engine_leaves_rotation_and_returns(harness):
    fakes = fakes_for("pdx", num_decode=2)
    p, d0, d1 = fakes
    url, app = start_fleet(harness, fakes, router="  policies: {decode: round_robin}")
    d1.is_healthy = False
    deadline = time.monotonic() + 5
    while app.fleet.get("d1").is_healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(4):
        assert C.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 200
    assert len(d1.requests) == 0 and len(d0.requests) == 4
    d1.is_healthy = True
    while not app.fleet.get("d1").is_healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(4):
        assert C.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 200
    assert len(d1.requests) == 2


def test_circuit_breaker_opens_after_repeated_failures(harness):
    fakes = fakes_for("nixl", num_decode=2)
    p, d0, d1 = fakes
    d1.fail_status = 500
    router = "  policies: {decode: round_robin}\n  circuit: {failure_threshold: 2, cooldown_s: 60}"
    url, app = start_fleet(harness, fakes, router=router)
    for _ in range(6):
        assert C.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 200
    assert len(d1.requests) == 2  # then its circuit opened
    assert app.fleet.get("d1").is_circuit_open_now()
    assert scrape(url).sum("pdx_router_engine_circuit_open", engine="d1", role="decode") == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_disconnect_aborts_both_legs(harness, protocol):
    p, d = fakes_for(protocol)
    d.hang = True
    if protocol != "nixl":
        p.hang = True
    url, app = start_fleet(harness, [p, d])
    with pytest.raises(httpx.ReadTimeout):
        C.post(url + "/v1/completions", json={"prompt": "hi", "stream": True}, timeout=0.5)
    deadline = time.monotonic() + 5
    while (d.num_aborted < 1 or p.num_aborted < (0 if protocol == "nixl" else 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.num_aborted == 1 and p.num_aborted == (0 if protocol == "nixl" else 1)
    assert app.metrics.errors["client_disconnect"] == 1
    assert all(s.in_flight == 0 for s in app.fleet.states())


ADMIN = {"authorization": "Bearer adm1n"}


def test_membership_api(harness):
    p, d0, d1 = fakes_for("pdx", num_decode=2)
    url, app = start_fleet(harness, [p, d0], router="  admin_token: adm1n")
    d1_url = harness.serve(d1)
    workers = C.get(url + "/workers").json()
    assert workers["protocol"] == "pdx" and [w["id"] for w in workers["workers"]] == ["p0", "d0"]
    r = C.post(url + "/workers", json={"id": "d1", "url": d1_url, "role": "decode", "connector": "pdx"}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["id"] == "d1"
    r = C.post(url + "/workers", json={"id": "d1", "url": "http://127.0.0.1:1", "role": "decode"}, headers=ADMIN)
    assert r.status_code == 409
    r = C.post(url + "/workers", json={"id": "x", "url": "http://127.0.0.1:2", "role": "decoder"}, headers=ADMIN)
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = C.post(url + "/workers", json={"id": "s", "url": "http://127.0.0.1:3", "role": "decode", "kind": "sglang"},
               headers=ADMIN)  # fmt: skip
    assert r.status_code == 400 and "protocol" in r.json()["error"]["message"]
    assert C.delete(url + "/workers/d0", headers=ADMIN).status_code == 200
    assert C.delete(url + "/workers/d0", headers=ADMIN).status_code == 404
    for _ in range(3):
        assert C.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 200
    assert len(d1.requests) == 3 and len(d0.requests) == 0


def test_auth_token_guards_generation_and_membership(harness):
    p, d = fakes_for("pdx")
    url, _ = start_fleet(harness, [p, d], router="  auth_token: s3cret")
    assert C.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert C.get(url + "/workers").status_code == 401
    assert C.get(url + "/v1/models").status_code == 401
    assert C.get(url + "/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
    ok = C.post(url + "/v1/completions", json={"prompt": "hi"}, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert "authorization" not in d.requests[0].headers  # the router's token is not the engines'
    assert C.get(url + "/health").status_code == 200


def test_models_health_ready_metrics(harness):
    p, d = fakes_for("pdx")
    url, _ = start_fleet(harness, [p, d])
    assert C.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    assert C.get(url + "/health").status_code == 200 and C.get(url + "/ready").status_code == 200
    C.post(url + "/v1/completions", json={"prompt": "hi"})
    C.post(url + "/v1/completions", json={"prompt": "hi", "stream": True})
    time.sleep(0.5)  # one health round scrapes the engines' /metrics
    m = scrape(url)
    assert m.sum("pdx_router_requests_total", route="/v1/completions", code="200") == 2
    assert m.sum("pdx_router_ttft_seconds_count") == 2 and m.sum("pdx_router_latency_seconds_count") == 2
    assert m.sum("pdx_router_engine_prompt_tokens_total", engine="d0", role="decode",
                 source="external_kv_transfer") == 8  # fmt: skip
    assert m.sum("pdx_router_kv_transfer_reports_total") == 2  # D's pdx_transfer_stats, both modes
    assert m.sum("pdx_router_kv_transfer_bytes_total") == 8192
    assert m.sum("pdx_router_kv_transfer_busy_seconds_total") == pytest.approx(0.002)  # reported in ms


def test_prefix_aware_sends_a_repeated_prefix_to_the_same_prefill(harness):
    fakes = fakes_for("pdx", num_prefill=2)
    url, app = start_fleet(harness, fakes, router="  policies: {prefill: prefix_aware, chunk_size: 16}")
    doc = "shared system prompt " * 20
    for i in range(6):
        assert C.post(url + "/v1/completions", json={"prompt": doc + f"question {i}"}).status_code == 200
    counts = sorted(len(f.requests) for f in fakes[:2])
    assert counts == [0, 6]


def test_short_prompts_go_to_decode_alone(harness):
    p, d = fakes_for("pdx")
    url, app = start_fleet(harness, [p, d], router="  policies: {disaggregate_min_tokens: 64}")
    assert C.post(url + "/v1/completions", json={"prompt": "short"}).status_code == 200
    assert C.post(url + "/v1/completions", json={"prompt": list(range(100))}).status_code == 200
    assert len(p.requests) == 1 and len(d.requests) == 2
    assert "kv_transfer_params" not in d.requests[0].body and app.metrics.decode_only == 1


def test_removing_a_worker_lets_its_open_requests_finish(harness):
    p, d = fakes_for("nixl")
    d.delay_s = 0.5
    url, app = start_fleet(harness, [p, d], router="  admin_token: adm1n")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=C.post(url + "/v1/completions", json={"prompt": "hi"})))
    t.start()
    time.sleep(0.25)  # the request is at D now
    assert C.delete(url + "/workers/d0", headers=ADMIN).status_code == 200
    t.join(5)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == "hello"
    assert C.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 503  # no D left
