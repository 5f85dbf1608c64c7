"""D's bookkeeping: count landed (layer, token range) notifications per transfer.

Pure state, no I/O. A transfer is complete when, for every layer, the landed
token ranges cover ``[first_block * block_size, num_tokens)``. On failure or
timeout the blocks not fully landed in every layer are the load errors that
vLLM recomputes (``kv_load_failure_policy``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from pdx.connector.protocol import PeerAddress


class RecvStatus(enum.Enum):
    WAITING = "waiting"  # registered (or registering); layers landing
    DONE = "done"  # every layer of every block landed
    FAILED = "failed"  # gave up; ``error`` says why
    FINAL = "final"  # reported to the scheduler; P will write no more


@dataclass
class RecvState:
    req_id: str
    transfer_id: str
    peer: PeerAddress  # P's connector control address
    block_ids: list[int]  # D's blocks for the whole prompt
    first_block: int
    num_tokens: int
    num_layers: int
    block_size: int
    deadline: float  # monotonic
    status: RecvStatus = RecvStatus.WAITING
    error: str | None = None
    is_aborted: bool = False  # D's request ended while waiting
    landed: list[list[tuple[int, int]]] = field(default_factory=list)  # per layer, merged ranges
    nbytes: int = 0
    num_notifications: int = 0
    t_registered: float = 0.0  # wall clock
    t_last_saved: float = 0.0  # P's wall clock when it had computed the last layer that landed
    t_last_posted: float = 0.0  # P's wall clock when it posted that layer's write (0: unknown)
    t_done: float = 0.0  # wall clock
    busy_s: float = 0.0  # sum over writes of (landed - posted by P), wall clocks

    def __post_init__(self) -> None:
        if not self.landed:
            self.landed = [[] for _ in range(self.num_layers)]

    @property
    def start_token(self) -> int:
        return self.first_block * self.block_size

    def add(self, layer: int, start: int, end: int) -> None:
        if not 0 <= layer < self.num_layers or end <= start:
            return
        ranges = sorted([*self.landed[layer], (start, end)])
        merged: list[tuple[int, int]] = []
        for s, e in ranges:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.landed[layer] = merged

    def _covered(self, layer: int, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self.landed[layer])

    def is_complete(self) -> bool:
        if self.start_token >= self.num_tokens:
            return True
        return all(self._covered(layer, self.start_token, self.num_tokens) for layer in range(self.num_layers))

    def failed_block_ids(self) -> set[int]:
        """D's blocks that did not fully land in every layer."""
        bs = self.block_size
        out = set()
        for i in range(self.first_block, math.ceil(self.num_tokens / bs)):
            lo, hi = i * bs, min((i + 1) * bs, self.num_tokens)
            if not all(self._covered(layer, lo, hi) for layer in range(self.num_layers)):
                out.add(self.block_ids[i])
        return out


class RecvBook:
    def __init__(self) -> None:
        self.states: dict[str, RecvState] = {}  # by request id
        self.by_transfer: dict[str, RecvState] = {}

    def add(self, state: RecvState) -> None:
        self.states[state.req_id] = state
        self.by_transfer[state.transfer_id] = state

    def landed(self, transfer_id: str, layer: int, start: int, end: int, nbytes: int,
               t_saved: float, now_wall: float, t_posted: float | None = None) -> RecvState | None:
        """A notification: bytes of (layer, [start, end)) are in place. Returns the state if it just completed."""
        state = self.by_transfer.get(transfer_id)
        if state is None or state.status is not RecvStatus.WAITING:
            return None
        state.add(layer, start, end)
        state.nbytes += nbytes
        state.num_notifications += 1
        if t_saved >= state.t_last_saved:
            state.t_last_saved = t_saved
            state.t_last_posted = t_posted or 0.0
        if t_posted is not None:
            state.busy_s += max(now_wall - t_posted, 0.0)
        if state.is_complete():
            state.status = RecvStatus.DONE
            state.t_done = now_wall
            return state
        return None

    def fail(self, transfer_id: str, why: str) -> RecvState | None:
        """Give up on a waiting transfer. Returns the state if it was waiting."""
        state = self.by_transfer.get(transfer_id)
        if state is None or state.status is not RecvStatus.WAITING:
            return None
        state.status = RecvStatus.FAILED
        state.error = why
        return state

    def expired(self, now: float) -> list[RecvState]:
        return [s for s in self.states.values() if s.status is RecvStatus.WAITING and now >= s.deadline]

    def finalize(self, state: RecvState) -> None:
        state.status = RecvStatus.FINAL
        self.states.pop(state.req_id, None)
        self.by_transfer.pop(state.transfer_id, None)

    @property
    def num_reserved(self) -> int:
        """Transfers whose D blocks are reserved and not yet handed back to the scheduler."""
        return len(self.states)
