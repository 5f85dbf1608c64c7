"""Prefix keys of a request and the router's learned index of which engine holds them.

Token-id prompts are keyed with ``pdx.keys.chunk_keys`` (the same chained chunk
hash the engines and the storage tier use, full chunks only). Text prompts are
not tokenized in the router: their UTF-8 bytes are cut into chunks of
``chunk_size * 4`` bytes (about ``chunk_size`` tokens) and chained with sha256,
``h_i = sha256(h_{i-1} || bytes_i)``. Either way a key names a whole prefix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BYTES_PER_TOKEN = 4  # rough size of one token of text, for chunking untokenized prompts


def prompt_units(body: Mapping[str, Any]) -> list[int] | bytes:
    """The prompt as token ids (when the client sent ids) or UTF-8 text."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    if isinstance(prompt, str):
        return prompt.encode()
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0].encode()
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                parts.append(f"{message.get('role', '')}\x00{content if isinstance(content, str) else content!r}")
        return "\x01".join(parts).encode()
    text = body.get("text")  # SGLang /generate
    if isinstance(text, str):
        return text.encode()
    input_ids = body.get("input_ids")
    if isinstance(input_ids, list) and all(type(t) is int for t in input_ids):
        return input_ids
    return b""


def num_prompt_tokens(units: list[int] | bytes) -> int:
    """Token count (exact for ids, estimated for text)."""
    return len(units) if isinstance(units, list) else len(units) // BYTES_PER_TOKEN


def prefix_keys(units: list[int] | bytes, chunk_size: int, model: str) -> list[bytes]:
    """Chained keys of every full chunk of the prompt, in order."""
    if isinstance(units, list):
        if len(units) < chunk_size:
            return []
        from pdx.keys import KeyExtras, chunk_keys

        return [k.digest for k in chunk_keys(units, KeyExtras(model), chunk_size, include_partial=False)]
    step = chunk_size * BYTES_PER_TOKEN
    keys = []
    prev = model.encode()
    for start in range(0, len(units) - step + 1, step):
        prev = hashlib.sha256(prev + units[start : start + step]).digest()
        keys.append(prev)
    return keys


def match_prefix(keys: Sequence[bytes], holders: Mapping[bytes, Iterable[str]]) -> dict[str, int]:
    """For each engine, how many leading chunks of ``keys`` it holds (engines with 0 omitted)."""
    matched: dict[str, int] = {}
    alive: set[str] | None = None
    for i, key in enumerate(keys):
        owners = holders.get(key)
        if not owners:
            break
        alive = set(owners) if alive is None else alive.intersection(owners)
        if not alive:
            break
        for engine_id in alive:
            matched[engine_id] = i + 1
    return matched


class PrefixIndex(Mapping[bytes, set[str]]):
    """Chunk key -> engines that computed or received it; least recently used keys drop first."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()

    def __getitem__(self, key: bytes) -> set[str]:
        return self._holders[key]

    def __iter__(self):  # type: ignore[override]
        return iter(self._holders)

    def __len__(self) -> int:
        return len(self._holders)

    def get(self, key: bytes, default=None):  # type: ignore[override]
        return self._holders.get(key, default)

    def record(self, keys: Sequence[bytes], engine_id: str) -> None:
        holders = self._holders
        for key in keys:
            owners = holders.get(key)
            if owners is None:
                holders[key] = {engine_id}
            else:
                owners.add(engine_id)
                holders.move_to_end(key)
        while len(holders) > self.capacity:
            holders.popitem(last=False)

    def forget_engine(self, engine_id: str) -> None:
        for key in [k for k, owners in self._holders.items() if engine_id in owners]:
            owners = self._holders[key]
            owners.discard(engine_id)
            if not owners:
                del self._holders[key]
