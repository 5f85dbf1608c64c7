"""The router's trust boundaries: hostile input is a 4xx, membership needs the admin token,
slow clients are cut off, a dead engine is skipped and blamed, fan-out is refused where unanswerable."""

from __future__ import annotations

import json
import random
import socket
import time
from urllib.parse import urlsplit

import pytest
from harness import start_fleet
from test_router import C, fakes_for, scrape

from pdx.config import parse_topology
from pdx.errors import ConfigError
from pdx.router.cli import check_exposure
from pdx.router.validate import nesting_exceeds
from pdx.router.workers import is_router_address

ADMIN = {"authorization": "Bearer adm1n"}


def nested(depth: int) -> bytes:
    return b'{"prompt": "hi", "x": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


# -- finding 5: no 500 for any client input ------------------------------------------------
@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"prompt": list(range(300)) + [-1]}, "prompt", "-1"),
        ({"prompt": list(range(300)) + [1 << 31]}, "prompt", str(1 << 31)),
        ({"prompt": [list(range(300)), [5, -7]]}, "prompt", "prompt[1]"),
        ({"prompt": [1, "a"]}, "prompt", "integers"),
        ({"prompt": {"a": 1}}, "prompt", "'prompt' must be"),
        ({"prompt": "hi", "x": 1 << 70}, None, None),  # not a token: passes through, never a 500
    ],
)
def test_bad_token_ids_are_a_400_naming_the_field(harness, body, param, fragment):
    p, d = fakes_for("pdx")
    url, _ = start_fleet(harness, [p, d])
    r = C.post(url + "/v1/completions", content=_dumps(body), headers={"content-type": "application/json"})
    if param is None:
        assert r.status_code < 500, r.text
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"]
    assert p.requests == [] and d.requests == []


def _dumps(body: dict) -> bytes:
    return json.dumps(body).encode()  # the stdlib writes integers of any size


@pytest.mark.parametrize("depth", [65, 253, 254, 500, 1023, 1024, 5000])
def test_deep_json_is_a_400_before_parsing(harness, depth):
    p, d = fakes_for("pdx")
    url, _ = start_fleet(harness, [p, d])
    r = C.post(url + "/v1/completions", content=nested(depth), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "deeper than 64" in r.json()["error"]["message"]
    r = C.post(url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": '
               + b"[" * depth + b"]" * depth + b"}]}")  # fmt: skip
    assert r.status_code == 400
    ok = C.post(url + "/v1/completions", content=nested(60))  # within the limit: served
    assert ok.status_code == 200, ok.text
    assert C.post(url + "/v1/completions", json={"prompt": "[" * 5000}).status_code == 200  # brackets in a string


def test_nesting_scan_ignores_strings_and_unbalanced_text():
    assert not nesting_exceeds(b'{"a": "' + b"[" * 500 + b'"}', 8)
    assert not nesting_exceeds(b'{"a": "\\"' + b"[" * 500 + b'"}', 8)
    assert nesting_exceeds(b'{"a": "x\\\\"' + b", " + b"[" * 9 + b"]" * 9 + b"}", 8)
    assert not nesting_exceeds(b"[" * 100, 8)  # invalid JSON: the parser says so
    assert nesting_exceeds(b"[" * 9 + b"]" * 9, 8) and not nesting_exceeds(b"[" * 8 + b"]" * 8, 8)
    assert nesting_exceeds(b"[{" * 5 + b"}]" * 5, 8)
    t0 = time.perf_counter()
    nesting_exceeds(b"[" * 100 + b'"' + b'\\"' * 2_000_000, 64)  # no quadratic string scan
    assert time.perf_counter() - t0 < 1.0


def test_random_bodies_never_get_a_5xx(harness):
    """A short seeded fuzz of the request models: every answer is a 2xx or a 4xx."""
    p, d = fakes_for("pdx")
    url, _ = start_fleet(harness, [p, d], router="  max_body_bytes: 65536")
    rng = random.Random(1234)
    atoms = [None, True, 0, -1, 1 << 31, (1 << 63) - 1, 1.5, "", "hi", "[", []]

    def value(depth: int):
        roll = rng.random()
        if depth > 3 or roll < 0.5:
            return rng.choice(atoms)
        if roll < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 300 if depth == 0 else 3))]
        return {rng.choice(["prompt", "n", "best_of", "stream", "model", "messages", "role", "content"]): value(depth + 1)
                for _ in range(rng.randint(0, 3))}  # fmt: skip

    fields = ["prompt", "messages", "n", "best_of", "stream", "model", "max_tokens", "kv_transfer_params"]
    for _ in range(120):
        body = {f: value(0) for f in rng.sample(fields, rng.randint(0, 4))}
        route = rng.choice(["/v1/completions", "/v1/chat/completions"])
        r = C.post(url + route, content=_dumps(body))
        assert r.status_code < 500, (body, r.text)


