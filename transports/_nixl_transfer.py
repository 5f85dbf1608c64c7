"""Transfers of the nixl transport: NIXL requests of one post and their outcome.

Kept apart from ``transports/nixl.py`` (the endpoint); see its docstring for the model.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Peer, SegmentPairs, Transfer, TransferReport, TransferStatus
from .errors import PeerLost, TransferAborted, TransferError, TransferTimeout

if TYPE_CHECKING:
    from .nixl import NixlTransport

NOTIF_PREFIX = b"\x01"  # marks pdx notifications; other messages between agents are control


def _bare(exc: BaseException) -> BaseException:
    """``exc`` without its traceback: NIXL's frames would keep the agent (and its UCX fds) alive."""
    return exc.with_traceback(None)


def _mem_type(device: str) -> tuple[str, int]:
    if device == "cpu":
        return "DRAM", 0
    return "VRAM", int(device.partition(":")[2] or 0)


class _Request:
    """One NIXL transfer request (a group of segment rows of one post)."""

    __slots__ = ("handle", "rows", "state")

    def __init__(self, handle: Any, rows: np.ndarray) -> None:
        self.handle = handle
        self.rows = rows  # row indices into the posted SegmentPairs
        self.state = "PROC"  # PROC, DONE, ERR


class NixlTransfer(Transfer):
    def __init__(self, transport: NixlTransport, peer: Peer, pairs: SegmentPairs, notif: bytes | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.num_segments = len(pairs)
        self.nbytes = pairs.nbytes
        self._transport = transport
        self._peer = peer
        self._requests: list[_Request] = []
        self._late_notif: bytes | None = None  # sent after all requests finish (multi-group posts)
        self._prefailed = np.zeros(0, dtype=np.int64)  # rows never posted: remote region released
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()
        self._t0 = time.perf_counter()
        self.report: TransferReport | None = None
        self._error_kind: type[TransferError] = TransferError

    def poll(self) -> TransferStatus:
        return TransferStatus.PENDING if self.report is None else self.report.status

    async def wait(self, timeout: float | None = None) -> TransferReport:
        if timeout is None:
            timeout = self._transport.timeout
        if self.report is None:
            try:
                await asyncio.wait_for(asyncio.shield(self._future), timeout)
            except asyncio.TimeoutError:
                self._finish(TransferStatus.ABORTED, "timed out", TransferTimeout, abort=True,
                             message=f"nixl transfer to {self._peer.name} did not complete within {timeout}s")
        report = self.report
        assert report is not None
        if report.status is TransferStatus.DONE:
            return report
        raise self._error_kind(report.error or "transfer failed", report)

    def abort(self) -> None:
        self._finish(TransferStatus.ABORTED, "aborted by the initiator", TransferAborted, abort=True)

    # -- called with the transport lock held ----------------------------------------------
    def _advance(self, agent: Any) -> bool:
        """Check in-flight requests; finish the transfer once all settled. True if anything changed."""
        changed = False
        for req in self._requests:
            if req.state == "PROC":
                try:
                    state = agent.check_xfer_state(req.handle)
                except Exception:  # NIXL raises (rather than answering ERR) when the peer disconnected
                    state = "ERR"
                if state != "PROC":
                    req.state = state
                    changed = True
                    self._transport._release_handle(req)
        if changed:
            self._settle(agent)
        return changed

    def _settle(self, agent: Any) -> None:
        """Finish the transfer if no request is in flight any more."""
        if self.report is not None or any(r.state == "PROC" for r in self._requests):
            return
        failed = [r for r in self._requests if r.state != "DONE"]
        if failed:
            rows = np.sort(np.concatenate([self._prefailed] + [r.rows for r in failed]))
            self._finish(TransferStatus.FAILED, "NIXL reported the transfer failed (peer unreachable or gone)",
                         PeerLost, failed_rows=rows)
            return
        if len(self._prefailed):
            self._finish(TransferStatus.FAILED, f"{len(self._prefailed)} segment(s) failed: their remote region "
                         "was released at the target (stale descriptor); the other segments landed",
                         TransferError, failed_rows=self._prefailed)
            return
        if self._late_notif is not None:
            try:
                agent.send_notif(self._peer.state, NOTIF_PREFIX + self._late_notif)
            except Exception as exc:  # the bytes landed, but the target will not hear of it
                self._finish(TransferStatus.FAILED, f"notification failed: {exc}", PeerLost)
                return
        self._finish(TransferStatus.DONE, None, TransferError)

    def _finish(self, status: TransferStatus, error: str | None, kind: type[TransferError], *,
                abort: bool = False, failed_rows: np.ndarray | None = None, message: str | None = None) -> None:
        with self._transport._lock:
            if self.report is not None:
                return
            if abort:
                for req in self._requests:
                    if req.state == "PROC":  # abandoned, not cancelled: released once NIXL settles it
                        req.state = "ERR"
                        self._transport._zombies.append(req)
            if status is not TransferStatus.DONE and failed_rows is None:
                failed_rows = np.arange(self.num_segments)
            failed = tuple(failed_rows.tolist()) if failed_rows is not None else ()
            self.report = TransferReport(status, self.num_segments, self.nbytes, failed,
                                         message or error, time.perf_counter() - self._t0)
            self._error_kind = kind
            self._transport._inflight.discard(self)
        try:
            self._loop.call_soon_threadsafe(_resolve, self._future)
        except RuntimeError:  # the posting loop is closed
            pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _lookup(ids: np.ndarray, table: dict[int, tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (base address, device) of the region each row names."""
    if len(ids) and (ids == ids[0]).all():
        addr, dev = table[int(ids[0])]
        return np.full(len(ids), addr, dtype=np.int64), np.full(len(ids), dev, dtype=object)
    uniq, inv = np.unique(ids, return_inverse=True)
    addrs = np.array([table[int(u)][0] for u in uniq], dtype=np.int64)
    devs = np.array([table[int(u)][1] for u in uniq], dtype=object)
    return addrs[inv], devs[inv]


def _group_rows(l_dev: np.ndarray, r_dev: np.ndarray) -> list[tuple[tuple[str, str], np.ndarray]]:
    if (l_dev == l_dev[0]).all() and (r_dev == r_dev[0]).all():
        return [((l_dev[0], r_dev[0]), np.arange(len(l_dev)))]
    keys = np.array([f"{a}|{b}" for a, b in zip(l_dev, r_dev, strict=True)], dtype=object)
    out = []
    for key in dict.fromkeys(keys.tolist()):
        a, _, b = key.partition("|")
        out.append(((a, b), np.flatnonzero(keys == key)))
    return out


def _descs(addr: np.ndarray, nbytes: np.ndarray, devid: int) -> np.ndarray:
    out = np.empty((len(addr), 3), dtype=np.uint64)  # NIXL's Nx3 (addr, len, device id) form
    out[:, 0] = addr
    out[:, 1] = nbytes
    out[:, 2] = devid
    return out
