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

A request without ``pdx_transfer_id`` is served locally, with no transfer.
This module is the single definition of these keys; the router builds its
params with ``prefill_params`` / ``decode_params``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pdx.errors import ConfigError

TRANSFER_ID = "pdx_transfer_id"
ROLE = "pdx_role"
PEER = "pdx_peer"
# Set by D's connector in its response: per-request transfer figures (see docs/connector.md).
STATS = "pdx_transfer_stats"

PREFILL: Literal["prefill"] = "prefill"
DECODE: Literal["decode"] = "decode"

_TID_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")
_PEER_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


@dataclass(frozen=True)
class PdxTransferParams:
    """The validated pdx part of one leg's ``kv_transfer_params``."""

    transfer_id: str  # hex, shared by both legs
    role: Literal["prefill", "decode"]
    peer: str | None = None  # decode only: P's control address "host:port"

    @property
    def peer_host_port(self) -> tuple[str, int]:
        assert self.peer is not None
        host, _, port = self.peer.rpartition(":")
        return host.strip("[]"), int(port)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {TRANSFER_ID: self.transfer_id, ROLE: self.role}
        if self.peer is not None:
            out[PEER] = self.peer
        return out


def new_transfer_id() -> str:
    return secrets.token_hex(16)


def prefill_params(transfer_id: str) -> dict[str, Any]:
    """``kv_transfer_params`` for the P leg."""
    return PdxTransferParams(transfer_id, PREFILL).to_dict()


def decode_params(transfer_id: str, prefill_kv_host: str, prefill_kv_port: int) -> dict[str, Any]:
    """``kv_transfer_params`` for the D leg; the address is P's connector control server."""
    return PdxTransferParams(transfer_id, DECODE, f"{prefill_kv_host}:{prefill_kv_port}").to_dict()


def parse(params: dict[str, Any] | None) -> PdxTransferParams | None:
    """The pdx params of a request, ``None`` if it carries none; ``ConfigError`` if malformed."""
    if not params or TRANSFER_ID not in params:
        return None
    tid, role, peer = params.get(TRANSFER_ID), params.get(ROLE), params.get(PEER)
    if not isinstance(tid, str) or not _TID_RE.match(tid):
        raise ConfigError(f"kv_transfer_params.{TRANSFER_ID} must be 8-64 hex characters, got {tid!r}")
    if role not in (PREFILL, DECODE):
        raise ConfigError(f"kv_transfer_params.{ROLE} must be 'prefill' or 'decode', got {role!r}")
    if role == DECODE:
        if not isinstance(peer, str) or not _PEER_RE.match(peer):
            raise ConfigError(
                f"kv_transfer_params.{PEER} must be the prefill connector's 'host:port', got {peer!r}"
            )
    else:
        peer = None
    return PdxTransferParams(tid, role, peer)
