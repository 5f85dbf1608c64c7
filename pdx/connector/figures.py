"""What D measured about one request's transfer, from its worker(s) to the HTTP response.

D's worker builds a ``TransferFigures`` when a transfer ends (``decode_side``);
with several workers (tensor parallel) the scheduler side combines one per
worker with ``aggregate_figures``; ``to_dict`` turns it into the JSON users read,
``kv_transfer_params.pdx_transfer_stats`` in D's response (and one line of
``stats_path``), exactly once, at that edge. The keys are part of the
contract: the router, tests and benchmarks read them (docs/connector.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TransferFigures:
    transfer_id: str
    is_ok: bool  # JSON "ok": every layer of every block landed
    error: str | None  # why it failed; None when ok
    nbytes: int  # bytes landed, all layers
    num_tokens: int  # prompt tokens loaded from P (past D's local prefix hit)
    num_writes: int  # layer-landed notifications counted
    transfer_ms: float  # sum over writes of (landed on D - posted by P), wall clocks
    wait_ms: float  # D registered its blocks -> everything landed (or gave up)
    exposed_ms: float | None  # P computed the last layer that landed -> everything landed; None: nothing landed
    t_done: float  # D's wall clock (s, epoch) when everything landed (or it gave up)
    last_post_ms: float | None = None  # part of exposed_ms: P computed the last layer -> P posted its write
    last_write_ms: float | None = None  # the rest of exposed_ms: P posted it -> it landed

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``pdx_transfer_stats``; the last two keys only when P reported its post time."""
        out: dict[str, Any] = {
            "transfer_id": self.transfer_id,
            "ok": self.is_ok,
            "error": self.error,
            "nbytes": self.nbytes,
            "num_tokens": self.num_tokens,
            "num_writes": self.num_writes,
            "transfer_ms": round(self.transfer_ms, 3),
            "wait_ms": round(self.wait_ms, 3),
            "exposed_ms": None if self.exposed_ms is None else round(self.exposed_ms, 3),
            "t_done": round(self.t_done, 6),
        }
        if self.last_post_ms is not None and self.last_write_ms is not None:
            out["last_post_ms"] = round(self.last_post_ms, 3)
            out["last_write_ms"] = round(self.last_write_ms, 3)
        return out


def aggregate_figures(a: TransferFigures, b: TransferFigures) -> TransferFigures:
    """One request's figures from two workers (each landed its share of the heads): bytes and
    writes add up, ok only if both are, and the times are the later worker's."""
    later = a if (a.exposed_ms or 0.0) >= (b.exposed_ms or 0.0) else b
    exposed = [x.exposed_ms for x in (a, b) if x.exposed_ms is not None]
    return TransferFigures(
        transfer_id=a.transfer_id,
        is_ok=a.is_ok and b.is_ok,
        error=a.error or b.error,
        nbytes=a.nbytes + b.nbytes,
        num_tokens=max(a.num_tokens, b.num_tokens),
        num_writes=a.num_writes + b.num_writes,
        transfer_ms=a.transfer_ms + b.transfer_ms,
        wait_ms=max(a.wait_ms, b.wait_ms),
        exposed_ms=max(exposed) if exposed else None,
        t_done=max(a.t_done, b.t_done),
        last_post_ms=later.last_post_ms,
        last_write_ms=later.last_write_ms,
    )
