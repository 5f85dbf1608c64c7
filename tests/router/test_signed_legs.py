"""Only the router pairs engines: fake pdx engines verify the router's signed legs as PdxConnector does."""

from __future__ import annotations

import httpx
import pytest
from harness import start_fleet

from pdx.config import parse_topology
from pdx.connector import protocol
from pdx.errors import ConfigError
from pdx.router.app import RouterApp
from pdx.testing.fake_engine import FakeEngine

C = httpx.Client(timeout=10)
ROGUE = {"pdx_transfer_id": "ab" * 16, "pdx_role": "decode", "pdx_peer": "127.0.0.1:9"}


def test_routed_legs_verify_and_a_client_named_peer_is_served_locally(harness):
    p, d = FakeEngine("p0", role="prefill"), FakeEngine("d0", role="decode")
    url, app = start_fleet(harness, [p, d])
    r = C.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 200 and protocol.STATS in r.json()["kv_transfer_params"]
    assert (p.num_refused, d.num_refused, d.tokens_by_source["external_kv_transfer"]) == (0, 0, 4)

    # finding 1: a client talks to D directly and names its own "P"
    d_url = app.fleet.get("d0").engine.url
    rogue = C.post(d_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "kv_transfer_params": ROGUE})
    assert rogue.status_code == 200 and rogue.json()["kv_transfer_params"] is None  # computed locally
    assert d.num_refused == 1 and d.tokens_by_source["external_kv_transfer"] == 4

    # the same D leg replayed (same transfer id on the same engine) is refused too
    (routed_d_leg,) = [x.body for x in d.requests if "pdx_sig" in (x.body.get("kv_transfer_params") or {})]
    again = C.post(d_url + "/v1/completions", json=routed_d_leg)
    assert again.status_code == 200 and d.num_refused == 2


def test_engines_of_another_fleet_refuse_the_routers_legs(harness):
    fakes = [FakeEngine("p0", role="prefill", kv_secret="x" * 32), FakeEngine("d0", role="decode", kv_secret="x" * 32)]
    url, _ = start_fleet(harness, fakes, rendezvous=False)
    assert C.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 200
    assert [f.num_refused for f in fakes] == [1, 1]
    assert fakes[1].tokens_by_source == {"local_compute": 4, "external_kv_transfer": 0}


def test_a_pdx_router_needs_the_fleet_secret(monkeypatch):
    monkeypatch.delenv("PDX_KV_SECRET", raising=False)
    yaml = ("model: {name: tiny}\nengines:\n"
            "  - {id: p0, url: 'http://127.0.0.1:1', role: prefill, kv_port: 5700}\n"
            "  - {id: d0, url: 'http://127.0.0.1:2', role: decode}\n")
    with pytest.raises(ConfigError, match="PDX_KV_SECRET"):
        RouterApp(parse_topology(yaml))
    with pytest.raises(ConfigError, match="kv_secret"):
        parse_topology(yaml + "kv_secret: short\n")  # an HMAC key of at least 16 characters
    monkeypatch.setenv("PDX_KV_SECRET", "s" * 32)
    assert parse_topology(yaml).kv_secret == "s" * 32
    assert "s" * 32 not in repr(parse_topology(yaml))
