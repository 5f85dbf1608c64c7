"""Leg bodies of the three PD protocols (the contracts in docs/router.md and routers.md)."""

from __future__ import annotations

import copy

import orjson
import pytest

from pdx.config.topology import Engine, Policies
from pdx.connector import protocol as pdx_keys
from pdx.connector import signing
from pdx.errors import ConfigError
from pdx.router.protocols import create_protocol, nixl, pdx, sglang
from pdx.router.request import RequestCtx

SECRET = "router-test-fleet-secret"
CLIENT = {"model": "tiny", "prompt": "hi", "max_tokens": 9, "min_tokens": 3, "stream": True,
          "stream_options": {"include_usage": True}}  # fmt: skip


def test_pdx_legs_share_one_transfer_id_and_the_connector_parses_them():
    body = copy.deepcopy(CLIENT)
    tid = pdx.new_transfer_id()
    p = pdx.prefill_body(body, tid, SECRET)
    d = pdx.decode_body(body, tid, "10.0.0.1", 5700, SECRET)
    assert body == CLIENT  # the client's body is never mutated
    assert p["max_tokens"] == 1 and p["stream"] is False and "min_tokens" not in p and "stream_options" not in p
    assert d["max_tokens"] == 9 and d["stream"] is True and d["stream_options"] == {"include_usage": True}
    verifier = signing.TransferVerifier(SECRET)  # what the engines run
    p_params, d_params = verifier.verify(p["kv_transfer_params"]), verifier.verify(d["kv_transfer_params"])
    assert p_params.transfer_id == d_params.transfer_id == tid
    assert (p_params.role, d_params.role) == ("prefill", "decode")
    assert d_params.peer == ("10.0.0.1", 5700)
    assert pdx.new_transfer_id() != tid


def test_pdx_chat_caps_max_completion_tokens():
    p = pdx.prefill_body({"messages": [], "max_completion_tokens": 50}, pdx.new_transfer_id(), SECRET)
    assert p["max_completion_tokens"] == 1 and p["max_tokens"] == 1


def test_nixl_prefill_body_is_exactly_vllms():
    p = nixl.prefill_body(CLIENT)
    assert p == {"model": "tiny", "prompt": "hi", "max_tokens": 1, "min_tokens": 1, "stream": False,
                 "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                        "remote_engine_id": None, "remote_block_ids": None,
                                        "remote_host": None, "remote_port": None}}  # fmt: skip


def test_nixl_decode_body_carries_prefills_params_verbatim():
    returned = {"do_remote_prefill": True, "remote_block_ids": [[3, 4]], "remote_engine_id": "e", "x": 1}
    d = nixl.decode_body(CLIENT, {"choices": [], "kv_transfer_params": returned})
    assert d["kv_transfer_params"] == returned and d["max_tokens"] == 9 and d["stream"] is True
    assert "kv_transfer_params" not in nixl.decode_body({**CLIENT, "kv_transfer_params": {"a": 1}}, {})


def test_sglang_legs_get_bootstrap_fields_and_a_fresh_room():
    rooms = {sglang.new_room() for _ in range(100)}
    assert len(rooms) == 100 and all(0 <= r < 2**63 for r in rooms)
    leg = sglang.leg_body({**CLIENT, "bootstrap_room": 1}, "10.0.0.1", 8998, 42)
    assert leg["bootstrap_host"] == "10.0.0.1" and leg["bootstrap_port"] == 8998 and leg["bootstrap_room"] == 42
    assert leg["stream"] is True and leg["max_tokens"] == 9  # the same body goes to P and D


def test_sglang_merges_prefills_input_logprobs_first():
    p = {"meta_info": {"input_token_logprobs": [[-1.0, 5, None]]}}
    d = {"text": "x", "meta_info": {"input_token_logprobs": [[-2.0, 6, None]], "id": "r"}}
    merged = sglang.merge_input_logprobs(p, d)
    assert merged["meta_info"]["input_token_logprobs"] == [[-1.0, 5, None], [-2.0, 6, None]]
    assert merged["meta_info"]["id"] == "r" and d["meta_info"]["input_token_logprobs"] == [[-2.0, 6, None]]


