"""In-process transport: peers are other ``LoopbackTransport`` objects in this process.

The descriptor names the peer; ``connect`` finds it in a process-wide table.
A post copies every segment with ``memmove`` right away (segments the target no
longer has are reported failed), then delivers the notification. Meant for tests
and for engines that share a process.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
import weakref

from .base import Peer, Transport
from .descriptor import decode_descriptor, encode_descriptor
from .errors import ConnectError, DescriptorError, PeerLost
from .notifications import Notification
from .segments import LOCAL_OFFSET, LOCAL_REGION, NBYTES, REMOTE_OFFSET, REMOTE_REGION, SegmentPairs
from .transfer import ThreadTransfer, Transfer

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakValueDictionary[str, LoopbackTransport] = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()
_transfer_ids = itertools.count(1)


class LoopbackTransport(Transport):
    kind = "loopback"
    supports_read = True

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        with _LIVE_LOCK:
            if self.name in _LIVE:
                raise ValueError(f"a loopback transport named {self.name!r} already exists in this process")
            _LIVE[self.name] = self

    @classmethod
    def is_available(cls) -> bool:
        return True

    def descriptor(self) -> bytes:
        self._check_open()
        return encode_descriptor(self, {"pid_local": True})

    async def connect(self, descriptor: bytes) -> Peer:
        self._check_open()
        desc = decode_descriptor(descriptor, self.kind)
        target = _LIVE.get(desc.name)
        if target is None or target.is_closed:
            raise ConnectError(f"loopback peer {desc.name!r} does not exist in this process (closed or never created)")
        if target.instance != desc.instance:
            raise DescriptorError(f"stale descriptor: loopback peer {desc.name!r} was re-created; ask it for a new one")
        return Peer(desc.name, desc.regions, state=weakref.ref(target))

    async def post_write(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        return self._post(peer, pairs, notif, is_write=True)

    async def post_read(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        return self._post(peer, pairs, notif, is_write=False)

    def _post(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None, is_write: bool) -> Transfer:
        self._validate(peer, pairs)
        target: LoopbackTransport | None = peer.state() if peer.state is not None else None
        if target is None or target.is_closed:
            raise PeerLost(f"loopback peer {peer.name!r} is closed")
        t = pairs.table
        transfer = ThreadTransfer(next(_transfer_ids), len(t), pairs.nbytes)
        failed: list[int] = []
        remote = target.regions
        for i, (lr, lo, rr, ro, n) in enumerate(
            t[:, [LOCAL_REGION, LOCAL_OFFSET, REMOTE_REGION, REMOTE_OFFSET, NBYTES]].tolist()
        ):
            dst_region = remote.get(rr)
            if dst_region is None or ro + n > dst_region.nbytes:
                failed.append(i)
                continue
            local = self.regions[lr].addr + lo
            other = dst_region.addr + ro
            if is_write:
                ctypes.memmove(other, local, n)
            else:
                ctypes.memmove(local, other, n)
        if failed:
            transfer.part_done(failed, f"target {peer.name!r} has no such region or range (released?)")
            return transfer
        if notif is not None:
            target.notifications.push(Notification(self.name, bytes(notif)))
        transfer.part_done()
        return transfer

    async def fence(self, peer_name: str, timeout: float = 10.0) -> bool:
        """Nothing is ever in flight: a post copies every byte before it returns."""
        self._check_open()
        return True

    async def aclose(self) -> None:
        if self.is_closed:
            return
        with _LIVE_LOCK:
            if _LIVE.get(self.name) is self:
                del _LIVE[self.name]
        await super().aclose()
