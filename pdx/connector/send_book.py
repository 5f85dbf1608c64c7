"""P's bookkeeping: which layers of which blocks still go to which decoder, and lease expiry.

Pure state, no I/O: the prefill worker's event loop drives it. One ``SendState``
per transfer id. A state is *releasable* (P may free its blocks) once the
scheduler has finished the request and no write is in flight, and one of:
every layer of every block landed at D; D released it; it failed; its lease
expired. P writes only to a ``Destination`` that D registered for that
transfer id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdx.connector.control import ControlError, LayerDst
from pdx.errors import KVLayoutMismatch, LayoutError
from pdx.layout import PagedKVLayout
from pdx.segments import BufferRef, CopyPlan, plan_copy


@dataclass(frozen=True)
class WriteItem:
    layer: int
    start: int  # first prompt token this write covers
    end: int  # one past the last prompt token
    t_saved: float  # wall clock when P had computed this layer (time.time())
    ready: Any = None  # GPU: an event (``query()``) that completes once the layer's KV is written


@dataclass
class Destination:
    """D's reserved blocks for one transfer (from its ``register`` message)."""

    block_ids: list[int]
    first_block: int  # D holds blocks before this one already
    num_tokens: int
    layers: list[LayerDst]
    layout: PagedKVLayout  # D's, equal to P's (``SendBook.check_layout``)
    descriptor: bytes
    conn: Any = None  # control Connection the registration came over
    peer: Any = None  # transports Peer, once connected


@dataclass
class SendState:
    req_id: str
    transfer_id: str
    num_tokens: int  # prompt tokens
    block_ids: list[int] = field(default_factory=list)  # P's blocks, latest view
    pending: list[WriteItem] = field(default_factory=list)
    dest: Destination | None = None
    num_inflight: int = 0
    is_flushing: bool = False
    is_finished: bool = False  # the scheduler finished the request (blocks now held for us)
    is_aborted: bool = False
    lease_deadline: float | None = None
    error: str | None = None  # why it stopped early (failure, release by D, expiry)
    nbytes_sent: int = 0
    num_writes: int = 0
    busy_s: float = 0.0  # sum of post-to-completion times
    plans: dict[tuple[tuple[int, ...], tuple[int, ...]], CopyPlan] = field(default_factory=dict)  # by blocks

    @property
    def is_stopped(self) -> bool:
        return self.error is not None

    def is_complete(self) -> bool:
        return (
            self.dest is not None and not self.pending and self.num_inflight == 0
            and self.is_finished and not self.is_stopped
        )

    def is_releasable(self, now: float) -> bool:
        if not self.is_finished or self.num_inflight or self.is_flushing:
            return False
        if self.is_complete() or self.is_stopped:
            return True
        return self.lease_deadline is not None and now >= self.lease_deadline