def _ctx(body: dict, route: str = "/v1/completions") -> RequestCtx:
    return RequestCtx(route=route, route_bytes=route.encode(), body=body, is_stream=body.get("stream") is True,
                      request_id="r", client_auth=None, keys=[], num_tokens=100, session_id=None, t0=0.0)  # fmt: skip


PREFILL = Engine(id="p0", url="http://10.0.0.1:8100", role="prefill", kv_port=5700, bootstrap_port=8998)


def test_each_fleet_kind_answers_legs_concurrency_and_whether_p_is_needed():
    ctx = _ctx(copy.deepcopy(CLIENT))
    pol = Policies(disaggregate_min_tokens=64)
    by_name = {name: create_protocol(name, SECRET) for name in ("pdx", "nixl", "sglang")}
    assert {n: p.name for n, p in by_name.items()} == {"pdx": "pdx", "nixl": "nixl", "sglang": "sglang"}
    assert {n: p.is_concurrent for n, p in by_name.items()} == {"pdx": True, "nixl": False, "sglang": True}
    # conditional disaggregation: a short prompt skips P on vLLM fleets, never on SGLang
    assert {n: p.needs_prefill(10, 0, pol) for n, p in by_name.items()} == {"pdx": False, "nixl": False, "sglang": True}
    assert all(p.needs_prefill(100, 0, pol) for p in by_name.values())
    assert [n for n, p in by_name.items() if p.serves_generate] == ["sglang"]

    pdx_legs = by_name["pdx"].legs(ctx, PREFILL)
    p_body, d_body = orjson.loads(pdx_legs.prefill), orjson.loads(pdx_legs.decode)
    signed = ("pdx_exp", "pdx_sig")
    expected = pdx.prefill_body(CLIENT, p_body["kv_transfer_params"]["pdx_transfer_id"], SECRET)
    for body in (p_body, expected):
        body["kv_transfer_params"] = {k: v for k, v in body["kv_transfer_params"].items() if k not in signed}
    assert p_body == expected
    assert d_body["kv_transfer_params"]["pdx_transfer_id"] == p_body["kv_transfer_params"]["pdx_transfer_id"]
    assert pdx_keys.parse(d_body["kv_transfer_params"]).peer == ("10.0.0.1", 5700)
    assert by_name["pdx"].legs(ctx, PREFILL).prefill != pdx_legs.prefill  # a fresh transfer id per attempt

    nixl_legs = by_name["nixl"].legs(ctx, PREFILL)
    assert orjson.loads(nixl_legs.prefill) == nixl.prefill_body(CLIENT) and nixl_legs.decode is None
    answer = orjson.dumps({"kv_transfer_params": {"remote_block_ids": [[1]]}})
    assert orjson.loads(by_name["nixl"].decode_after_prefill(ctx, answer))["kv_transfer_params"] == {
        "remote_block_ids": [[1]]}  # fmt: skip
    with pytest.raises(ValueError):
        by_name["nixl"].decode_after_prefill(ctx, b"not json")

    sg_legs = by_name["sglang"].legs(ctx, PREFILL)
    assert sg_legs.prefill == sg_legs.decode and not sg_legs.is_merged
    assert orjson.loads(sg_legs.prefill)["bootstrap_port"] == 8998
    generate = _ctx({"text": "hi", "return_logprob": True}, route="/generate")
    assert by_name["sglang"].legs(generate, PREFILL).is_merged

    assert all(orjson.loads(p.decode_only(_ctx({**CLIENT, "kv_transfer_params": {"x": 1}}))) == CLIENT
               for p in by_name.values())  # fmt: skip
    assert ctx.body == CLIENT  # never mutated
    with pytest.raises(ConfigError, match="unknown PD protocol 'mooncake'"):
        create_protocol("mooncake")


def test_a_pdx_router_does_not_start_without_the_fleet_secret():
    for secret in (None, ""):
        with pytest.raises(ConfigError, match="kv_secret .*PDX_KV_SECRET"):
            create_protocol("pdx", secret)
