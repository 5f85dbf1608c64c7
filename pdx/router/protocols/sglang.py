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
from typing import Any


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
