"""Cross-memory attach (``process_vm_readv``/``process_vm_writev``) for the shm target.

``CmaCopier.copy`` moves a frame's rows between this process and the initiator.
A frame of ``SPLIT_BYTES`` or more is cut into about ``4 * copy_threads`` pieces
of at least ``PIECE_BYTES`` (rows larger than a piece are cut); the calling
thread and ``copy_threads - 1`` helper threads claim pieces one at a time until
none is left, so the copy runs on several cores. A helper that is not scheduled
in time leaves its share to the others. The call returns only once no helper
touches the frame's memory any more (a helper preempted inside its piece makes
the caller wait for it: on an oversubscribed machine ``copy_threads=1`` is
steadier).
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IOV_MAX = 1024  # iovecs per syscall (Linux UIO_MAXIOV)
PIECE_BYTES = 1 << 20  # least bytes one thread claims at a time from a split frame
SPLIT_BYTES = 2 << 20  # frames smaller than this are copied by the calling thread alone

_libc: Any = None


def _cma() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        for fn in (libc.process_vm_readv, libc.process_vm_writev):
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        _libc = libc
    return _libc


class _Rows:
    """iovec tables for rows: ``local``/``remote`` addresses and ``nbytes`` per row."""

    __slots__ = ("fn", "pid", "nbytes", "ends", "liov", "riov", "lbase", "rbase")

    def __init__(self, pid: int, local: np.ndarray, remote: np.ndarray, nbytes: np.ndarray, is_read: bool) -> None:
        self.fn = _cma().process_vm_readv if is_read else _cma().process_vm_writev
        self.pid = pid
        self.nbytes = nbytes
        self.ends = np.cumsum(nbytes)
        self.liov = np.empty((len(nbytes), 2), dtype=np.uint64)  # struct iovec {base, len} per row
        self.riov = np.empty((len(nbytes), 2), dtype=np.uint64)
        self.liov[:, 0], self.liov[:, 1] = local, nbytes
        self.riov[:, 0], self.riov[:, 1] = remote, nbytes
        self.lbase, self.rbase = self.liov.ctypes.data, self.riov.ctypes.data

    def run(self, lo: int, hi: int, failed: np.ndarray) -> None:
        """Copy rows [lo, hi); mark the rows that failed in ``failed``."""
        for start in range(lo, hi, IOV_MAX):
            k = min(IOV_MAX, hi - start)
            want = int(self.ends[start + k - 1]) - (int(self.ends[start - 1]) if start else 0)
            if self.fn(self.pid, self.lbase + 16 * start, k, self.rbase + 16 * start, k, 0) == want:
                continue
            # partial transfers stop at an iovec boundary: redo row by row to find the bad ones
            for row in range(start, start + k):
                one = self.fn(self.pid, self.lbase + 16 * row, 1, self.rbase + 16 * row, 1, 0)
                failed[row] = one != int(self.nbytes[row])


def cma_copy(pid: int, local: np.ndarray, remote: np.ndarray, nbytes: np.ndarray, is_read: bool) -> np.ndarray:
    """Copy rows between this process (``local`` addresses) and ``pid`` (``remote`` addresses).

    ``is_read`` pulls remote -> local. Returns a bool mask of rows that failed.
    """
    failed = np.zeros(len(nbytes), dtype=bool)
    _Rows(pid, local, remote, nbytes, is_read).run(0, len(nbytes), failed)
    return failed


def cma_probe(pid: int, addr: int, expected: bytes) -> bool:
    """Whether this process may read ``pid``'s memory (same host, ptrace permission)."""
    buf = np.zeros(len(expected), dtype=np.uint8)
    try:
        failed = cma_copy(pid, np.array([buf.ctypes.data]), np.array([addr]), np.array([len(expected)]), True)
    except (OSError, AttributeError):
        return False
    return not failed[0] and buf.tobytes() == expected


