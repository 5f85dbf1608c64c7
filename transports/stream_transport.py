"""Common base of the socket transports (``tcp``, ``shm``): one protocol, two media.

A subclass says how to listen and how to open a stream to a peer address; this
class does registration (pinned regions), descriptors, connections, posts and
shutdown. See ``wire.py`` for the protocol, ``stream_initiator.py`` and
``stream_target.py`` for the two sides.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from typing import Any

import numpy as np

from .base import MemoryRegion, Peer, Transport
from .descriptor import Descriptor, decode_descriptor, encode_descriptor
from .errors import (
    ConnectError,
    DescriptorError,
    PeerLost,
    SegmentError,
    TransportUnavailable,
)
from .notifications import Notification
from .pins import RegionPins, region_addresses
from .segments import LOCAL_OFFSET, LOCAL_REGION, NBYTES, REMOTE_OFFSET, REMOTE_REGION, SegmentPairs
from .stream_initiator import Part, StreamConnection, split
from .stream_target import MAX_ROWS, StreamServer
from .transfer import ThreadTransfer, Transfer
from .wire import MAX_HELLO, MODE_CMA, MODE_INLINE, OP_READ, OP_WRITE

logger = logging.getLogger(__name__)

_transfer_ids = itertools.count(1)
RELEASE_TIMEOUT = 10.0  # seconds a region release waits for I/O on it before dropping the streams


class StreamTransport(Transport):
    supports_read = True
    allow_cma = False  # may the target pull/push with cross-memory attach
    copy_threads = 1  # threads the target uses to pull one large cma frame

    def __init__(
        self,
        name: str | None = None,
        num_streams: int = 1,
        split_bytes: int = 8 << 20,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(name)
        if num_streams < 1:
            raise ValueError("num_streams must be >= 1")
        self.num_streams = num_streams
        self.split_bytes = split_bytes  # posts at least this large are spread over the streams
        self.connect_timeout = connect_timeout
        self._pins = RegionPins()
        self._peers: dict[str, Peer] = {}
        try:
            listener, self._address = self._listen()
        except OSError as exc:
            raise TransportUnavailable(f"{self.kind} cannot listen: {exc}; pick another host/port") from exc
        self._server = StreamServer(
            listener, self._wake_listener, self.name, self.instance, self._pins, self._deliver, self.allow_cma,
            self.copy_threads,
        )

    def _deliver(self, note: Notification) -> None:
        self.notifications.push(note)  # looked up at delivery: ``auto`` shares its box with its media

    # -- medium hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def _listen(self) -> tuple[socket.socket, dict[str, Any]]:
        """A listening socket and the address peers connect to (goes into the descriptor)."""

    @abc.abstractmethod
    def _new_socket(self, address: dict[str, Any]) -> tuple[socket.socket, Any]:
        """A non-blocking socket and the address to connect it to (``address`` from a descriptor)."""

    def _check_reachable(self, desc: Descriptor) -> None:
        """Raise ``ConnectError`` when this medium cannot reach the peer at all."""

    def _wake_listener(self) -> None:
        sock, addr = self._new_socket(self._address)
        sock.setblocking(True)
        sock.settimeout(2)
        try:
            sock.connect(addr)
        finally:
            sock.close()

    # -- memory -----------------------------------------------------------------------------
    def _register(self, region: MemoryRegion) -> None:
        self._pins.add(region)

    def _deregister(self, region: MemoryRegion) -> None:
        super()._deregister(region)
        if not self._pins.remove(region.region_id, RELEASE_TIMEOUT):
            logger.warning("region %d is still in use after %ss; dropping the streams using it",
                           region.region_id, RELEASE_TIMEOUT)
            self._server.break_connections()
            for peer in list(self._peers.values()):
                peer.state.lose(f"region {region.region_id} was released while in use")
            self._pins.remove(region.region_id)

    # -- peers ----------------------------------------------------------------------------------
    def descriptor(self) -> bytes:
        self._check_open()
        return encode_descriptor(self, self._address, {"host_pid": os.getpid()})

    async def connect(self, descriptor: bytes) -> Peer:
        self._check_open()
        desc = decode_descriptor(descriptor, self.kind)
        self._check_reachable(desc)
        existing = self._peers.get(desc.name)
        if existing is not None:
            if existing.state.instance == desc.instance and not existing.state.is_lost:
                existing.regions = desc.regions  # refreshed descriptor, same endpoint
                return existing
            await self.disconnect(existing)
        session = uuid.uuid4().hex
        probe = np.frombuffer(os.urandom(16), dtype=np.uint8).copy()
        socks: list[socket.socket] = []
        modes = []
        try:
            for index in range(self.num_streams):
                sock, addr = self._new_socket(desc.address)
                socks.append(sock)
                hello = {"initiator": self.name, "instance": desc.instance, "session": session, "stream": index,
                         "pid": os.getpid(), "probe": [probe.ctypes.data, probe.tobytes().hex()]}
                reply = await asyncio.wait_for(_handshake(sock, addr, hello), self.connect_timeout)
                if not reply.get("ok"):
                    raise DescriptorError(str(reply.get("error", "the peer refused the connection")))
                modes.append(MODE_CMA if reply.get("cma") else MODE_INLINE)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            for s in socks:
                s.close()
            raise ConnectError(
                f"cannot reach {self.kind} peer {desc.name!r} at {desc.address}: {exc!r}; "
                "is it running? ask it for a fresh descriptor"
            ) from exc
        except BaseException:
            for s in socks:
                s.close()
            raise
        for s in socks:
            s.setblocking(True)
        conn = StreamConnection(desc.name, desc.instance, min(modes), self.split_bytes)
        conn.start(socks)
        peer = Peer(desc.name, desc.regions, conn)
        self._peers[desc.name] = peer
        logger.debug("%s connected to %s (%d streams, %s)", self.name, desc.name, len(socks),
                     "cma" if conn.mode == MODE_CMA else "inline")
        return peer

    async def disconnect(self, peer: Peer) -> None:
        if self._peers.get(peer.name) is peer:
            del self._peers[peer.name]
        if peer.state is not None:
            peer.state.close(f"disconnected from {peer.name!r}")

    # -- transfers ------------------------------------------------------------------------------
    async def post_write(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        return self._post(peer, pairs, notif, OP_WRITE)

    async def post_read(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        return self._post(peer, pairs, notif, OP_READ)

    def _post(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None, op: int) -> Transfer:
        self._validate(peer, pairs)
        conn: StreamConnection = peer.state
        if conn is None or conn.is_lost or self._peers.get(peer.name) is not peer:
            raise PeerLost(f"{self.kind} peer {peer.name!r} is gone ({conn.lost_reason if conn else 'never connected'}); "
                           "connect again with a fresh descriptor")
        if notif is not None and len(notif) > MAX_HELLO:
            raise SegmentError(f"notification of {len(notif)} bytes is too large (max {MAX_HELLO})")
        t = pairs.table
        if len(t) > MAX_ROWS:
            raise SegmentError(f"{len(t)} segments in one post; post at most {MAX_ROWS}")
        bad, pinned, regions = self._pins.acquire(t[:, LOCAL_REGION], t[:, LOCAL_OFFSET], t[:, NBYTES])
        if bad.any():
            self._pins.unpin(pinned)
            raise SegmentError(f"segment {int(np.flatnonzero(bad)[0])}: local region was released")
        total = int(t[:, NBYTES].sum())
        num_parts = len(conn.streams) if len(conn.streams) > 1 and total >= conn.split_bytes else 1
        cuts = split(t[:, NBYTES], num_parts) if num_parts > 1 else [(None, 0, t[:, NBYTES])]
        transfer = ThreadTransfer(next(_transfer_ids), len(t), total, len(cuts), on_done=lambda _: self._pins.unpin(pinned))
        local_addr = region_addresses(t[:, LOCAL_REGION], regions) + t[:, LOCAL_OFFSET]
        parts = []
        for index, (rows, start, length) in enumerate(cuts):
            sub = t if rows is None else t[rows]  # one part (the common case): no row gather
            wire = np.empty((len(sub), 4), dtype=np.int64)
            wire[:, 0] = sub[:, REMOTE_REGION]
            wire[:, 1] = sub[:, REMOTE_OFFSET] + start
            wire[:, 2] = length
            wire[:, 3] = (local_addr if rows is None else local_addr[rows]) + start
            views = [] if conn.mode == MODE_CMA else [
                regions[r][2][o : o + n] for r, o, n in
                zip(sub[:, LOCAL_REGION].tolist(), (sub[:, LOCAL_OFFSET] + start).tolist(), length.tolist(), strict=True)
            ]
            global_rows = np.arange(len(t)) if rows is None else rows
            parts.append(Part(transfer, op, conn.mode, index, len(cuts), global_rows, wire, views, notif if index == 0 else None))
        if not conn.submit(parts):
            transfer.fail(PeerLost, conn.lost_reason or "connection lost")
            raise PeerLost(f"{self.kind} peer {peer.name!r} is gone ({conn.lost_reason}); connect again")
        return transfer

    # -- fence (target side) ----------------------------------------------------------------------
    async def fence(self, peer_name: str, timeout: float = 10.0) -> bool:
        """Drop the peer's streams into this endpoint and wait until their receivers have ended."""
        self._check_open()
        threads = self._server.fence(peer_name)
        deadline = time.monotonic() + timeout
        delay = 0.001
        while any(t.is_alive() for t in threads):
            if time.monotonic() > deadline:
                logger.warning("%s: fence of %s not confirmed in %ss (a receive is still running)",
                               self.name, peer_name, timeout)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    # -- lifetime ---------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self.is_closed:
            return
        self._closed = True
        for peer in list(self._peers.values()):
            await self.disconnect(peer)
        self._server.close()
        for region in list(self.regions.values()):
            region.release()
        self.regions.clear()


async def _handshake(sock: socket.socket, addr: Any, hello: dict[str, Any]) -> dict[str, Any]:
    import json
    import struct

    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, addr)
    data = json.dumps(hello).encode()
    await loop.sock_sendall(sock, struct.pack("<I", len(data)) + data)
    head = await _recv_exact(loop, sock, 4)
    (n,) = struct.unpack("<I", head)
    if n > MAX_HELLO:
        raise ValueError("oversized hello reply")
    return json.loads(await _recv_exact(loop, sock, n))


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionResetError("peer closed during the handshake")
        buf += chunk
    return bytes(buf)
