"""The pdx connector's router protocol (vLLM engines with ``PdxConnector``).

For each request the router mints a fresh transfer id (uuid4 hex) and sends both
legs **concurrently**:

- **P leg**: the client's body with ``max_tokens: 1`` (and
  ``max_completion_tokens: 1`` if the client set it), ``min_tokens`` dropped,
  ``stream: false``, ``stream_options`` dropped, and
  ``kv_transfer_params: {"pdx_transfer_id": TID, "pdx_role": "prefill"}``.
- **D leg**: the client's body unchanged (``max_tokens``, ``stream``, ...) plus
  ``kv_transfer_params: {"pdx_transfer_id": TID, "pdx_role": "decode",
  "pdx_peer": "HOST:PORT"}`` where ``HOST:PORT`` is P's connector control
  address (the prefill engine's ``kv_port`` in the topology).

Both legs' params are signed with the fleet secret (topology ``kv_secret``, env
``PDX_KV_SECRET``): ``pdx_exp`` and ``pdx_sig`` (``pdx.connector.signing``).
Engines serve params without a valid signature as plain local requests, so only
the router can pair engines. A pdx router does not start without the secret.

The client gets D's response (streamed as it arrives, or whole). If P fails
before D's first byte reaches the client, the router aborts D (closes its
connection) and retries with a new pair and a **new** transfer id; a transfer id
is never reused. After the first byte, P's outcome is only recorded: D's
connector handles a failed load (recompute or error, by its config). D may
report transfer figures in its response's ``kv_transfer_params.pdx_transfer_stats``.

The keys themselves are defined once, in ``pdx.connector.protocol``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from pdx.connector import protocol as keys
from pdx.connector import signing
from pdx.errors import ConfigError
from pdx.router.protocols.base import Legs, PDProtocol

if TYPE_CHECKING:
    from pdx.config.topology import Engine
    from pdx.router.request import RequestCtx

new_transfer_id = keys.new_transfer_id


def prefill_body(body: dict[str, Any], transfer_id: str, kv_secret: str) -> dict[str, Any]:
    """The P leg: one token, not streamed, tagged with the signed transfer id."""
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out.pop("min_tokens", None)
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = signing.sign(keys.prefill_params(transfer_id), kv_secret)
    return out


def decode_body(
    body: dict[str, Any], transfer_id: str, prefill_kv_host: str, prefill_kv_port: int, kv_secret: str
) -> dict[str, Any]:
    """The D leg: the client's request plus where to get the KV from (signed)."""
    out = dict(body)
    out["kv_transfer_params"] = signing.sign(keys.decode_params(transfer_id, prefill_kv_host, prefill_kv_port),
                                             kv_secret)
    return out


class PdxProtocol(PDProtocol):
    name = "pdx"
    is_fan_out_supported = False  # one transfer id per client request, not per sub-request
    is_concurrent = True

    def __init__(self, kv_secret: str | None) -> None:
        if not kv_secret:
            raise ConfigError("a pdx fleet's router signs transfer params with the fleet secret: set kv_secret "
                              "in the topology or the environment variable PDX_KV_SECRET (pdx launch makes one)")
        self._kv_secret = kv_secret

    def legs(self, ctx: RequestCtx, prefill: Engine) -> Legs:
        tid = new_transfer_id()
        return Legs(
            orjson.dumps(prefill_body(ctx.body, tid, self._kv_secret)),
            orjson.dumps(decode_body(ctx.body, tid, prefill.host, prefill.kv_port or 0, self._kv_secret)),
        )