# -- finding 6: membership, exposure, attempts ---------------------------------------------
def test_rogue_worker_is_refused_without_an_admin_token(harness):
    p, d, rogue = fakes_for("pdx", num_decode=2)
    url, app = start_fleet(harness, [p, d])  # no router token, no admin token
    rogue_url = harness.serve(rogue)
    entry = {"id": "d1", "url": rogue_url, "role": "decode", "connector": "pdx"}
    r = C.post(url + "/workers", json=entry)
    assert r.status_code == 403 and "router.admin_token" in r.json()["error"]["message"]
    assert C.delete(url + "/workers/d0").status_code == 403
    assert [s.id for s in app.fleet.states()] == ["p0", "d0"]
    assert C.get(url + "/workers").status_code == 200  # reading stays open like the routes


def test_admin_token_guards_membership_and_self_url_is_refused(harness):
    p, d, d1 = fakes_for("pdx", num_decode=2)
    url, app = start_fleet(harness, [p, d], router="  auth_token: s3cret\n  admin_token: adm1n")
    client = {"authorization": "Bearer s3cret"}
    entry = {"id": "d1", "url": harness.serve(d1), "role": "decode", "connector": "pdx"}
    assert C.post(url + "/workers", json=entry).status_code == 401
    assert C.post(url + "/workers", json=entry, headers=client).status_code == 401  # the client token is not enough
    assert C.get(url + "/workers", headers=client).status_code == 200
    port = urlsplit(url).port
    for self_url in (url, f"http://localhost:{port}", f"http://0.0.0.0:{port}"):
        r = C.post(url + "/workers", json={**entry, "id": "me", "url": self_url}, headers=ADMIN)
        assert r.status_code == 400 and "own address" in r.json()["error"]["message"], self_url
    assert C.post(url + "/workers", json=entry, headers=ADMIN).status_code == 201
    r = C.post(url + "/workers", content=b'{"id": "x", "transport": ' + b"[" * 300 + b"]" * 300 + b"}", headers=ADMIN)
    assert r.status_code == 400


def test_router_address_matching():
    assert is_router_address("127.0.0.1", 8000, [("0.0.0.0", 8000)])
    assert is_router_address("localhost", 8000, [("127.0.0.1", 8000)])
    assert is_router_address(socket.gethostname(), 8000, [("0.0.0.0", 8000)])
    assert not is_router_address("127.0.0.1", 8001, [("0.0.0.0", 8000)])
    assert not is_router_address("10.0.0.21", 8000, [("127.0.0.1", 8000)])


def test_exposed_router_needs_a_token_or_insecure():
    def router(extra: str = ""):
        return parse_topology(f"model: {{name: m}}\nrouter:\n  host: 0.0.0.0\n{extra}").router

    with pytest.raises(ConfigError, match="auth_token.*--insecure"):
        check_exposure(router(), "0.0.0.0")
    check_exposure(router(), "0.0.0.0", is_insecure=True)
    check_exposure(router("  insecure: true\n"), "0.0.0.0")
    check_exposure(router("  auth_token: t0ken\n"), "10.1.2.3")
    check_exposure(router(), "127.0.0.1")
    with pytest.raises(ConfigError, match="auth_token"):
        parse_topology("model: {name: m}\nrouter: {auth_token: ''}\n")


def test_route_cli_refuses_an_exposed_router_without_a_token(tmp_path, capsys, monkeypatch):
    from pdx.router import cli

    def must_not_serve(*args, **kwargs):
        raise AssertionError("the router started")

    monkeypatch.setattr(cli, "serve", must_not_serve)
    route_main = cli.route_main
    path = tmp_path / "t.yaml"
    path.write_text("model: {name: m}\nrouter: {host: 0.0.0.0}\n")
    assert route_main(["--topology", str(path)]) == 1
    assert "--insecure" in capsys.readouterr().err


def test_attempts_per_request_are_capped(harness):
    p, d = fakes_for("pdx")
    d.fail_status = 500
    url, app = start_fleet(harness, [p, d], router="  retries: {max_retries: 8, max_attempts: 2, backoff_ms: 1}")
    r = C.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 502 and "after 2 attempts" in r.json()["error"]["message"]
    assert len(d.requests) == 2


