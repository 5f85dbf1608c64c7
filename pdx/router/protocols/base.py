"""The PD-protocol interface: what a fleet kind asks of the router for one request.

A ``PDProtocol`` is pure: it builds leg bodies and answers questions about the
fleet; ``pdx.router.proxy.Dispatcher`` does the I/O. Who calls what:

- ``Fleet`` (pair selection, readiness): ``needs_prefill``, ``is_prefill_required``.
- ``RouterApp`` (validation): ``serves_generate``.
- ``Dispatcher`` (one attempt on a chosen pair): ``legs``, then for sequential
  protocols ``decode_after_prefill`` once P answered; ``merge_answers`` when
  ``Legs.is_merged``; ``decode_only`` when the fleet picked no P.

Every method may be called concurrently for different requests and keeps no
per-request state: a fresh transfer id or bootstrap room is minted in each
``legs`` call, so a retry (a new call) never reuses one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import orjson

from pdx.router import policies

if TYPE_CHECKING:
    from pdx.config.topology import Engine, Policies
    from pdx.router.request import RequestCtx


class Legs(NamedTuple):
    prefill: bytes  # P leg body (JSON)
    decode: bytes | None  # D leg body (JSON); None: built from P's answer (``decode_after_prefill``)
    is_merged: bool = False  # D's answer is read whole and passed through ``merge_answers`` with P's


class PDProtocol(ABC):
    name: ClassVar[str]  # as the topology names it (``pdx.config.topology.protocol_of``)
    is_concurrent: ClassVar[bool]  # P and D dispatched at once; else P first, then D with P's answer
    is_prefill_required: ClassVar[bool] = False  # D cannot serve a request alone (no P: 503)
    serves_generate: ClassVar[bool] = False  # the fleet's engines serve SGLang's ``/generate``
    # Sub-requests of one client request (``n``, ``best_of``, several prompts) each get their own
    # KV transfer. False: they would share one transfer id and never be answered, so a
    # disaggregated fan-out request gets a 400 instead.
    is_fan_out_supported: ClassVar[bool] = True

    @abstractmethod
    def legs(self, ctx: RequestCtx, prefill: Engine) -> Legs:
        """Both leg bodies for one attempt on ``prefill`` (called by the dispatcher)."""

    def decode_after_prefill(self, ctx: RequestCtx, prefill_answer: bytes) -> bytes:
        """D's body from P's whole 200 answer (sequential protocols only).

        Raises ``ValueError`` when P's answer cannot be used (the dispatcher treats
        it as P's failure and retries elsewhere).
        """
        raise NotImplementedError(f"the {self.name} protocol sends both legs at once")

    def merge_answers(self, ctx: RequestCtx, prefill_answer: bytes, decode_answer: bytes) -> bytes:
        """The client's answer from P's and D's whole answers (when ``Legs.is_merged``)."""
        return decode_answer

    def needs_prefill(self, num_tokens: int, num_decode_matched_tokens: int, pol: Policies) -> bool:
        """Conditional disaggregation: False sends the request to D alone (``decode_only``)."""
        if self.is_prefill_required:
            return True
        return not policies.should_skip_prefill(
            num_tokens, num_decode_matched_tokens, min_tokens=pol.disaggregate_min_tokens,
            prefix_fraction=pol.decode_prefix_fraction,
        )  # fmt: skip

    def decode_only(self, ctx: RequestCtx) -> bytes:
        """D's body when D serves the request alone: the client's, minus any ``kv_transfer_params``."""
        body = dict(ctx.body)
        body.pop("kv_transfer_params", None)
        return orjson.dumps(body)
