"""Bookkeeping without I/O: the router contract, segment planning, landing and lease rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdx.connector import protocol
from pdx.connector.config import ConnectorConfig
from pdx.connector.control import ControlError, LayerDst
from pdx.connector.recv_book import RecvBook, RecvState, RecvStatus
from pdx.connector.send_book import Destination, SendBook, WriteItem
from pdx.errors import ConfigError, KVLayoutMismatch
from pdx.layout import vllm_cpu

TID = "0123456789abcdef"


def test_protocol_round_trip_and_clear_errors():
    p = protocol.parse(protocol.decode_params(TID, "10.0.0.7", 15600))
    assert p == protocol.PdxTransferParams(TID, "decode", protocol.PeerAddress("10.0.0.7", 15600))
    assert p.peer == ("10.0.0.7", 15600) and protocol.decode_params(TID, "10.0.0.7", 15600)["pdx_peer"] == "10.0.0.7:15600"
    assert protocol.parse(protocol.prefill_params(TID)).role == "prefill"
    assert protocol.parse({"do_remote_decode": True}) is None
    with pytest.raises(ConfigError, match="pdx_role"):
        protocol.parse({"pdx_transfer_id": TID, "pdx_role": "both"})
    with pytest.raises(ConfigError, match="pdx_peer"):
        protocol.parse({"pdx_transfer_id": TID, "pdx_role": "decode"})
    with pytest.raises(ConfigError, match="hex"):
        protocol.parse({"pdx_transfer_id": "not hex!", "pdx_role": "prefill"})


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="lease_seconds"):
        ConnectorConfig.from_extra_config({"lease_seconds": 3})
    cfg = ConnectorConfig.from_extra_config({"lease_s": 3, "auth_token": "t", "kv_secret": "s"})
    assert (cfg.lease_s, cfg.auth_token, cfg.kv_secret) == (3, "t", "s")


@pytest.mark.parametrize(("key", "env"), [("auth_token", "PDX_KV_AUTH_TOKEN"), ("kv_secret", "PDX_KV_SECRET")])
def test_config_requires_both_secrets_naming_the_setting(monkeypatch, key, env):
    monkeypatch.delenv("PDX_KV_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("PDX_KV_SECRET", raising=False)
    both = {"auth_token": "t", "kv_secret": "s"}
    with pytest.raises(ConfigError, match=f"kv_connector_extra_config.{key} or the environment variable {env}"):
        ConnectorConfig.from_extra_config({**both, key: ""})
    monkeypatch.setenv(env, "from-env")
    assert getattr(ConnectorConfig.from_extra_config({**both, key: ""}), key) == "from-env"


LAYOUT = vllm_cpu(2, 1, 4, 4, "float32")  # 2 layers, 4-token blocks of 128 bytes


def _book() -> SendBook:
    return SendBook(lease_s=10, layout=replace(LAYOUT, block_stride=160))  # P's blocks are padded


def _dest(first_block: int = 0, num_tokens: int = 10, layout=LAYOUT) -> Destination:
    layers = [LayerDst(region_id=9, offset=0), LayerDst(region_id=9, offset=5000)]
    return Destination([20, 21, 22], first_block, num_tokens, layers, layout, b"")


def test_plan_maps_p_blocks_to_d_blocks_per_layer_and_skips_d_prefix():
    book = _book()
    src = [(1, 0), (1, 1000)]  # (region id, offset of block 0) of each layer
    state = book.save("r", TID, [5, 6, 7], 10, WriteItem(1, 0, 10, 0.0))
    book.register(TID, _dest(first_block=1), now=0)
    table, start, end = book.plan(state, WriteItem(1, 0, 10, 0.0), src)
    assert (start, end) == (4, 10)
    assert table.tolist() == [[1, 1000 + 6 * 160, 9, 5000 + 21 * 128, 128], [1, 1000 + 7 * 160, 9, 5000 + 22 * 128, 128]]
    table0, _, _ = book.plan(state, WriteItem(0, 0, 10, 0.0), src)  # layer 0: the same plan, its buffers
    assert table0.tolist() == [[1, 6 * 160, 9, 21 * 128, 128], [1, 7 * 160, 9, 22 * 128, 128]]


def test_a_decoder_layout_must_equal_the_prefill_layout_and_the_error_names_both():
    book = _book()
    book.check_layout(LAYOUT)  # block padding is local: the same layout
    bf16 = vllm_cpu(2, 1, 8, 4, "bfloat16")  # same block bytes (128), another dtype and head_dim
    with pytest.raises(KVLayoutMismatch) as err:
        book.check_layout(bf16)
    assert isinstance(err.value, ControlError)
    assert f"decoder {bf16.summary()}" in str(err.value) and f"prefill {LAYOUT.summary()}" in str(err.value)
    assert "bfloat16" in str(err.value) and "float32" in str(err.value)
    state = book.save("r", TID, [5], 3, WriteItem(0, 0, 3, 0.0))
    book.refuse(TID, str(err.value), now=0)  # P refused D: the transfer stops, blocks free once finished
    assert state.is_stopped and not state.pending
    book.finish("r", TID, is_aborted=False, now=1.0)
    assert [s.req_id for s in book.pop_releasable(now=1.0)] == ["r"]


def test_register_refuses_mismatched_transfers():
    book = _book()
    book.save("r", TID, [5, 6, 7], 10, WriteItem(0, 0, 10, 0.0))
    with pytest.raises(ControlError, match="prompt tokens"):
        book.register(TID, _dest(num_tokens=12), now=0)
    bad_layers = _dest()
    bad_layers.layers = bad_layers.layers[:1]
    with pytest.raises(ControlError, match="KV layers"):
        book.register("f" * 16, bad_layers, now=0)


def test_lease_releases_held_blocks_and_refuses_late_decoders():
    book = _book()
    book.save("r", TID, [5], 3, WriteItem(0, 0, 3, 0.0))
    book.finish("r", TID, is_aborted=False, now=100.0)
    assert book.num_held == 1
    assert book.pop_releasable(now=105.0) == []
    (state,) = book.pop_releasable(now=110.0)
    assert "lease" in state.error and book.num_held == 0
    with pytest.raises(ControlError, match="over on the prefill side"):
        book.register(TID, _dest(num_tokens=3), now=111.0)


def test_early_registration_waits_for_the_request_then_expires():
    book = _book()
    assert book.register(TID, _dest(), now=0) is None
    state = book.save("r", TID, [1, 2, 3], 10, WriteItem(0, 0, 10, 0.0))
    assert state.dest is not None and book.take_pending(state)
    other = "e" * 16
    book.register(other, _dest(), now=0)
    book.pop_releasable(now=11.0)
    assert other not in book.early and other in book.closed


def _recv(first_block: int = 0, num_tokens: int = 10) -> RecvState:
    return RecvState("r", TID, protocol.PeerAddress("h", 1), [30, 31, 32], first_block, num_tokens, num_layers=2,
                     block_size=4, deadline=1e9)


def test_recv_completes_only_when_every_layer_covers_every_token():
    book = RecvBook()
    book.add(_recv())
    assert book.landed(TID, 0, 0, 10, 1, 0.0, 0.0) is None
    assert book.landed(TID, 1, 0, 6, 1, 0.0, 0.0) is None
    assert book.states["r"].failed_block_ids() == {31, 32}  # layer 1 lacks tokens 6..10
    done = book.landed(TID, 1, 6, 10, 1, 0.0, 0.0)
    assert done is not None and done.status is RecvStatus.DONE
    assert book.landed(TID, 1, 6, 10, 1, 0.0, 0.0) is None  # counted once


def test_recv_ignores_d_prefix_and_reports_failed_blocks():
    state = _recv(first_block=1)
    state.add(0, 4, 8)
    state.add(1, 4, 8)
    assert state.failed_block_ids() == {32}
    assert not state.is_complete()
    book = RecvBook()
    book.add(state)
    assert book.fail(TID, "gone") is state and book.fail(TID, "again") is None
    book.finalize(state)
    assert book.num_reserved == 0
