"""Routing policies: pure functions of the candidates' state and the request's features.

No I/O, no clocks, no randomness: the same inputs give the same pick, so each
policy is unit-tested directly. ``Candidate`` is whatever exposes the load
fields below (the router passes its live engine states, tests pass dataclasses).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from pdx.errors import ConfigError, RoutingError


class Candidate(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def in_flight(self) -> int: ...  # requests this router has open on the engine
    @property
    def num_waiting(self) -> float: ...  # engine-reported queue length (last scrape)
    @property
    def kv_usage(self) -> float: ...  # engine-reported KV cache use, 0..1


C = TypeVar("C", bound=Candidate)

PREFILL_POLICIES = ("prefix_aware", "round_robin", "least_loaded", "session_affinity")
DECODE_POLICIES = ("least_loaded", "round_robin", "session_affinity", "prefix_aware")


def load_score(c: Candidate) -> float:
    """Lower is better: open requests, the engine's queue, and a full KV cache."""
    return c.in_flight + c.num_waiting + 4.0 * c.kv_usage


def round_robin(candidates: Sequence[C], counter: int) -> C:
    return candidates[counter % len(candidates)]


def least_loaded(candidates: Sequence[C], counter: int = 0) -> C:
    """The least loaded candidate; ties rotate with ``counter`` so equal engines share work."""
    n = len(candidates)
    best = candidates[counter % n]
    best_score = load_score(best)
    for i in range(1, n):
        c = candidates[(counter + i) % n]
        score = load_score(c)
        if score < best_score:
            best, best_score = c, score
    return best


def prefix_aware(
    candidates: Sequence[C], matched_chunks: Mapping[str, int], counter: int = 0, *, max_imbalance: float = 8.0
) -> C:
    """The candidate holding the longest prefix of the prompt, unless it is overloaded.

    A holder is skipped when its load exceeds the least loaded candidate's by more
    than ``max_imbalance``; with no holder the pick is ``least_loaded``.
    """
    fallback = least_loaded(candidates, counter)
    best, best_len = None, 0
    for c in candidates:
        n = matched_chunks.get(c.id, 0)
        if n > best_len or (n == best_len and best is not None and n and load_score(c) < load_score(best)):
            best, best_len = c, n
    if best is None or load_score(best) - load_score(fallback) > max_imbalance:
        return fallback
    return best


def session_affinity(candidates: Sequence[C], session_id: str | None, counter: int = 0) -> C:
    """Rendezvous hashing of the session id: stable while the candidate set is, and only
    the sessions of a removed engine move. No session id: ``least_loaded``."""
    if not session_id:
        return least_loaded(candidates, counter)
    key = session_id.encode()
    return max(candidates, key=lambda c: hashlib.blake2b(key + b"\x00" + c.id.encode(), digest_size=8).digest())


def pick(
    policy: str,
    candidates: Sequence[C],
    *,
    counter: int,
    matched_chunks: Mapping[str, int] | None = None,
    session_id: str | None = None,
) -> C:
    """Dispatch by policy name (the names the topology accepts)."""
    if not candidates:
        raise RoutingError("no candidate engine to pick from")
    if len(candidates) == 1:
        return candidates[0]
    if policy == "round_robin":
        return round_robin(candidates, counter)
    if policy == "least_loaded":
        return least_loaded(candidates, counter)
    if policy == "prefix_aware":
        return prefix_aware(candidates, matched_chunks or {}, counter)
    if policy == "session_affinity":
        return session_affinity(candidates, session_id, counter)
    raise ConfigError(f"unknown policy {policy!r}; use round_robin, least_loaded, prefix_aware or session_affinity")


def should_skip_prefill(
    num_prompt_tokens: int,
    decode_matched_tokens: int,
    *,
    min_tokens: int,
    prefix_fraction: float,
) -> bool:
    """Conditional disaggregation: serve on D alone when the prompt is short, or when D
    already holds at least ``prefix_fraction`` of it (so there is little to transfer)."""
    if num_prompt_tokens < min_tokens:
        return True
    return num_prompt_tokens > 0 and decode_matched_tokens >= prefix_fraction * num_prompt_tokens
