"""Router-issued transfer parameters: sign/verify, tampering, expiry, replay, wrong key."""

from __future__ import annotations

import pytest

from pdx.connector import protocol, signing
from pdx.errors import ConfigError

SECRET = "fleet-secret"
TID = "ab" * 16
NOW = 1_800_000_000.0


def _verifier(secret: str = SECRET, now: float = NOW) -> signing.TransferVerifier:
    return signing.TransferVerifier(secret, clock=lambda: now)


def _decode(**over) -> dict:
    return {**signing.sign(protocol.decode_params(TID, "127.0.0.1", 15600), SECRET, now=NOW), **over}


def _refused(params: dict, reason: str, verifier: signing.TransferVerifier | None = None) -> None:
    v = verifier or _verifier()
    with pytest.raises(signing.TransferRefused) as info:
        v.verify(params)
    assert info.value.reason == reason
    assert v.num_refused[reason] >= 1


def test_signed_params_verify_for_both_legs():
    v = _verifier()
    assert v.verify(_decode()) == protocol.PdxTransferParams(TID, "decode", protocol.PeerAddress("127.0.0.1", 15600))
    p = v.verify(signing.sign(protocol.prefill_params(TID), SECRET, now=NOW))
    assert p == protocol.PdxTransferParams(TID, "prefill")  # the same id once per role
    assert v.verify(None) is None and v.verify({"do_remote_decode": True}) is None
    assert v.num_refused == {}


@pytest.mark.parametrize(
    "over",
    [
        {"pdx_transfer_id": "cd" * 16},
        {"pdx_role": "prefill"},
        {"pdx_peer": "127.0.0.1:15601"},
        {"pdx_peer": "10.6.6.6:15600"},
        {"pdx_exp": int(NOW) + 900},
        {"pdx_sig": "00" * 32},
    ],
    ids=["transfer_id", "role", "port", "host", "exp", "sig"],
)
def test_any_tampered_field_is_refused(over):
    _refused(_decode(**over), "bad_signature")


def test_a_prefill_leg_cannot_gain_a_peer():
    _refused({**signing.sign(protocol.prefill_params(TID), SECRET, now=NOW), "pdx_peer": "10.6.6.6:1"}, "bad_signature")


def test_unsigned_and_malformed_params_are_refused():
    _refused(protocol.decode_params(TID, "127.0.0.1", 15600), "unsigned")
    _refused({k: v for k, v in _decode().items() if k != "pdx_sig"}, "unsigned")
    _refused(_decode(pdx_exp=str(int(NOW) + 60)), "malformed")
    _refused(_decode(pdx_exp=True), "malformed")
    _refused(_decode(pdx_sig=123), "malformed")
    _refused(_decode(pdx_peer="no-port"), "malformed")


def test_wrong_key_is_refused():
    _refused(_decode(), "bad_signature", _verifier("another-fleet"))


def test_expired_and_far_future_params_are_refused():
    _refused(_decode(), "expired", _verifier(now=NOW + signing.TTL_S + 1))
    far = signing.sign(protocol.decode_params(TID, "127.0.0.1", 15600), SECRET, ttl_s=10 * 86400, now=NOW)
    _refused(far, "expired")


def test_replay_is_refused_until_the_params_expire():
    clock = [NOW]
    v = signing.TransferVerifier(SECRET, clock=lambda: clock[0])
    params = _decode()
    assert v.verify(params) is not None
    _refused(params, "replayed", v)
    clock[0] = NOW + signing.TTL_S + 1  # the book forgets it, but the params have expired too
    _refused(params, "expired", v)
    assert v.num_refused == {"replayed": 1, "expired": 1}


def test_replay_book_forgets_expired_transfers():
    """An engine's book holds only transfers that could still be replayed (bounded memory)."""
    clock = [NOW]
    v = signing.TransferVerifier(SECRET, clock=lambda: clock[0])
    for i in range(100):
        tid = f"{i:032x}"
        assert v.verify(signing.sign(protocol.decode_params(tid, "127.0.0.1", 15600), SECRET, now=NOW)) is not None
    assert len(v._seen) == 100
    clock[0] = NOW + signing.TTL_S + 1
    fresh = signing.sign(protocol.decode_params("ff" * 16, "127.0.0.1", 15600), SECRET, now=clock[0])
    assert v.verify(fresh) is not None
    assert len(v._seen) == 1


def test_empty_secret_is_a_configuration_error():
    with pytest.raises(ConfigError, match="PDX_KV_SECRET"):
        signing.TransferVerifier("")
    with pytest.raises(ConfigError, match="kv_secret"):
        signing.sign(protocol.prefill_params(TID), "")


def test_canonical_encoding_is_unambiguous():
    assert signing.canonical("ab", "c", "", 1) != signing.canonical("a", "bc", "", 1)
    assert signing.control_token(SECRET) != SECRET and len(signing.control_token(SECRET)) == 64
