"""Initiator side of the stream transports: one connection to a target, N streams.

Each stream has a sender thread (frames, with the payload gathered straight from
the registered memory by ``sendmsg``) and a reader thread (acks, in order; read
payloads land straight in local memory). A small payload-free frame (``cma``
mode) posted to an idle stream is sent by the posting thread itself: the
target is waiting for it and the socket buffer is empty, so the send cannot
block, and the post skips a thread wake-up. A post larger than ``split_bytes``
is cut into one part per stream. A dead stream fails every transfer on the
connection with ``PeerLost``; the reader fails in-flight parts only after the
sender has stopped, so memory is never touched after its transfer settled.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import threading
from dataclasses import dataclass

import numpy as np

from .errors import PeerLost, TransferAborted, TransferError
from .transfer import ThreadTransfer
from .wire import (
    ACK,
    ACK_MAGIC,
    FRAME,
    FRAME_MAGIC,
    MODE_CMA,
    MODE_INLINE,
    OP_READ,
    OP_WRITE,
    ProtocolError,
    recv_exact,
    recv_views,
    send_views,
)

logger = logging.getLogger(__name__)


@dataclass
class Part:
    """One frame: the rows of a transfer that travel on one stream."""

    transfer: ThreadTransfer
    op: int
    mode: int
    part: int
    num_parts: int
    rows: np.ndarray  # global row index of each wire row
    table: np.ndarray  # int64 [n, 4] wire table
    local: list[memoryview]  # local bytes of each wire row
    notif: bytes | None


INLINE_FRAME_BYTES = 64 << 10  # frames up to this size may be sent by the posting thread


class Stream:
    def __init__(self, sock: socket.socket, conn: StreamConnection, index: int) -> None:
        self.sock = sock
        self.conn = conn
        self.queue: queue.SimpleQueue[Part | None] = queue.SimpleQueue()
        self.inflight: collections.deque[Part] = collections.deque()
        # guards the socket's send side: at most one thread sends, frames leave in submit order
        self._cond = threading.Condition(threading.Lock())
        self._num_queued = 0  # parts put on the queue and not yet sent
        self._is_sending = False
        self._is_dead = False  # the reader stopped: nothing may join ``inflight`` any more
        tag = f"{conn.peer_name}/{index}"
        self.sender = threading.Thread(target=self._send_loop, name=f"pdx-send-{tag}", daemon=True)
        self.reader = threading.Thread(target=self._read_loop, name=f"pdx-ack-{tag}", daemon=True)
        self.sender.start()
        self.reader.start()

    def submit(self, part: Part) -> None:
        """Send the part's frame now when the stream is idle and the frame small and payload-free,
        else queue it for the sender thread."""
        is_inline = part.mode == MODE_CMA and part.table.nbytes + len(part.notif or b"") <= INLINE_FRAME_BYTES
        with self._cond:
            if self._is_dead:
                is_inline = False  # the sender thread drains it and fails it
            elif is_inline and not (self._num_queued or self._is_sending or self.inflight):
                self._is_sending = True
                self.inflight.append(part)  # before sending: the ack may come back at once
            else:
                is_inline = False
            if not is_inline:
                self._num_queued += 1
                self.queue.put(part)
                return
        try:
            send_views(self.sock, _frame(part))
        except OSError as exc:
            self.conn.lose(f"sending to {self.conn.peer_name!r} failed: {exc}")
        finally:
            with self._cond:
                self._is_sending = False
                self._cond.notify_all()

    def _send_loop(self) -> None:
        try:
            while True:
                part = self.queue.get()
                if part is None:
                    return
                with self._cond:
                    self._cond.wait_for(lambda: not self._is_sending)
                    self._num_queued -= 1
                    self._is_sending = True
                    self.inflight.append(part)  # before sending: the ack may come back at once
                try:
                    send_views(self.sock, _frame(part))
                finally:
                    with self._cond:
                        self._is_sending = False
                        self._cond.notify_all()
        except OSError as exc:
            self.conn.lose(f"sending to {self.conn.peer_name!r} failed: {exc}")
        finally:
            self._drain_queue()

    def _drain_queue(self) -> None:
        while True:
            try:
                part = self.queue.get_nowait()
            except queue.Empty:
                return
            if part is not None:
                part.transfer.part_failed(self.conn.lost_error, self.conn.lost_reason or "connection closed")

    def _read_loop(self) -> None:
        try:
            while True:
                head = recv_exact(self.sock, ACK.size)
                magic, op, _, _, tid, part_index, num_failed, err_len = ACK.unpack(head)
                if magic != ACK_MAGIC or not self.inflight:
                    raise ProtocolError("unexpected ack from the target")
                part = self.inflight[0]
                if (part.transfer.transfer_id, part.part) != (tid, part_index):
                    raise ProtocolError("ack out of order")
                failed = np.frombuffer(recv_exact(self.sock, num_failed * 4), dtype=np.int32)
                error = recv_exact(self.sock, err_len).decode(errors="replace") if err_len else None
                if op == OP_READ and part.mode == MODE_INLINE:
                    is_bad = np.zeros(len(part.local), dtype=bool)
                    is_bad[failed] = True
                    recv_views(self.sock, [v for v, b in zip(part.local, is_bad.tolist(), strict=True) if not b])
                self.inflight.popleft()
                part.transfer.part_done(np.unique(part.rows[failed]).tolist() if num_failed else None, error)
        except (OSError, ProtocolError) as exc:
            self.conn.lose(f"connection to {self.conn.peer_name!r} lost: {exc}")
        finally:
            # fail what is still in flight, once no sender reads that memory
            with self._cond:
                self._is_dead = True
                self._cond.wait_for(lambda: not self._is_sending)
            self.queue.put(None)
            self.sender.join()
            while self.inflight:
                self.inflight.popleft().transfer.part_failed(self.conn.lost_error, self.conn.lost_reason or "connection closed")


class StreamConnection:
    """The initiator's connection to one target endpoint."""

    def __init__(self, peer_name: str, instance: str, mode: int, split_bytes: int) -> None:
        self.peer_name = peer_name
        self.instance = instance  # the target transport object's nonce
        self.mode = mode
        self.split_bytes = split_bytes
        self.streams: list[Stream] = []
        # re-entrant: ``submit`` holds it while a stream sends inline, and a failed send calls ``lose``
        self._lock = threading.RLock()
        self._next = 0
        self.lost_reason: str | None = None
        self.lost_error: type[TransferError] = PeerLost

    def start(self, socks: list[socket.socket]) -> None:
        self.streams = [Stream(s, self, i) for i, s in enumerate(socks)]

    @property
    def is_lost(self) -> bool:
        return self.lost_reason is not None

    def lose(self, reason: str, error_class: type[TransferError] = PeerLost) -> None:
        with self._lock:
            if self.lost_reason is None:
                self.lost_reason, self.lost_error = reason, error_class
                logger.info("%s", reason)
        for s in self.streams:
            try:
                s.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self, reason: str) -> None:
        self.lose(reason, TransferAborted)
        for s in self.streams:
            s.reader.join(10)
            s.sender.join(10)
            s.sock.close()

    def submit(self, parts: list[Part]) -> bool:
        """Queue the parts on the streams; False when the connection is already lost."""
        with self._lock:
            if self.lost_reason is not None:
                return False
            for p in parts:
                stream = self.streams[self._next % len(self.streams)]
                self._next += 1
                stream.submit(p)
        return True


def _frame(part: Part) -> list[object]:
    """The buffers of one frame: header, table, notification, inline write payload."""
    head = FRAME.pack(FRAME_MAGIC, part.op, part.mode, 0, part.transfer.transfer_id, part.part,
                      part.num_parts, len(part.table), len(part.notif or b""))
    bufs: list[object] = [head, part.table.tobytes(), part.notif or b""]
    if part.op == OP_WRITE and part.mode == MODE_INLINE:
        bufs.extend(part.local)
    return bufs


def split(nbytes: np.ndarray, num_parts: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cut rows into ``num_parts`` runs of about equal bytes: [(rows, start_in_row, length)]."""
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    total = int(ends[-1])
    cuts = [total * i // num_parts for i in range(num_parts + 1)]
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        if hi <= lo:
            continue
        rows = np.flatnonzero((ends > lo) & (starts < hi))
        first = np.maximum(starts[rows], lo)
        last = np.minimum(ends[rows], hi)
        out.append((rows, first - starts[rows], last - first))
    return out
