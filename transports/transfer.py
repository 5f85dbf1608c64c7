"""A posted transfer and its outcome: the one completion code every transport uses.

A ``Transfer`` is settled exactly once, under its lock, with a ``TransferReport``
and the ``TransferError`` subclass ``wait`` raises when the report is not ok.
Who settles it depends on the medium; the subclass says only that:

    pushed  I/O threads, a poller or a library callback call ``settle``/``cancel`` from any
            thread (tcp, shm, loopback: ``ThreadTransfer``; nixl; ucx). Waiters are woken
            with ``call_soon_threadsafe``, no polling.
    polled  the subclass sets ``poll_interval`` and implements ``_check`` (cuda_ipc: an
            event query); ``poll`` and ``wait`` call it, ``wait`` on a sleep ladder.

``cancel`` (abort, timeout, peer disconnected, transport closed) settles a pending
transfer and then calls the subclass's ``_stop`` to end its I/O where the medium can.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import TransferAborted, TransferError, TransferTimeout

MIN_POLL_SLEEP = 20e-6  # first sleep of the ladder of a polled transfer's wait, doubling


class TransferStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class TransferReport:
    status: TransferStatus
    num_segments: int
    nbytes: int  # bytes requested, all segments
    failed_segments: tuple[int, ...] = ()  # row indices into the posted SegmentPairs
    error: str | None = None
    seconds: float = 0.0  # post to completion

    @property
    def ok(self) -> bool:
        return self.status is TransferStatus.DONE


class Transfer:
    """A posted batch of segment pairs. ``wait`` returns its report or raises a ``TransferError``.

    Called by the initiator: ``poll()``, ``await wait(timeout)``, ``wait_blocking(timeout)``,
    ``abort()``. Called by the transport that posted it: ``settle``, ``cancel``.
    """

    poll_interval: float | None = None  # polled media: longest sleep between ``_check`` calls

    def __init__(self, num_segments: int, nbytes: int, *, timeout: float | None = None,
                 label: str = "transfer") -> None:
        self.num_segments = num_segments
        self.nbytes = nbytes  # bytes requested, all segments
        self.timeout = timeout  # what ``wait`` uses when given none (None: wait forever)
        self.label = label  # names the transfer in its timeout message
        self._lock = threading.Lock()
        self._report: TransferReport | None = None
        self._error_class: type[TransferError] = TransferError
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._settled = threading.Event()
        self._t0 = time.perf_counter()

    # -- settling (any thread) ------------------------------------------------------------
    def settle(self, status: TransferStatus, error_class: type[TransferError] = TransferError,
               error: str | None = None, failed_segments: tuple[int, ...] | list[int] | None = None) -> bool:
        """Settle the transfer with its report, once; False if it was settled already.

        ``failed_segments`` defaults to none for ``DONE`` and every segment otherwise.
        """
        with self._lock:
            if self._report is not None:
                return False
            if failed_segments is None:
                failed = () if status is TransferStatus.DONE else tuple(range(self.num_segments))
            else:
                failed = tuple(failed_segments)
            self._report = TransferReport(status, self.num_segments, self.nbytes, failed,
                                          error, time.perf_counter() - self._t0)
            self._error_class = error_class
            waiters, self._waiters = self._waiters, []
        self._on_settled()
        self._settled.set()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_set_if_pending, fut)
            except RuntimeError:  # loop closed
                pass
        return True

    def cancel(self, status: TransferStatus, error_class: type[TransferError], error: str) -> bool:
        """Settle a pending transfer as failed or aborted, then stop its I/O (``_stop``)."""
        if not self.settle(status, error_class, error):
            return False
        self._stop()
        return True

    def _on_settled(self) -> None:  # noqa: B027 (optional hook)
        """Hook, once, right after the report is set (outside the lock): forget the transfer."""

    def _stop(self) -> None:  # noqa: B027 (optional hook)
        """Hook: end the I/O of a transfer cancelled before it finished, where the medium can."""

    def _check(self) -> None:  # noqa: B027 (optional hook)
        """Hook of polled media: look at the medium once and settle when the transfer finished."""

    # -- the initiator's API ------------------------------------------------------------------
    @property
    def report(self) -> TransferReport | None:
        return self._report

    def poll(self) -> TransferStatus:
        """Current status, without blocking."""
        if self._report is None:
            self._check()
        report = self._report
        return TransferStatus.PENDING if report is None else report.status

    def abort(self) -> None:
        """Stop the transfer; idempotent. Bytes already written at the target may be partial."""
        self.cancel(TransferStatus.ABORTED, TransferAborted, "aborted by the initiator")

    async def wait(self, timeout: float | None = None) -> TransferReport:
        """Wait for completion. Raises ``TransferTimeout`` (the transfer is aborted),
        ``PeerLost``, ``TransferAborted`` or ``TransferError``; each carries ``.report``."""
        timeout = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        sleep = MIN_POLL_SLEEP
        while True:
            if self._report is None:
                self._check()
            with self._lock:
                if self._report is not None:
                    break
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            remaining = None if deadline is None else deadline - loop.time()
            if self.poll_interval is not None:
                remaining = sleep if remaining is None else min(remaining, sleep)
                sleep = min(sleep * 2, self.poll_interval)
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                with self._lock:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))
                if deadline is not None and loop.time() >= deadline:
                    self._expire(timeout)
        return self._outcome()

    def wait_blocking(self, timeout: float | None = None) -> TransferReport:
        """The same as ``wait`` for threads that have no event loop."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = MIN_POLL_SLEEP
        while self._report is None:
            self._check()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._expire(timeout)
                break
            if self.poll_interval is not None:
                remaining = sleep if remaining is None else min(remaining, sleep)
                sleep = min(sleep * 2, self.poll_interval)
            self._settled.wait(remaining)
        return self._outcome()

    def _expire(self, timeout: float | None) -> None:
        self.cancel(TransferStatus.ABORTED, TransferTimeout, f"{self.label} did not complete within {timeout}s")

    def _outcome(self) -> TransferReport:
        report = self._report
        assert report is not None
        if report.ok:
            return report
        raise self._error_class(report.error or "transfer failed", report)


