"""Router-issued transfer parameters: HMAC-SHA256 signing and the engines' verification.

Only the router pairs engines. It signs each leg's pdx parameters (transfer id,
role, peer address) with the fleet secret, adding two keys to
``kv_transfer_params``:

    pdx_exp  expiry, unix seconds (int)
    pdx_sig  hex HMAC-SHA256(secret, canonical(transfer id, role, peer, exp))

An engine's connector verifies before it does anything with the peer
(``TransferVerifier.verify``, on the scheduler side where the params are parsed):
unsigned, tampered, expired and replayed parameters (the same transfer id and
role twice on one engine before its expiry) raise ``TransferRefused`` with the
reason; the engine then serves the request as a plain local one and never
connects to the named peer. The fake engines (``pdx.testing.fake_engine``)
verify through this same class.

``control_token(secret)`` derives the control channel's ``auth_token`` from the
fleet secret (what ``pdx launch`` gives engines when the topology names only
``kv_secret``).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import time
from collections.abc import Callable
from typing import Any

from pdx.connector import protocol
from pdx.errors import ConfigError

SIG = "pdx_sig"
EXP = "pdx_exp"
TTL_S = 600  # how long issued parameters stay valid (covers P's queueing and D's receive timeout)
_MAX_SKEW_S = 3600  # an expiry further ahead than this is refused (a forged "never expires")


class TransferRefused(ConfigError):
    """The pdx parameters of a request are not the router's: the request is served locally."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # unsigned | malformed | bad_signature | expired | replayed


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ConfigError("the pdx fleet secret is empty: set kv_secret (env PDX_KV_SECRET)")
    return key


def canonical(transfer_id: str, role: str, peer: str, exp: int) -> bytes:
    """The signed bytes: version, then each field length-prefixed (no field can spill into another)."""
    fields = ("pdx-transfer-v1", transfer_id, role, peer, str(exp))
    return b"".join(len(f.encode()).to_bytes(4, "big") + f.encode() for f in fields)


def signature(secret: str | bytes, transfer_id: str, role: str, peer: str, exp: int) -> str:
    return hmac.new(_key(secret), canonical(transfer_id, role, peer, exp), hashlib.sha256).hexdigest()


def sign(params: dict[str, Any], secret: str | bytes, ttl_s: float = TTL_S, now: float | None = None) -> dict[str, Any]:
    """``params`` (``protocol.prefill_params`` / ``decode_params``) plus ``pdx_exp`` and ``pdx_sig``."""
    exp = int((time.time() if now is None else now) + ttl_s)
    sig = signature(secret, params[protocol.TRANSFER_ID], params[protocol.ROLE], params.get(protocol.PEER) or "", exp)
    return {**params, EXP: exp, SIG: sig}


def control_token(secret: str | bytes) -> str:
    """The control channel's ``auth_token`` derived from the fleet secret (distinct from it)."""
    return hmac.new(_key(secret), b"pdx-control-token-v1", hashlib.sha256).hexdigest()


class TransferVerifier:
    """One engine's check of router-issued parameters, with its replay book.

    ``verify(raw)`` returns the parsed params, ``None`` for a request without pdx
    params, or raises ``TransferRefused``. Call it once per request (the
    scheduler caches the outcome by request id): a second call with the same
    transfer id and role is a replay.
    """

    def __init__(self, secret: str | bytes, clock: Callable[[], float] = time.time) -> None:
        self._key = _key(secret)
        self._clock = clock
        self._seen: dict[tuple[str, str], int] = {}  # (transfer id, role) -> expiry
        self._expiries: list[tuple[int, tuple[str, str]]] = []  # heap of (expiry, key): O(log n) pruning
        self.num_refused: dict[str, int] = {}  # by reason

    def verify(self, raw: dict[str, Any] | None) -> protocol.PdxTransferParams | None:
        try:
            return self._verify(raw)
        except TransferRefused as exc:
            self.num_refused[exc.reason] = self.num_refused.get(exc.reason, 0) + 1
            raise

    def _verify(self, raw: dict[str, Any] | None) -> protocol.PdxTransferParams | None:
        if not raw or protocol.TRANSFER_ID not in raw:
            return None
        sig, exp = raw.get(SIG), raw.get(EXP)
        if sig is None or exp is None:
            raise TransferRefused("unsigned", f"kv_transfer_params carry no {SIG}/{EXP}; only the router issues them")
        try:
            params = protocol.parse(raw)
        except ConfigError as exc:
            raise TransferRefused("malformed", str(exc)) from None
        assert params is not None
        if not isinstance(sig, str) or type(exp) is not int:
            raise TransferRefused("malformed", f"{SIG} must be a hex string and {EXP} an integer")
        peer = raw.get(protocol.PEER) or ""
        if not isinstance(peer, str):
            raise TransferRefused("malformed", f"{protocol.PEER} must be a string")
        expected = hmac.new(self._key, canonical(params.transfer_id, params.role, peer, exp), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest().encode(), sig.encode()):
            raise TransferRefused("bad_signature", "kv_transfer_params are not signed with this fleet's secret")
        now = self._clock()
        if exp <= now:
            raise TransferRefused("expired", f"kv_transfer_params expired {now - exp:.0f} s ago")
        if exp > now + _MAX_SKEW_S:
            raise TransferRefused("expired", f"{EXP} is {exp - now:.0f} s ahead (at most {_MAX_SKEW_S} s)")
        while self._expiries and self._expiries[0][0] <= now:  # forget what can no longer be replayed
            _, old = heapq.heappop(self._expiries)
            if self._seen.get(old, now + 1) <= now:
                del self._seen[old]
        key = (params.transfer_id, params.role)
        if self._seen.get(key, 0) > now:
            raise TransferRefused("replayed", f"transfer {params.transfer_id} ({params.role}) was already used here")
        self._seen[key] = exp
        heapq.heappush(self._expiries, (exp, key))
        return params