# -- finding 7: slowloris ------------------------------------------------------------------
SHORT = "  client_timeouts: {header_s: 0.5, body_s: 0.5, keep_alive_s: 0.5}"


def _held_for(url: str, data: bytes) -> tuple[float, bytes]:
    """Send ``data`` and go silent; how long until the router closes, and what it said."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        if data:
            sock.sendall(data)
        t0 = time.monotonic()
        got = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return time.monotonic() - t0, got
            got += chunk


@pytest.mark.parametrize(
    "data, status",
    [
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le", b"408"),  # partial headers
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro", b"408"),  # partial body
        (b"", b""),  # silent
    ],
)
def test_slow_clients_are_disconnected_within_the_timeouts(harness, data, status):
    p, d = fakes_for("pdx")
    url, app = start_fleet(harness, [p, d], router=SHORT)
    held, answer = _held_for(url, data)
    assert held < 2.0
    assert answer.split(b" ")[1:2] == ([status] if status else [])
    assert p.requests == [] and d.requests == []
    r = C.post(url + "/v1/completions", json={"prompt": "hi"})  # a normal client is unaffected
    assert r.status_code == 200


def test_default_client_timeouts_reach_uvicorn():
    from pdx.router.server import uvicorn_options

    options = uvicorn_options(parse_topology("model: {name: m}\n").router)
    assert options["timeout_keep_alive"] == 10.0
    assert (options["http"].header_timeout_s, options["http"].body_timeout_s) == (10.0, 30.0)


# -- finding 8: retries skip the engine that failed and blame it -------------------------------
@pytest.mark.parametrize("protocol", ["pdx", "nixl"])
def test_dead_prefill_falls_back_to_decode_alone(harness, protocol):
    p, d = fakes_for(protocol)
    url, app = start_fleet(harness, [p, d], router="  circuit: {failure_threshold: 100, cooldown_s: 60}")
    harness.shutdown(app.fleet.get("p0").engine.url)
    r = C.post(url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "hello" and app.metrics.decode_only == 1
    assert "kv_transfer_params" not in d.requests[-1].body  # D served it alone
    m = scrape(url)
    assert m.sum("pdx_router_engine_failures_total", engine="p0") == 1
    assert m.sum("pdx_router_engine_failures_total", engine="d0") == 0


def test_dead_decode_is_blamed_not_the_prefill_whose_leg_was_cancelled(harness):
    p, d0, d1 = fakes_for("pdx", num_decode=2)
    router = "  policies: {decode: round_robin}\n  circuit: {failure_threshold: 100, cooldown_s: 60}"
    url, app = start_fleet(harness, [p, d0, d1], router=router)
    p.hang = True  # P is still working when D's leg fails
    harness.shutdown(app.fleet.get("d1").engine.url)
    p.hang = False
    for _ in range(4):
        assert C.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 200
    m = scrape(url)
    assert m.sum("pdx_router_engine_failures_total", engine="d1") >= 1
    assert m.sum("pdx_router_engine_failures_total", engine="p0") == 0
    assert all(s.in_flight == 0 for s in app.fleet.states())


# -- fan-out ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, param",
    [({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [[1], [2]]}, "prompt")],
)
def test_fan_out_is_refused_for_disaggregated_pdx_requests(harness, extra, param):
    p, d = fakes_for("pdx")
    url, app = start_fleet(harness, [p, d])
    r = C.post(url + "/v1/completions", json={"prompt": "hi", **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert p.requests == [] and d.requests == []
    chat = C.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "n"
    assert C.post(url + "/v1/completions", json={"prompt": ["one"], "n": 1}).status_code == 200


def test_fan_out_passes_when_decode_serves_alone_or_the_protocol_can(harness):
    p, d = fakes_for("pdx")
    url, _ = start_fleet(harness, [p, d], router="  policies: {disaggregate_min_tokens: 64}")
    assert C.post(url + "/v1/completions", json={"prompt": "short", "n": 2}).status_code == 200
    assert d.requests[-1].body["n"] == 2 and p.requests == []


def test_fan_out_passes_on_a_nixl_fleet(harness):
    p, d = fakes_for("nixl")
    url, _ = start_fleet(harness, [p, d])
    assert C.post(url + "/v1/completions", json={"prompt": "hi", "n": 2}).status_code == 200

