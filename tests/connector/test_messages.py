"""Wire codecs where untrusted bytes arrive: the layer-landed notification and peer addresses."""

from __future__ import annotations

import struct

import pytest

from pdx.connector.figures import TransferFigures, aggregate_figures
from pdx.connector.messages import MAX_NBYTES, LayerLanded
from pdx.connector.protocol import PeerAddress, parse_peer
from pdx.errors import ConfigError, KVMessageError

TID = "0123456789abcdef" * 2
MSG = LayerLanded(TID, 31, 4096, 8192, 1 << 20, 1796646999.3335836, 1796646999.3335838)


def test_layer_landed_round_trips_exactly_and_stays_small():
    payload = MSG.encode()
    assert LayerLanded.decode(payload) == MSG
    assert LayerLanded.decode(bytearray(payload)) == MSG
    assert len(payload) <= 70  # one per layer per write: half of the JSON it replaces
    unknown_post = LayerLanded(TID[:8], 0, 0, 1, 0, 0.0, 0.0)
    assert LayerLanded.decode(unknown_post.encode()) == unknown_post


def _with(**fields) -> bytes:
    """MSG's encoding with header fields replaced (bypassing the dataclass)."""
    values = dict(version=1, tid_len=len(TID), layer=MSG.layer, start=MSG.start, end=MSG.end,
                  nbytes=MSG.nbytes, t_saved=MSG.t_saved, t_posted=MSG.t_posted, tid=TID.encode())
    values.update(fields)
    tid = values.pop("tid")
    return struct.pack("<BBIIIQdd", *values.values()) + tid


@pytest.mark.parametrize(("payload", "error"), [
    (b"", "0 bytes"),
    (b'{"t":"0123456789abcdef","l":0,"s":0,"e":4,"n":64,"ts":1.0,"tp":2.0}', "same pdx version"),  # older P
    (MSG.encode() + b"0" * (MAX_NBYTES - len(MSG.encode()) + 1), "bytes, expected"),
    ("a str, not bytes", "must be bytes"),
    (_with(version=2), "version 2"),
    (_with(tid_len=31), "transfer id"),
    (_with(tid=b"0123456789abcdeg" * 2), "transfer id"),
    (_with(tid=b"01234567", tid_len=8)[:-1] + b"\xff", "transfer id"),
    (_with(start=8, end=8), "empty token range"),
    (_with(start=9, end=8), "empty token range"),
    (_with(t_saved=float("nan")), "clocks"),
    (_with(t_posted=float("inf")), "clocks"),
    (_with(t_saved=-1.0), "clocks"),
])  # fmt: skip
def test_malformed_layer_landed_is_rejected_with_a_clear_error(payload, error):
    with pytest.raises(KVMessageError, match=error):
        LayerLanded.decode(payload)


@pytest.mark.parametrize(("text", "address"), [
    ("10.0.0.7:15600", PeerAddress("10.0.0.7", 15600)),
    ("prefill-0.pdx.svc:1", PeerAddress("prefill-0.pdx.svc", 1)),
    ("[::1]:65535", PeerAddress("::1", 65535)),
    ("[fd00::7]:15600", PeerAddress("fd00::7", 15600)),
])  # fmt: skip
def test_peer_address_parses_once_and_prints_back(text, address):
    assert parse_peer(text) == address
    assert str(address) == text
    assert parse_peer(str(address)) == address


@pytest.mark.parametrize(("text", "error"), [
    ("::1:15600", "IPv6 host in brackets"),
    ("[nothost]:15600", "not an IPv6 address"),
    ("[::1]15600", r"\[IPV6\]:PORT"),
    ("host:0", "outside 1-65535"),
    ("host:65536", "outside 1-65535"),
    ("host:", "HOST:PORT"),
    ("host", "HOST:PORT"),
    (":15600", "HOST:PORT"),
    ("host:15600\n", "HOST:PORT"),
    ("a b:1", "HOST:PORT"),
    (None, "HOST:PORT"),
])  # fmt: skip
def test_malformed_peer_address_is_rejected_with_a_clear_error(text, error):
    with pytest.raises(ConfigError, match=error):
        parse_peer(text)


def _figures(**kw) -> TransferFigures:
    base = dict(transfer_id=TID, is_ok=True, error=None, nbytes=100, num_tokens=300, num_writes=2,
                transfer_ms=1.0, wait_ms=10.0, exposed_ms=3.0, t_done=1.0, last_post_ms=1.0, last_write_ms=2.0)
    return TransferFigures(**{**base, **kw})


def test_figures_keep_their_json_keys():
    assert list(_figures().to_dict()) == ["transfer_id", "ok", "error", "nbytes", "num_tokens", "num_writes",
                                          "transfer_ms", "wait_ms", "exposed_ms", "t_done", "last_post_ms",
                                          "last_write_ms"]
    unknown_post = _figures(exposed_ms=None, last_post_ms=None, last_write_ms=None).to_dict()
    assert unknown_post["exposed_ms"] is None and "last_post_ms" not in unknown_post
    assert _figures(transfer_ms=1.23456, t_done=1.23456789).to_dict()["transfer_ms"] == 1.235


def test_figures_of_two_workers_add_bytes_and_keep_the_later_times():
    a = _figures()
    b = _figures(is_ok=False, error="layer 3 failed", nbytes=50, num_writes=1, wait_ms=12.0, exposed_ms=5.0,
                 t_done=2.0, last_post_ms=4.0, last_write_ms=1.0)
    both = aggregate_figures(a, b)
    assert both == aggregate_figures(b, a)
    assert (both.is_ok, both.error, both.nbytes, both.num_writes, both.num_tokens) == (
        False, "layer 3 failed", 150, 3, 300)
    assert (both.wait_ms, both.exposed_ms, both.t_done, both.last_post_ms, both.last_write_ms) == (
        12.0, 5.0, 2.0, 4.0, 1.0)
