"""Client input checks that keep malformed requests at 4xx: nesting depth, token ids, fan-out.

The app calls ``nesting_exceeds`` on the raw body before parsing it, ``check_body``
on the parsed body, and ``fan_out_field`` once a request is known to be
disaggregated (a P was picked). Each problem is ``(status, message, param)``,
``param`` naming the offending field as OpenAI's error bodies do.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdx.router.protocols.base import PDProtocol

MAX_TOKEN_ID = (1 << 31) - 1  # engines and the chunk-key hash take token ids as 32-bit values

# One JSON string, or an unterminated one up to the end: the match always succeeds,
# so stripping strings is linear in the body size whatever the quotes and escapes.
_STRING = re.compile(rb'"[^"\\]*+(?:\\[\s\S]?[^"\\]*+)*+(?:"|\Z)')
_TO_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")

Problem = tuple[int, str, str | None]  # status, message, param


def nesting_exceeds(raw: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``raw`` nests arrays/objects deeper than ``max_depth``.

    Brackets inside strings do not count. Unbalanced text answers False: the parser
    reports it.
    """
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False  # cannot nest deeper than it has brackets
    brackets = _STRING.sub(b"", raw).translate(_TO_SQUARE, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b"")  # one pass removes exactly one level of nesting
        if len(shorter) == len(brackets):
            return False  # unbalanced
        brackets = shorter
    return bool(brackets) and b"[]" in brackets


def _bad_token_ids(ids: list) -> str | None:
    for t in ids:
        if type(t) is not int:
            return "must hold integers only"
        if t < 0 or t > MAX_TOKEN_ID:
            return f"holds token id {t}, outside 0..{MAX_TOKEN_ID}"
    return None


def check_prompt(value: Any, field: str) -> Problem | None:
    """``prompt`` (or ``input_ids``): a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return 400, f"'{field}' must be a string, a list of strings or a list of token ids", field
    if all(isinstance(v, str) for v in value):
        return None
    if all(isinstance(v, list) for v in value):
        for i, ids in enumerate(value):
            why = _bad_token_ids(ids)
            if why is not None:
                return 400, f"'{field}[{i}]' {why}", field
        return None
    why = _bad_token_ids(value)
    if why is not None:
        return 400, f"'{field}' {why}", field
    return None


def _count(value: Any) -> bool:
    """A number above 1 (a non-number is the engine's to reject)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 1


def fan_out_field(body: dict[str, Any]) -> str | None:
    """The field that asks for several sub-requests: ``n``, ``best_of`` or ``prompt`` (a batch)."""
    if _count(body.get("n")):
        return "n"
    if _count(body.get("best_of")):
        return "best_of"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not all(type(t) is int for t in prompt):
        return "prompt"
    return None


def fan_out_problem(body: dict[str, Any], protocol: PDProtocol) -> Problem | None:
    """400 for a fan-out request that ``protocol`` would disaggregate but cannot answer."""
    if protocol.is_fan_out_supported:
        return None
    field = fan_out_field(body)
    if field is None:
        return None
    what = "a list of several prompts" if field == "prompt" else f"'{field}' above 1"
    return (400, f"{what} is not supported for prefill-decode disaggregated requests on this {protocol.name} fleet; "
                 f"send one request per prompt and completion", field)  # fmt: skip