def split_pieces(nbytes: np.ndarray, piece_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut rows into pieces of about ``piece_bytes``: whole rows where they fit, rows
    larger than a piece cut at multiples of ``piece_bytes`` of the running total.

    Returns ``(row, offset, length, bounds)``: for each sub-row its row, its offset in
    that row and its length; piece ``i`` is sub-rows ``bounds[i]:bounds[i + 1]``.
    """
    n = len(nbytes)
    ends = np.cumsum(nbytes)
    total = int(ends[-1])
    size = int(nbytes[0])
    if size % piece_bytes == 0 and bool((nbytes == size).all()):  # equal rows, a whole number of pieces each
        k = size // piece_bytes
        row = np.repeat(np.arange(n), k)
        offset = np.tile(np.arange(k, dtype=np.int64) * piece_bytes, n)
        return row, offset, np.full(n * k, piece_bytes, dtype=np.int64), np.arange(n * k + 1)
    marks = np.arange(piece_bytes, total, piece_bytes, dtype=np.int64)
    if int(nbytes.max()) <= piece_bytes:  # small rows: pieces of whole rows, nothing cut
        bounds = np.unique(np.concatenate(([0], np.searchsorted(ends, marks, side="right"), [n])))
        return np.arange(n), np.zeros(n, dtype=np.int64), nbytes, bounds
    cuts = np.union1d(ends - nbytes, marks)  # sorted sub-row starts
    row = np.searchsorted(ends, cuts, side="right")
    offset = cuts - (ends[row] - nbytes[row])
    length = np.diff(np.append(cuts, total))
    bounds = np.append(np.searchsorted(cuts, np.concatenate(([0], marks))), len(cuts))
    return row, offset, length, bounds


class _Job:
    """One split frame: pieces claimed under ``lock``; ``active`` counts helpers inside a piece."""

    def __init__(self, rows: _Rows, bounds: np.ndarray, failed: np.ndarray) -> None:
        self.rows = rows
        self.bounds = bounds.tolist()
        self.failed = failed  # per sub-row
        self.next = 0
        self.active = 0
        self.lock = threading.Condition(threading.Lock())

    def work(self, is_helper: bool) -> None:
        while True:
            with self.lock:
                i = self.next
                if i >= len(self.bounds) - 1:
                    return
                self.next += 1
                if is_helper:
                    self.active += 1
            lo, hi = self.bounds[i], self.bounds[i + 1]
            try:
                self.rows.run(lo, hi, self.failed)
            except Exception:  # report the piece failed rather than lose a thread or a frame
                logger.exception("cross-memory copy of rows %d..%d failed", lo, hi)
                self.failed[lo:hi] = True
            finally:
                if is_helper:
                    with self.lock:
                        self.active -= 1
                        self.lock.notify_all()

    def wait_helpers(self) -> None:
        with self.lock:
            self.lock.wait_for(lambda: self.active == 0)


class CmaCopier:
    """Copies frames with cross-memory attach on up to ``copy_threads`` threads (the caller's included)."""

    def __init__(self, copy_threads: int = 1, name: str = "") -> None:
        if copy_threads < 1:
            raise ValueError("copy_threads must be >= 1")
        self.copy_threads = copy_threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._helpers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._is_closed = False

    def copy(self, pid: int, local: np.ndarray, remote: np.ndarray, nbytes: np.ndarray, is_read: bool) -> np.ndarray:
        """Copy rows (see ``cma_copy``); returns a bool mask of rows that failed."""
        total = int(nbytes.sum())
        if self.copy_threads == 1 or total < SPLIT_BYTES or not self._start_helpers():
            return cma_copy(pid, local, remote, nbytes, is_read)
        piece_bytes = max(PIECE_BYTES, total // (4 * self.copy_threads) // PIECE_BYTES * PIECE_BYTES)
        row, offset, length, bounds = split_pieces(nbytes, piece_bytes)
        if len(row) == len(nbytes):  # nothing cut: the rows as they are
            rows = _Rows(pid, local, remote, nbytes, is_read)
        else:
            rows = _Rows(pid, local[row] + offset, remote[row] + offset, length, is_read)
        job = _Job(rows, bounds, np.zeros(len(row), dtype=bool))
        for _ in range(min(len(self._helpers), len(bounds) - 2)):
            self._jobs.put(job)
        try:
            job.work(is_helper=False)
        finally:
            job.wait_helpers()  # no helper touches this memory after we return
        failed = np.zeros(len(nbytes), dtype=bool)
        failed[row[job.failed]] = True
        return failed

    def _start_helpers(self) -> bool:
        with self._lock:
            if self._is_closed:
                return False
            while len(self._helpers) < self.copy_threads - 1:
                thread = threading.Thread(target=self._help, name=f"pdx-cma-{self._name}", daemon=True)
                thread.start()
                self._helpers.append(thread)
        return True

    def _help(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.work(is_helper=True)

    def close(self) -> None:
        """Stop the helper threads (idempotent); frames being copied finish first."""
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            helpers, self._helpers = self._helpers, []
        for _ in helpers:
            self._jobs.put(None)
        for thread in helpers:
            thread.join(10)
