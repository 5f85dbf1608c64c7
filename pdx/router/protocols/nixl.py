"""vLLM's stock NIXL protocol (``NixlConnector``, pull mode), as vLLM's proxies speak it.

Sequential: the P leg first, then the D leg with what P returned.

- **P leg**: the client's body with ``max_tokens: 1`` (``max_completion_tokens: 1``
  if present), ``min_tokens: 1`` if present, ``stream: false``, ``stream_options``
  dropped, and ``kv_transfer_params: {"do_remote_decode": true,
  "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null,
  "remote_host": null, "remote_port": null}``.
- **D leg**: the client's original body plus the ``kv_transfer_params`` of P's
  JSON response verbatim (omitted if P returned none).

Both legs carry the same ``x-request-id``. A retry re-picks the pair and starts
again with P.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from pdx.router.protocols.base import Legs, PDProtocol

if TYPE_CHECKING:
    from pdx.config.topology import Engine
    from pdx.router.request import RequestCtx

PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    if "min_tokens" in out:
        out["min_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = dict(PREFILL_PARAMS)
    return out


def decode_body(body: dict[str, Any], prefill_response: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    params = prefill_response.get("kv_transfer_params")
    if params is not None:
        out["kv_transfer_params"] = params
    else:
        out.pop("kv_transfer_params", None)
    return out


class NixlProtocol(PDProtocol):
    name = "nixl"
    is_concurrent = False

    def legs(self, ctx: RequestCtx, prefill: Engine) -> Legs:
        return Legs(orjson.dumps(prefill_body(ctx.body)), None)

    def decode_after_prefill(self, ctx: RequestCtx, prefill_answer: bytes) -> bytes:
        return orjson.dumps(decode_body(ctx.body, orjson.loads(prefill_answer)))