class ThreadTransfer(Transfer):
    """A transfer made of parts (one per stream) that I/O threads complete; settled once every
    part reported, or earlier by a lost connection, ``abort`` or a timeout. ``on_done`` runs once,
    in the thread of the last part, when no part's I/O touches memory any more."""

    def __init__(self, transfer_id: int, num_segments: int, nbytes: int, num_parts: int = 1,
                 on_done: Callable[[ThreadTransfer], None] | None = None) -> None:
        super().__init__(num_segments, nbytes)
        self.transfer_id = transfer_id
        self._parts_left = num_parts
        self._failed: list[int] = []
        self._errors: list[str] = []
        self._on_done = on_done
        self._parts_lock = threading.Lock()

    def part_done(self, failed: list[int] | None = None, error: str | None = None) -> None:
        """One part finished; ``failed`` are segment indices of the whole transfer."""
        with self._parts_lock:
            if failed:
                self._failed.extend(failed)
            if error:
                self._errors.append(error)
            is_last = self._take_part()
        if not is_last:
            return
        if self._failed:
            msg = f"{len(self._failed)} of {self.num_segments} segments failed at the target"
            if self._errors:
                msg += ": " + "; ".join(sorted(set(self._errors)))
            self._run_on_done()  # before waiters wake: a woken caller may release the regions at once
            self.settle(TransferStatus.FAILED, TransferError, msg, sorted(set(self._failed)))
        else:
            self._run_on_done()
            self.settle(TransferStatus.DONE)

    def part_failed(self, error_class: type[TransferError], message: str) -> None:
        """One part's I/O ended with its connection: fail the transfer now (waiters wake);
        ``on_done`` runs once every part has reported."""
        with self._parts_lock:
            is_last = self._take_part()
            failed = sorted(set(self._failed)) or None  # segments the target already reported
        if is_last:
            self._run_on_done()
        self.settle(TransferStatus.FAILED, error_class, message, failed)

    def fail(self, error_class: type[TransferError], message: str) -> None:
        """Fail the whole transfer when none of its parts is doing I/O (e.g. never submitted)."""
        with self._parts_lock:
            self._parts_left = 0
            failed = sorted(set(self._failed)) or None
        self._run_on_done()
        self.settle(TransferStatus.FAILED, error_class, message, failed)

    def _take_part(self) -> bool:
        self._parts_left -= 1
        return self._parts_left <= 0

    def _run_on_done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self)


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

