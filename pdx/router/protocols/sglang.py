"""SGLang's PD protocol (stock ``--disaggregation-mode prefill|decode`` servers).

Both legs get the **same** body, the client's plus
``bootstrap_host`` (the prefill URL's host), ``bootstrap_port`` (the prefill
engine's bootstrap port; ``null`` when the topology gives none) and
``bootstrap_room`` (a fresh random integer in ``[0, 2**63)``, always
overwritten), and are sent **concurrently** on the client's route
(``/v1/completions``, ``/v1/chat/completions``, ``/generate``). ``stream`` is
forwarded to P too. The client gets D's response and status; P's status is
checked too. For ``/generate`` with ``return_logprob``, P's
``meta_info.input_token_logprobs`` are prepended to D's. A retry re-picks the
pair and mints a new room; a room is never reused.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import orjson

from pdx.router.protocols.base import Legs, PDProtocol

if TYPE_CHECKING:
    from pdx.config.topology import Engine
    from pdx.router.request import RequestCtx


def new_room() -> int:
    return secrets.randbits(63)


def leg_body(body: dict[str, Any], bootstrap_host: str, bootstrap_port: int | None, room: int) -> dict[str, Any]:
    out = dict(body)
    out["bootstrap_host"] = bootstrap_host
    out["bootstrap_port"] = bootstrap_port
    out["bootstrap_room"] = room
    return out


def merge_input_logprobs(prefill_response: dict[str, Any], decode_response: dict[str, Any]) -> dict[str, Any]:
    """D's ``/generate`` response with P's input token logprobs prepended (a new dict)."""
    p_meta = prefill_response.get("meta_info") or {}
    d_meta = dict(decode_response.get("meta_info") or {})
    p_lp = p_meta.get("input_token_logprobs")
    if p_lp is None:
        return decode_response
    d_meta["input_token_logprobs"] = list(p_lp) + list(d_meta.get("input_token_logprobs") or [])
    out = dict(decode_response)
    out["meta_info"] = d_meta
    return out


class SglangProtocol(PDProtocol):
    name = "sglang"
    is_concurrent = True
    is_prefill_required = True  # an SGLang decode server cannot prefill by itself
    serves_generate = True

    def legs(self, ctx: RequestCtx, prefill: Engine) -> Legs:
        body = orjson.dumps(leg_body(ctx.body, prefill.host, prefill.bootstrap_port, new_room()))
        is_merged = ctx.route == "/generate" and bool(ctx.body.get("return_logprob")) and not ctx.is_stream
        return Legs(body, body, is_merged)

    def merge_answers(self, ctx: RequestCtx, prefill_answer: bytes, decode_answer: bytes) -> bytes:
        return orjson.dumps(merge_input_logprobs(orjson.loads(prefill_answer), orjson.loads(decode_answer)))
