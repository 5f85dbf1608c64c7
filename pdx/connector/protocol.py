"""The router <-> connector contract: pdx keys in a request's ``kv_transfer_params``.

The router dispatches the prefill (P) and decode (D) legs of one request
concurrently, with one shared transfer id:

    P leg: {"pdx_transfer_id": TID, "pdx_role": "prefill"}            (max_tokens=1, stream=false)
    D leg: {"pdx_transfer_id": TID, "pdx_role": "decode",
            "pdx_peer": "HOST:PORT"}                                 (P's connector control address)

``pdx_peer`` is P's ``kv_port`` (the ``control_port`` of P's connector,
``kv_connector_extra_config``), not its HTTP port. D's connector reserves the
destination blocks, then publishes them to ``pdx_peer``; P writes only into
blocks published for that transfer id.

Both legs also carry ``pdx_exp`` and ``pdx_sig``: the router signs them with the
fleet secret and engines verify them before using them (``pdx.connector.signing``);
parameters a client wrote itself are refused and the request is served locally.

A request without ``pdx_transfer_id`` is served locally, with no transfer.
This module is the single definition of these keys; the router builds its
params with ``prefill_params`` / ``decode_params``. A peer address is parsed
once, by ``parse_peer``, into a ``PeerAddress`` (``[HOST]:PORT`` for IPv6).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pdx.errors import ConfigError

TRANSFER_ID = "pdx_transfer_id"
ROLE = "pdx_role"
PEER = "pdx_peer"
# Set by D's connector in its response: per-request transfer figures (see docs/connector.md).
STATS = "pdx_transfer_stats"

PREFILL: Literal["prefill"] = "prefill"
DECODE: Literal["decode"] = "decode"

_TID_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")
_PEER_RE = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[A-Za-z0-9_.\-]{1,253})):(?P<port>\d{1,5})")


class PeerAddress(NamedTuple):
    """A peer's ``(host, port)``; ``host`` carries no brackets, ``str()`` adds them for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_peer(text: object) -> PeerAddress:
    """``"HOST:PORT"`` or ``"[IPV6]:PORT"`` -> ``PeerAddress``; ``ConfigError`` says what is wrong."""
    m = _PEER_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        is_bare_ipv6 = isinstance(text, str) and text.count(":") > 1 and not text.startswith("[")
        hint = " (write an IPv6 host in brackets)" if is_bare_ipv6 else ""
        raise ConfigError(f"a peer address must be 'HOST:PORT' or '[IPV6]:PORT', got {text!r:.100}{hint}")
    host = m["host"] or m["ipv6"]
    if m["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"peer address {text!r}: {host!r} in brackets is not an IPv6 address") from None
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"peer address {text!r}: port {port} is outside 1-65535")
    return PeerAddress(host, port)


@dataclass(frozen=True)
class PdxTransferParams:
    """The validated pdx part of one leg's ``kv_transfer_params``."""

    transfer_id: str  # hex, shared by both legs
    role: Literal["prefill", "decode"]
    peer: PeerAddress | None = None  # decode only: P's connector control address

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {TRANSFER_ID: self.transfer_id, ROLE: self.role}
        if self.peer is not None:
            out[PEER] = str(self.peer)
        return out


def new_transfer_id() -> str:
    return secrets.token_hex(16)


def prefill_params(transfer_id: str) -> dict[str, Any]:
    """``kv_transfer_params`` for the P leg."""
    return PdxTransferParams(transfer_id, PREFILL).to_dict()


def decode_params(transfer_id: str, prefill_kv_host: str, prefill_kv_port: int) -> dict[str, Any]:
    """``kv_transfer_params`` for the D leg; the address is P's connector control server."""
    return PdxTransferParams(transfer_id, DECODE, PeerAddress(prefill_kv_host, prefill_kv_port)).to_dict()


def parse(params: dict[str, Any] | None) -> PdxTransferParams | None:
    """The pdx params of a request, ``None`` if it carries none; ``ConfigError`` if malformed."""
    if not params or TRANSFER_ID not in params:
        return None
    tid, role, peer = params.get(TRANSFER_ID), params.get(ROLE), params.get(PEER)
    if not isinstance(tid, str) or not _TID_RE.match(tid):
        raise ConfigError(f"kv_transfer_params.{TRANSFER_ID} must be 8-64 hex characters, got {tid!r}")
    if role not in (PREFILL, DECODE):
        raise ConfigError(f"kv_transfer_params.{ROLE} must be 'prefill' or 'decode', got {role!r}")
    address = None
    if role == DECODE:
        try:
            address = parse_peer(peer)
        except ConfigError as exc:
            raise ConfigError(f"kv_transfer_params.{PEER} must be the prefill connector's address: {exc}") from None
    return PdxTransferParams(tid, role, address)
