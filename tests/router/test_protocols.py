"""Leg bodies of the three PD protocols (the contracts in docs/router.md and routers.md)."""

from __future__ import annotations

import copy

from pdx.connector import protocol as pdx_keys
from pdx.router.protocols import nixl, pdx, sglang

CLIENT = {"model": "tiny", "prompt": "hi", "max_tokens": 9, "min_tokens": 3, "stream": True,
          "stream_options": {"include_usage": True}}  # fmt: skip


def test_pdx_legs_share_one_transfer_id_and_the_connector_parses_them():
    body = copy.deepcopy(CLIENT)
    tid = pdx.new_transfer_id()
    p = pdx.prefill_body(body, tid)
    d = pdx.decode_body(body, tid, "10.0.0.1", 5700)
    assert body == CLIENT  # the client's body is never mutated
    assert p["max_tokens"] == 1 and p["stream"] is False and "min_tokens" not in p and "stream_options" not in p
    assert d["max_tokens"] == 9 and d["stream"] is True and d["stream_options"] == {"include_usage": True}
    p_params, d_params = pdx_keys.parse(p["kv_transfer_params"]), pdx_keys.parse(d["kv_transfer_params"])
    assert p_params.transfer_id == d_params.transfer_id == tid
    assert (p_params.role, d_params.role) == ("prefill", "decode")
    assert d_params.peer_host_port == ("10.0.0.1", 5700)
    assert pdx.new_transfer_id() != tid


def test_pdx_chat_caps_max_completion_tokens():
    p = pdx.prefill_body({"messages": [], "max_completion_tokens": 50}, pdx.new_transfer_id())
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
