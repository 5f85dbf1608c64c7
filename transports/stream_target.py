"""Target side of the stream transports: accept streams, land frames, ack them.

One accept thread per transport and one receiver thread per stream. A receiver
validates each frame's rows against the live regions (pinning them while it
writes), receives the payload straight into the target memory (``recv_into``;
rejected rows go to a scratch buffer) or pulls it with cross-memory attach,
delivers the notification once every part of the transfer has landed, then acks
with the rows that failed.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .cma import CmaCopier, cma_probe
from .notifications import Notification
from .pins import RegionPins, region_addresses
from .wire import (
    ACK,
    ACK_MAGIC,
    FRAME,
    FRAME_MAGIC,
    MAX_HELLO,
    MODE_CMA,
    OP_READ,
    OP_WRITE,
    TABLE_COLUMNS,
    ProtocolError,
    discard,
    recv_exact,
    recv_json,
    recv_views,
    send_json,
    send_views,
)

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
SCRATCH_BYTES = 1 << 20
MAX_ROWS = 1 << 22  # rows per frame; a larger count is not a pdx peer


class StreamServer:
    """Listens on ``listener`` and lands frames into the regions in ``pins``."""

    def __init__(
        self,
        listener: socket.socket,
        wake: Callable[[], None],
        name: str,
        instance: str,
        pins: RegionPins,
        deliver: Callable[[Notification], None],
        allow_cma: bool,
        copy_threads: int = 1,
    ) -> None:
        self._listener = listener
        self._wake = wake  # connects to the listener once, to unblock accept()
        self.name = name
        self.instance = instance
        self.pins = pins
        self.deliver = deliver  # hands a notification to the transport's box
        self.allow_cma = allow_cma
        self._copier = CmaCopier(copy_threads, name)  # threads that pull one large cma frame
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._senders: dict[socket.socket, str] = {}  # stream -> initiator name, once its hello is read
        self._fenced: set[socket.socket] = set()  # streams being dropped by a fence: land nothing more
        self._parts: dict[tuple[str, int], list[Any]] = {}  # (session, transfer) -> [parts left, failed, notif]
        self._closing = False
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"pdx-accept-{name}", daemon=True)
        self._accept_thread.start()

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            conns = list(self._conns.items())
        try:
            self._wake()
        except OSError:
            pass
        self._accept_thread.join(10)
        self._listener.close()
        for sock, _ in conns:
            _shutdown(sock)
        for _, thread in conns:
            thread.join(10)
        self._copier.close()

    def break_connections(self) -> None:
        """Drop every stream (frees pins held by a stalled initiator)."""
        with self._lock:
            socks = list(self._conns)
        for sock in socks:
            _shutdown(sock)

    def fence(self, peer_name: str) -> list[threading.Thread]:
        """Drop every stream of ``peer_name`` and return their receiver threads: once those have
        ended, no byte of that peer can land (a frame being received fails; one being pulled with
        cross-memory attach finishes its copy first) and none of its notifications is delivered."""
        with self._lock:
            conns = [(sock, thread) for sock, thread in self._conns.items() if self._senders.get(sock) == peer_name]
            self._fenced.update(sock for sock, _ in conns)
        for sock, _ in conns:
            _shutdown(sock)
        return [thread for _, thread in conns]

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                thread = threading.Thread(target=self._serve, args=(sock,), name=f"pdx-recv-{self.name}", daemon=True)
                self._conns[sock] = thread
            thread.start()

    # -- one stream -------------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        session = ""
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            hello = recv_json(sock)
            session, peer_name, pid = str(hello["session"]), str(hello["initiator"]), int(hello["pid"])
            if hello.get("instance") != self.instance:
                send_json(sock, {"ok": False, "error": f"stale descriptor: endpoint {self.name!r} was restarted; "
                                                       "ask it for a new descriptor"})
                return
            is_cma = bool(self.allow_cma and hello.get("probe") and
                          cma_probe(pid, int(hello["probe"][0]), bytes.fromhex(hello["probe"][1])))
            with self._lock:
                self._senders[sock] = peer_name
            send_json(sock, {"ok": True, "cma": is_cma})
            sock.settimeout(None)
            scratch = memoryview(bytearray(SCRATCH_BYTES))
            while True:
                self._serve_frame(sock, session, peer_name, pid if is_cma else 0, scratch)
        except (OSError, ProtocolError, KeyError, ValueError, TypeError) as exc:
            if not self._closing:
                logger.debug("stream from %s ended: %s", session or "?", exc)
        finally:
            sock.close()
            with self._lock:
                self._conns.pop(sock, None)
                self._senders.pop(sock, None)
                self._fenced.discard(sock)
                for key in [k for k in self._parts if k[0] == session]:
                    del self._parts[key]

    def _serve_frame(self, sock: socket.socket, session: str, peer_name: str, cma_pid: int, scratch: memoryview) -> None:
        """Land one frame; ``cma_pid`` is the initiator's pid when the handshake allowed cross-memory attach."""
        magic, op, mode, _, tid, part, num_parts, num_rows, notif_len = FRAME.unpack(recv_exact(sock, FRAME.size))
        if magic != FRAME_MAGIC or op not in (OP_WRITE, OP_READ) or num_rows > MAX_ROWS or notif_len > MAX_HELLO:
            raise ProtocolError("bad frame header")
        table = np.frombuffer(recv_exact(sock, num_rows * TABLE_COLUMNS * 8), dtype=np.int64).reshape(-1, TABLE_COLUMNS)
        notif = recv_exact(sock, notif_len) if notif_len else None
        rids, offs, sizes, peer_addrs = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
        if (mode == MODE_CMA and not cma_pid) or (sizes < 0).any():
            raise ProtocolError("frame asks for cross-memory attach that was not agreed, or has negative sizes")
        bad, pinned, regions = self.pins.acquire(rids, offs, sizes)
        error = "region not registered here (released?) or range outside it" if bad.any() else ""
        payload: list[memoryview] = []
        try:
            if mode == MODE_CMA:
                ok = np.flatnonzero(~bad) if error else slice(None)  # all rows valid (the common case): no gather
                local = region_addresses(rids, regions) + offs
                if len(local[ok]):
                    failed = self._copier.copy(cma_pid, local[ok], peer_addrs[ok], sizes[ok], op == OP_WRITE)
                    if failed.any():
                        bad[np.arange(len(bad))[ok][failed]] = True
                        error = "cross-memory copy failed (initiator memory gone?)"
            elif op == OP_WRITE:
                views: list[memoryview] = []
                for i, (r, o, n) in enumerate(zip(rids.tolist(), offs.tolist(), sizes.tolist(), strict=True)):
                    if bad[i]:
                        recv_views(sock, views)
                        views = []
                        discard(sock, n, scratch)
                    else:
                        views.append(regions[r][2][o : o + n])
                recv_views(sock, views)
            else:
                payload = [regions[r][2][o : o + n] for i, (r, o, n) in
                           enumerate(zip(rids.tolist(), offs.tolist(), sizes.tolist(), strict=True)) if not bad[i]]
            if op == OP_WRITE:  # bytes are in place: notify, then ack
                self._land(sock, session, peer_name, tid, num_parts, bool(bad.any()), notif)
                self._ack(sock, op, tid, part, bad, error, payload)
            else:  # the initiator has the bytes once the ack (and its payload) is sent
                self._ack(sock, op, tid, part, bad, error, payload)
                self._land(sock, session, peer_name, tid, num_parts, bool(bad.any()), notif)
        finally:
            self.pins.unpin(pinned)

    def _ack(
        self,
        sock: socket.socket,
        op: int,
        tid: int,
        part: int,
        bad: np.ndarray,
        error: str,
        payload: list[memoryview],
    ) -> None:
        failed = np.flatnonzero(bad).astype(np.int32)
        err = error.encode() if len(failed) else b""
        head = ACK.pack(ACK_MAGIC, op, 0, 0, tid, part, len(failed), len(err))
        send_views(sock, [head, failed.tobytes(), err, *payload])

    def _land(
        self,
        sock: socket.socket,
        session: str,
        peer_name: str,
        tid: int,
        num_parts: int,
        is_failed: bool,
        notif: bytes | None,
    ) -> None:
        """Count a landed part; notify once every part of the transfer landed without failure
        (never on a fenced stream: its transfer was given up)."""
        with self._lock:
            if sock in self._fenced:
                raise ProtocolError("stream fenced")
            if num_parts > 1:
                key = (session, tid)
                entry = self._parts.setdefault(key, [num_parts, False, None])
                entry[0] -= 1
                entry[1] = entry[1] or is_failed
                if notif is not None:
                    entry[2] = notif
                if entry[0] > 0:
                    return
                del self._parts[key]
                is_failed, notif = entry[1], entry[2]
            if notif is not None and not is_failed:
                self.deliver(Notification(peer_name, notif))


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
