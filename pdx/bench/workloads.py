"""Workloads of ``pdx bench serve``: deterministic token-id prompts with exact lengths.

Every prompt is a list of token ids drawn from the model's vocabulary (ids
``NUM_SPECIAL..vocab_size-1``, never a special token) by a seeded generator, so a
prompt has exactly the length asked for and the same seed gives the same
prompts on any machine. Three workloads:

``multi-round-chat``
    ``num_users`` conversations share one system prompt. Each conversation opens
    with a context of its own (``user_context_tokens`` seeded ids: the user's
    documents or earlier sessions, as in LMCache's multi-round QA benchmark; 0 for
    none). Turn k of a user is ``system + context + history + user_turn_k``; once answered, ``user_turn_k`` and a
    synthetic ``answer_k`` (seeded ids, ``answer_tokens`` long, standing for the
    assistant's reply) join the history, so each prompt extends the user's
    previous one. A user sends its next turn only after the previous answer came
    back. A conversation that would pass ``max_prompt_tokens`` starts over with a
    fresh history (same system prompt).
``long-doc-qa``
    ``num_docs`` long documents; request i asks a fresh question (seeded ids)
    after document ``i % num_docs``.
``random``
    every prompt is fresh seeded ids: no prefix is shared beyond chance.

The number of chat users can be sized to a KV volume: ``users_for_kv_volume``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_SPECIAL = 3  # the tiny model's <s> </s> <pad>
WORKLOADS = ("multi-round-chat", "long-doc-qa", "random")


@dataclass(frozen=True)
class WorkloadSpec:
    """Shape of every workload (one spec, each workload reads its own fields)."""

    seed: int = 0
    vocab_size: int = 4096
    output_tokens: int = 16  # max_tokens of every request (ignore_eos: exactly this many)
    # multi-round-chat
    num_users: int = 4
    system_tokens: int = 512  # shared by every user
    user_context_tokens: int = 0  # a conversation's own opening context (after the system prompt)
    user_turn_tokens: int = 32
    answer_tokens: int = 16  # synthetic assistant reply appended to the history
    max_prompt_tokens: int = 1800  # a conversation longer than this starts over
    # long-doc-qa
    num_docs: int = 2
    doc_tokens: int = 1024
    question_tokens: int = 32
    # random
    random_tokens: int = 512


@dataclass(frozen=True)
class Request:
    """One request to send: which user (chat) or -1, and its prompt."""

    user: int
    prompt: tuple[int, ...]  # token ids


def model_shape(model_dir: str | Path | None) -> tuple[int, int]:
    """``(vocab_size, kv_bytes_per_token)`` from a model's ``config.json`` (the tiny model's if None).

    KV bytes per token = 2 (K and V) x layers x KV heads x head_dim x dtype bytes.
    """
    if model_dir is None:
        from pdx.models.tiny import TinyModelSpec, model_config

        cfg = model_config(TinyModelSpec())
    else:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    dtype = str(cfg.get("torch_dtype", "float32"))
    itemsize = 4 if "32" in dtype else 2
    return int(cfg["vocab_size"]), 2 * int(cfg["num_hidden_layers"]) * heads * head_dim * itemsize


def users_for_kv_volume(kv_gb: float, kv_bytes_per_token: int, tokens_per_user: int) -> int:
    """Users whose whole conversations together fill ``kv_gb`` GB of KV (at least 1)."""
    return max(1, int(kv_gb * 1e9 / (kv_bytes_per_token * tokens_per_user)))


def _ids(spec: WorkloadSpec, count: int, *stream: int) -> tuple[int, ...]:
    rng = np.random.default_rng([spec.seed, *stream])
    return tuple(int(x) for x in rng.integers(NUM_SPECIAL, spec.vocab_size, size=count))


class MultiRoundChat:
    """Conversations with a shared system prompt and growing histories."""

    name = "multi-round-chat"
    is_closed_loop = True  # a user's next turn waits for its previous answer

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self.system = _ids(spec, spec.system_tokens, 1)
        self._turn = [0] * spec.num_users
        self._conversation = [0] * spec.num_users  # restarts so far
        self._history = [self._context(u) for u in range(spec.num_users)]
        self._pending: dict[int, tuple[int, ...]] = {}

    @property
    def num_users(self) -> int:
        return self.spec.num_users

    def _context(self, user: int) -> tuple[int, ...]:
        return _ids(self.spec, self.spec.user_context_tokens, 4, user, self._conversation[user])

    def next_request(self, user: int) -> Request:
        s = self.spec
        user_turn = _ids(s, s.user_turn_tokens, 2, user, self._conversation[user], self._turn[user])
        if self._turn[user] and s.system_tokens + len(self._history[user]) + len(user_turn) > s.max_prompt_tokens:
            self._conversation[user] += 1
            self._history[user], self._turn[user] = self._context(user), 0
            user_turn = _ids(s, s.user_turn_tokens, 2, user, self._conversation[user], 0)
        self._pending[user] = user_turn
        return Request(user, self.system + self._history[user] + user_turn)

    def on_answer(self, user: int) -> None:
        """The answer to ``user``'s last turn came back: grow its history."""
        s = self.spec
        answer = _ids(s, s.answer_tokens, 3, user, self._conversation[user], self._turn[user])
        self._history[user] = self._history[user] + self._pending.pop(user) + answer
        self._turn[user] += 1


class LongDocQA:
    """Many questions against a few long documents."""

    name = "long-doc-qa"
    is_closed_loop = False

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self.docs = [_ids(spec, spec.doc_tokens, 4, d) for d in range(spec.num_docs)]
        self._count = 0

    def next_request(self, user: int = -1) -> Request:
        i, self._count = self._count, self._count + 1
        question = _ids(self.spec, self.spec.question_tokens, 5, i)
        return Request(-1, self.docs[i % len(self.docs)] + question)

    def on_answer(self, user: int) -> None:
        pass


class RandomPrompts:
    """Unique prompts: no reuse."""

    name = "random"
    is_closed_loop = False

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self._count = 0

    def next_request(self, user: int = -1) -> Request:
        i, self._count = self._count, self._count + 1
        return Request(-1, _ids(self.spec, self.spec.random_tokens, 6, i))

    def on_answer(self, user: int) -> None:
        pass


def create_workload(name: str, spec: WorkloadSpec) -> MultiRoundChat | LongDocQA | RandomPrompts:
    """A fresh workload (its own request sequence, starting at the beginning)."""
    classes: dict[str, type[MultiRoundChat | LongDocQA | RandomPrompts]] = {
        "multi-round-chat": MultiRoundChat,
        "long-doc-qa": LongDocQA,
        "random": RandomPrompts,
    }
    if name not in classes:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return classes[name](spec)
