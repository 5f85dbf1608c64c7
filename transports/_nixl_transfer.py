"""Transfers of the nixl transport: the NIXL requests of one post and their outcome.

Kept apart from ``transports/nixl.py`` (the endpoint); see its docstring for the model.
A transfer is handed the transport's ``NixlAgent`` and touches nothing else of it.
"""

from __future__ import annotations

import numpy as np

from ._nixl_agent import NOTIF_PREFIX, NixlAgent, NixlRequest
from .base import Peer
from .errors import PeerLost, TransferError
from .segments import SegmentPairs
from .transfer import Transfer, TransferStatus


class NixlTransfer(Transfer):
    """Settled by the agent's poller (``progress``) once every request of the post finished."""

    def __init__(self, agent: NixlAgent, peer: Peer, pairs: SegmentPairs, timeout: float) -> None:
        super().__init__(len(pairs), pairs.nbytes, timeout=timeout, label=f"nixl transfer to {peer.name}")
        self.peer = peer
        self.requests: list[NixlRequest] = []
        self.late_notif: bytes | None = None  # sent after all requests finish (multi-group posts)
        self.prefailed = np.zeros(0, dtype=np.int64)  # rows never posted: remote region released
        self._agent = agent

    def _on_settled(self) -> None:
        with self._agent.lock:
            self._agent.inflight.discard(self)

    def _stop(self) -> None:
        self._agent.abandon(self.requests)

    # -- called with the agent lock held ----------------------------------------------------
    def progress(self) -> bool:
        """Check in-flight requests; settle the transfer once all finished. True if anything changed."""
        changed = False
        for req in self.requests:
            if req.state == "PROC":
                try:
                    state = self._agent.agent.check_xfer_state(req.handle)
                except Exception:  # NIXL raises (rather than answering ERR) when the peer disconnected
                    state = "ERR"
                if state != "PROC":
                    req.state = state
                    changed = True
                    self._agent.release_handle(req)
        if changed:
            self.settle_if_finished()
        return changed

    def settle_if_finished(self) -> None:
        """Settle the transfer if no request is in flight any more."""
        if self.report is not None or any(r.state == "PROC" for r in self.requests):
            return
        failed = [r for r in self.requests if r.state != "DONE"]
        if failed:
            rows = np.sort(np.concatenate([self.prefailed] + [r.rows for r in failed]))
            self.settle(TransferStatus.FAILED, PeerLost,
                        "NIXL reported the transfer failed (peer unreachable or gone)", rows.tolist())
            return
        if len(self.prefailed):
            self.settle(TransferStatus.FAILED, TransferError,
                        f"{len(self.prefailed)} segment(s) failed: their remote region was released at the "
                        "target (stale descriptor); the other segments landed", self.prefailed.tolist())
            return
        if self.late_notif is not None:
            try:
                self._agent.agent.send_notif(self.peer.state, NOTIF_PREFIX + self.late_notif)
            except Exception as exc:  # the bytes landed, but the target will not hear of it
                self.settle(TransferStatus.FAILED, PeerLost, f"notification failed: {exc}")
                return
        self.settle(TransferStatus.DONE)


def lookup(ids: np.ndarray, table: dict[int, tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (base address, device) of the region each row names."""
    if len(ids) and (ids == ids[0]).all():
        addr, dev = table[int(ids[0])]
        return np.full(len(ids), addr, dtype=np.int64), np.full(len(ids), dev, dtype=object)
    uniq, inv = np.unique(ids, return_inverse=True)
    addrs = np.array([table[int(u)][0] for u in uniq], dtype=np.int64)
    devs = np.array([table[int(u)][1] for u in uniq], dtype=object)
    return addrs[inv], devs[inv]


def group_rows(l_dev: np.ndarray, r_dev: np.ndarray) -> list[tuple[tuple[str, str], np.ndarray]]:
    """Rows grouped by (local device, remote device): one NIXL request per group."""
    if (l_dev == l_dev[0]).all() and (r_dev == r_dev[0]).all():
        return [((l_dev[0], r_dev[0]), np.arange(len(l_dev)))]
    keys = np.array([f"{a}|{b}" for a, b in zip(l_dev, r_dev, strict=True)], dtype=object)
    out = []
    for key in dict.fromkeys(keys.tolist()):
        a, _, b = key.partition("|")
        out.append(((a, b), np.flatnonzero(keys == key)))
    return out