class SendBook:
    def __init__(self, lease_s: float, layout: PagedKVLayout) -> None:
        self.lease_s = lease_s
        self.layout = layout  # P's KV memory, every layer
        self.num_layers = layout.num_layers
        self.block_size = layout.block_size
        self.states: dict[str, SendState] = {}  # by transfer id
        self.early: dict[str, tuple[Destination, float]] = {}  # registered before P saw the request
        self.closed: dict[str, tuple[str, float]] = {}  # transfer id -> (why, forget after)

    # -- events ------------------------------------------------------------------------
    def save(self, req_id: str, transfer_id: str, block_ids: list[int], num_tokens: int,
             item: WriteItem) -> SendState:
        state = self.states.get(transfer_id)
        if state is None:
            state = SendState(req_id, transfer_id, num_tokens)
            self.states[transfer_id] = state
            if transfer_id in self.closed:  # D released it before P computed anything
                state.error = self.closed[transfer_id][0]
            early = self.early.pop(transfer_id, None)
            if early is not None:
                self._attach(state, early[0])
        state.block_ids = block_ids
        if not state.is_stopped:
            state.pending.append(item)
        return state

    def check_layout(self, decode: PagedKVLayout) -> None:
        """Raise ``KVLayoutMismatch``, naming both layouts, unless D keeps its KV exactly as P does."""
        if decode.fingerprint() != self.layout.fingerprint():
            raise KVLayoutMismatch(
                f"KV layout mismatch: decoder {decode.summary()} (fingerprint {decode.fingerprint()}), "
                f"prefill {self.layout.summary()} (fingerprint {self.layout.fingerprint()}); start both "
                "engines with the same model, --dtype, --kv-cache-dtype and --block-size"
            )

    def refuse(self, transfer_id: str, why: str, now: float) -> None:
        """P refused D's registration: stop the transfer (P frees its blocks once finished)."""
        state = self.states.get(transfer_id)
        if state is not None:
            self.stop(state, why)
        elif transfer_id not in self.early:
            self.closed[transfer_id] = (why, now + self.lease_s)

    def register(self, transfer_id: str, dest: Destination, now: float) -> SendState | None:
        """D published its blocks. Raises ``ControlError`` if P cannot serve this transfer."""
        if transfer_id in self.closed:
            raise ControlError(f"transfer {transfer_id} is over on the prefill side: {self.closed[transfer_id][0]}")
        if len(dest.layers) != self.num_layers:
            raise ControlError(f"decoder has {len(dest.layers)} KV layers, prefill has {self.num_layers}")
        if transfer_id in self.early:
            raise ControlError(f"transfer {transfer_id} is already registered")
        state = self.states.get(transfer_id)
        if state is None:
            self.early[transfer_id] = (dest, now + self.lease_s)
            return None
        if state.dest is not None:
            raise ControlError(f"transfer {transfer_id} is already registered")
        if state.is_stopped:
            raise ControlError(f"transfer {transfer_id} stopped on the prefill side: {state.error}")
        self._attach(state, dest)
        if state.is_stopped:
            raise ControlError(state.error or "")
        return state

    def _attach(self, state: SendState, dest: Destination) -> None:
        if dest.num_tokens != state.num_tokens:
            state.error = f"decoder expects {dest.num_tokens} prompt tokens, prefill has {state.num_tokens}"
            return
        if len(dest.block_ids) < math.ceil(state.num_tokens / self.block_size):
            state.error = f"decoder reserved {len(dest.block_ids)} blocks, too few for {state.num_tokens} tokens"
            return
        state.dest = dest

    def finish(self, req_id: str, transfer_id: str, is_aborted: bool, now: float) -> SendState:
        """The scheduler finished the request; its blocks are held until this state is released."""
        state = self.states.get(transfer_id)
        if state is None:  # finished before any layer was computed
            state = SendState(req_id, transfer_id, 0)
            self.states[transfer_id] = state
            self.early.pop(transfer_id, None)
            state.error = "the prefill request ended before its KV was computed"
        state.is_finished = True
        state.lease_deadline = now + self.lease_s
        if is_aborted and not state.is_stopped:
            state.is_aborted = True
            state.error = "the prefill request was aborted"
        if state.error is not None:
            state.pending.clear()
        return state

    def close(self, transfer_id: str, why: str, now: float) -> Destination | None:
        """No request will send on this transfer (nothing held). Returns an early registration, if any."""
        assert transfer_id not in self.states or not self.states[transfer_id].is_finished
        self.states.pop(transfer_id, None)
        self.closed[transfer_id] = (why, now + self.lease_s)
        early = self.early.pop(transfer_id, None)
        return early[0] if early is not None else None

    def stop(self, state: SendState, why: str) -> None:
        """Stop sending (D released, a write failed, ...); pending writes are dropped."""
        if state.error is None:
            state.error = why
        state.pending.clear()

    def take_pending(self, state: SendState) -> list[WriteItem]:
        if state.dest is None or state.is_stopped:
            return []
        items, state.pending = state.pending, []
        return items

    def pop_releasable(self, now: float) -> list[SendState]:
        """States whose blocks P may free now; each is returned once, then remembered as closed."""
        out = [s for s in self.states.values() if s.is_releasable(now)]
        for state in out:
            if not state.is_complete() and state.error is None:
                state.error = f"lease of {self.lease_s}s expired before the decoder took the KV"
            del self.states[state.transfer_id]
            self.closed[state.transfer_id] = (state.error or "completed", now + self.lease_s)
        for tid in [t for t, (_, until) in self.early.items() if until <= now]:
            del self.early[tid]
            self.closed[tid] = ("no prefill request with this transfer id arrived in time", now + self.lease_s)
        for tid in [t for t, (_, until) in self.closed.items() if until <= now]:
            del self.closed[tid]
        return out

    @property
    def num_held(self) -> int:
        """Transfers whose P blocks are held (finished, not yet released)."""
        return sum(1 for s in self.states.values() if s.is_finished)

    # -- planning ----------------------------------------------------------------------
    def plan(self, state: SendState, item: WriteItem, src: list[BufferRef]) -> tuple[np.ndarray, int, int]:
        """Segment table ``[n, 5]`` for one item, and the token range (start, end) D will count.

        ``src[layer]`` is (region id, offset of block 0) of P's layer buffer. The copy plan of a
        block range is made once (``pdx.segments.plan_copy``) and reused for every layer.
        """
        dest = state.dest
        assert dest is not None
        bs = self.block_size
        start = max(item.start, dest.first_block * bs)
        end = min(item.end, state.num_tokens)
        first, last = start // bs, math.ceil(end / bs) if end > start else start // bs
        if last <= first:
            return np.zeros((0, 5), dtype=np.int64), start, end
        blocks = (tuple(state.block_ids[first:last]), tuple(dest.block_ids[first:last]))
        if len(blocks[0]) != last - first or len(blocks[1]) != last - first:
            raise ControlError(f"blocks {first}..{last} missing on one side")
        plan = state.plans.get(blocks)
        if plan is None:
            try:
                plan = plan_copy(self.layout, blocks[0], dest.layout, blocks[1])
            except LayoutError as exc:
                raise ControlError(f"cannot copy blocks {first}..{last} to the decoder: {exc}") from exc
            state.plans[blocks] = plan
        d = dest.layers[item.layer]
        return plan.segment_pairs([src[item.layer]], [(d.region_id, d.offset)]).table, start, end
