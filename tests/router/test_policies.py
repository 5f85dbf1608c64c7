"""Routing policies and prefix keys: pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pdx.errors import ConfigError, RoutingError
from pdx.router import policies
from pdx.router.prefix import (
    PrefixIndex,
    match_prefix,
    num_prompt_tokens,
    prefix_keys,
    prompt_units,
)


@dataclass
class E:
    id: str
    in_flight: int = 0
    num_waiting: float = 0.0
    kv_usage: float = 0.0


def test_round_robin_cycles_through_every_candidate():
    es = [E("a"), E("b"), E("c")]
    assert [policies.round_robin(es, i).id for i in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_counts_in_flight_queue_and_kv_usage():
    es = [E("a", in_flight=3), E("b", in_flight=1, num_waiting=4), E("c", in_flight=2)]
    assert policies.least_loaded(es).id == "c"
    es[2].kv_usage = 1.0  # a full KV cache weighs like 4 queued requests
    assert policies.least_loaded(es).id == "a"


def test_least_loaded_spreads_ties():
    es = [E("a"), E("b")]
    assert {policies.least_loaded(es, i).id for i in range(4)} == {"a", "b"}


def test_prefix_aware_prefers_the_longest_holder_unless_overloaded():
    es = [E("a"), E("b", in_flight=2), E("c")]
    assert policies.prefix_aware(es, {"a": 1, "b": 3}).id == "b"
    es[1].in_flight = 50
    assert policies.prefix_aware(es, {"a": 1, "b": 3}).id == "a"  # b too busy; a holds some
    assert policies.prefix_aware(es, {}).id in {"a", "c"}  # no holder: least loaded


def test_session_affinity_is_stable_and_moves_only_a_removed_engines_sessions():
    es = [E("a"), E("b"), E("c")]
    picks = {s: policies.session_affinity(es, s).id for s in (f"user-{i}" for i in range(60))}
    assert len(set(picks.values())) == 3  # sessions spread over engines
    assert all(policies.session_affinity(es, s).id == e for s, e in picks.items())
    survivors = [e for e in es if e.id != "b"]
    for s, e in picks.items():
        if e != "b":
            assert policies.session_affinity(survivors, s).id == e


def test_pick_dispatches_by_name_and_rejects_unknown():
    es = [E("a"), E("b")]
    assert policies.pick("round_robin", es, counter=1).id == "b"
    assert policies.pick("least_loaded", [E("a", in_flight=1), E("b")], counter=0).id == "b"
    with pytest.raises(ConfigError, match="unknown policy 'random'"):
        policies.pick("random", es, counter=0)
    with pytest.raises(RoutingError):
        policies.pick("round_robin", [], counter=0)


def test_conditional_disaggregation():
    assert policies.should_skip_prefill(10, 0, min_tokens=64, prefix_fraction=1.1)
    assert not policies.should_skip_prefill(100, 0, min_tokens=64, prefix_fraction=1.1)
    assert policies.should_skip_prefill(1000, 900, min_tokens=0, prefix_fraction=0.8)
    assert not policies.should_skip_prefill(1000, 700, min_tokens=0, prefix_fraction=0.8)


def test_text_prefix_keys_chain_over_the_whole_prefix():
    chunk = 4  # tokens -> 16 bytes of text per chunk
    a = prefix_keys(("x" * 16 + "y" * 16 + "z" * 10).encode(), chunk, "m")
    b = prefix_keys(("x" * 16 + "y" * 16 + "w" * 20).encode(), chunk, "m")
    c = prefix_keys(("q" * 16 + "y" * 16).encode(), chunk, "m")
    assert len(a) == 2 and a == b[:2] and len(b) == 3  # shared prefix, shared keys
    assert c[1] != a[1]  # same second chunk after a different first one: different key
    assert prefix_keys(("x" * 32).encode(), chunk, "other-model") != prefix_keys(("x" * 32).encode(), chunk, "m")


def test_token_prompts_use_the_shared_chunk_keys():
    from pdx.keys import KeyExtras, chunk_keys

    tokens = list(range(600))
    keys = prefix_keys(tokens, 256, "tiny")
    assert keys == [k.digest for k in chunk_keys(tokens, KeyExtras("tiny"), 256, include_partial=False)]
    assert len(keys) == 2


def test_prompt_units_of_each_request_shape():
    assert prompt_units({"prompt": [1, 2, 3]}) == [1, 2, 3]
    assert prompt_units({"prompt": "hi"}) == b"hi"
    assert prompt_units({"prompt": ["hi"]}) == b"hi"
    chat = prompt_units({"messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(chat, bytes) and b"hi" in chat
    assert prompt_units({"text": "hi"}) == b"hi"
    assert num_prompt_tokens([1, 2, 3]) == 3 and num_prompt_tokens(b"x" * 40) == 10


def test_prefix_index_matches_leading_chunks_and_forgets_engines():
    index = PrefixIndex(capacity=4)
    index.record([b"k1", b"k2", b"k3"], "p0")
    index.record([b"k1", b"k2"], "p1")
    assert match_prefix([b"k1", b"k2", b"k3", b"k4"], index) == {"p0": 3, "p1": 2}
    assert match_prefix([b"k9", b"k1"], index) == {}
    index.forget_engine("p0")
    assert match_prefix([b"k1", b"k2", b"k3"], index) == {"p1": 2}
    index.record([b"a", b"b", b"c"], "p2")  # capacity 4: the oldest keys drop
    assert len(index) == 4 and b"k1" not in index
