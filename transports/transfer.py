"""A ``Transfer`` completed from any thread (I/O threads, progress threads).

The thread that finishes the transfer calls ``complete``/``fail``; asyncio
waiters are woken with ``call_soon_threadsafe`` (no polling). A transfer made of
several parts (one per stream) completes when every part has reported.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from .base import Transfer, TransferReport, TransferStatus
from .errors import PeerLost, TransferAborted, TransferError, TransferTimeout

_ERRORS: dict[str, type[TransferError]] = {
    "PeerLost": PeerLost,
    "TransferAborted": TransferAborted,
    "TransferTimeout": TransferTimeout,
    "TransferError": TransferError,
}


class ThreadTransfer(Transfer):
    """Thread-safe transfer state; ``on_done`` runs once, in the completing thread."""

    def __init__(
        self,
        transfer_id: int,
        num_segments: int,
        nbytes: int,
        num_parts: int = 1,
        on_done: Callable[[ThreadTransfer], None] | None = None,
    ) -> None:
        self.transfer_id = transfer_id
        self.num_segments = num_segments
        self.nbytes = nbytes
        self._lock = threading.Lock()
        self._parts_left = num_parts
        self._failed: list[int] = []
        self._errors: list[str] = []
        self._status = TransferStatus.PENDING
        self._report: TransferReport | None = None
        self._error_kind = "TransferError"
        self._started = time.perf_counter()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._on_done = on_done
        self._is_settled = False  # every part reported (I/O no longer touches memory)

    # -- completion (any thread) -----------------------------------------------------
    def part_done(self, failed: list[int] | None = None, error: str | None = None) -> None:
        """One part finished; ``failed`` are segment indices of the whole transfer."""
        with self._lock:
            if failed:
                self._failed.extend(failed)
            if error:
                self._errors.append(error)
            self._parts_left -= 1
            if self._parts_left > 0:
                return
            self._is_settled = True
            if self._status is TransferStatus.PENDING:
                if self._failed:
                    self._finish_locked(TransferStatus.FAILED, "TransferError", self._describe_failure())
                else:
                    self._finish_locked(TransferStatus.DONE, None, None)
        self._after_settle()

    def part_failed(self, kind: str, message: str) -> None:
        """One part's I/O ended with its connection: fail the transfer now (waiters wake);
        it settles (``on_done``) once every part has reported."""
        with self._lock:
            if self._status is TransferStatus.PENDING:
                self._finish_locked(TransferStatus.FAILED, kind, message)
            self._parts_left -= 1
            if self._parts_left > 0:
                is_settled = False
            else:
                self._is_settled = is_settled = True
        if is_settled:
            self._after_settle()
        else:
            self._wake()

    def fail(self, kind: str, message: str) -> None:
        """Fail the whole transfer when none of its parts is doing I/O (e.g. never submitted)."""
        with self._lock:
            self._is_settled = True
            self._parts_left = 0
            if self._status is TransferStatus.PENDING:
                self._finish_locked(TransferStatus.FAILED, kind, message)
        self._after_settle()

    def abort(self) -> None:
        with self._lock:
            if self._status is not TransferStatus.PENDING:
                return
            self._finish_locked(TransferStatus.ABORTED, "TransferAborted", "transfer aborted by the initiator")
        self._wake()

    def _describe_failure(self) -> str:
        msg = f"{len(self._failed)} of {self.num_segments} segments failed at the target"
        if self._errors:
            msg += ": " + "; ".join(sorted(set(self._errors)))
        return msg

    def _finish_locked(self, status: TransferStatus, kind: str | None, error: str | None) -> None:
        self._status = status
        self._error_kind = kind or "TransferError"
        self._report = TransferReport(
            status=status,
            num_segments=self.num_segments,
            nbytes=self.nbytes,
            failed_segments=tuple(sorted(set(self._failed))) if status is TransferStatus.FAILED and self._failed
            else (tuple(range(self.num_segments)) if status is not TransferStatus.DONE else ()),
            error=error,
            seconds=time.perf_counter() - self._started,
        )

    def _after_settle(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self)
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_set_if_pending, fut)
            except RuntimeError:  # loop closed
                pass

    # -- Transfer API ------------------------------------------------------------------
    @property
    def is_settled(self) -> bool:
        return self._is_settled

    def poll(self) -> TransferStatus:
        return self._status

    @property
    def report(self) -> TransferReport | None:
        return self._report

    async def wait(self, timeout: float | None = None) -> TransferReport:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._report is None:
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            else:
                fut = None  # type: ignore[assignment]
        if fut is not None:
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                with self._lock:
                    if self._report is None:
                        self._finish_locked(
                            TransferStatus.ABORTED, "TransferTimeout", f"transfer did not complete within {timeout}s"
                        )
                self._wake()
        report = self._report
        assert report is not None
        if report.status is TransferStatus.DONE:
            return report
        raise _ERRORS.get(self._error_kind, TransferError)(report.error or "transfer failed", report)


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
