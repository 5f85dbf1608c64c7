"""``auto``: one endpoint over several media; each peer gets the fastest medium both share.

An ``AutoTransport`` owns one inner transport per medium in ``media`` (default
``("shm", "tcp")``; list ``nixl`` or ``cuda_ipc`` first to prefer them) and
registers every region with each inner transport that can take its device.
Its descriptor carries every inner descriptor plus the host id; ``connect``
walks ``media`` in order and takes the first medium the peer also offers and
can reach (``shm`` only on the same host), falling back to the next one when a
connection attempt fails. Posts translate region ids and go to the chosen inner
transport; its transfer (and its errors) are returned as they are.
Notifications of every medium land in this endpoint's one box.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import MemoryRegion, Peer, Transport
from .descriptor import decode_descriptor, encode_descriptor, host_id
from .errors import (
    ConnectError,
    DescriptorError,
    SegmentError,
    TransportError,
    TransportUnavailable,
)
from .segments import LOCAL_REGION, REMOTE_REGION, SegmentPairs
from .transfer import Transfer

logger = logging.getLogger(__name__)

DEFAULT_MEDIA = ("shm", "tcp")
SAME_HOST_ONLY = {"shm", "cuda_ipc", "loopback"}


def _usable(medium: str) -> type[Transport] | None:
    from . import transport_class

    try:
        cls = transport_class(medium)
    except TransportError:
        return None
    is_available = getattr(cls, "is_available", None)
    return cls if is_available is None or is_available() else None


def create_auto(**options: Any) -> AutoTransport:
    """``create_transport("auto", name=..., media=("nixl", "shm", "tcp"), tcp={"host": ...})``."""
    return AutoTransport(**options)


class AutoTransport(Transport):
    kind = "auto"
    supports_read = True  # where the chosen medium supports it

    def __init__(self, name: str | None = None, media: tuple[str, ...] | list[str] = DEFAULT_MEDIA, **options: Any) -> None:
        super().__init__(name)
        classes = {m: cls for m in media if (cls := _usable(m)) is not None}
        self.media = list(classes)
        if not self.media:
            raise TransportUnavailable(f"auto: none of the media {list(media)} is available here")
        self.inner: dict[str, Transport] = {}
        for medium, cls in classes.items():
            inner = cls(name=self.name, **options.get(medium, {}))
            inner.notifications = self.notifications  # every medium delivers into this box
            self.inner[medium] = inner
        self.devices = tuple(sorted({d for t in self.inner.values() for d in t.devices}))
        self._inner_regions: dict[int, dict[str, MemoryRegion]] = {}

    # -- memory -------------------------------------------------------------------------------
    def _register(self, region: MemoryRegion) -> None:
        inner_regions = {}
        try:
            for medium, inner in self.inner.items():
                if region.device.split(":")[0] in inner.devices:
                    inner_regions[medium] = inner.register((region.addr, region.nbytes, region.device))
        except TransportError:
            for r in inner_regions.values():
                r.release()
            raise
        region.extra["ids"] = {m: r.region_id for m, r in inner_regions.items()}
        self._inner_regions[region.region_id] = inner_regions

    def _deregister(self, region: MemoryRegion) -> None:
        super()._deregister(region)
        for r in self._inner_regions.pop(region.region_id, {}).values():
            r.release()

    # -- peers ------------------------------------------------------------------------------------
    def descriptor(self) -> bytes:
        self._check_open()
        media = {m: t.descriptor().decode() for m, t in self.inner.items()}
        return encode_descriptor(self, {"media": media}, {"media": list(self.inner)})

    async def connect(self, descriptor: bytes) -> Peer:
        self._check_open()
        desc = decode_descriptor(descriptor, self.kind)
        offered = desc.address.get("media")
        if not isinstance(offered, dict):
            raise DescriptorError("auto descriptor has no media table")
        errors = []
        for medium in self.media:
            if medium not in offered:
                continue
            if medium in SAME_HOST_ONLY and desc.host != host_id():
                continue
            try:
                inner_peer = await self.inner[medium].connect(str(offered[medium]).encode())
            except ConnectError as exc:
                errors.append(f"{medium}: {exc}")
                continue
            logger.debug("auto: %s reaches %s over %s", self.name, desc.name, medium)
            return Peer(desc.name, desc.regions, state=(medium, inner_peer))
        raise ConnectError(
            f"cannot reach auto peer {desc.name!r} over any shared medium (mine {self.media}, "
            f"its {sorted(offered)}): {'; '.join(errors) or 'none in common'}"
        )

    def medium(self, peer: Peer) -> str:
        """The medium ``connect`` chose for this peer."""
        return str(peer.state[0])

    async def disconnect(self, peer: Peer) -> None:
        medium, inner_peer = peer.state
        await self.inner[medium].disconnect(inner_peer)

    async def fence(self, peer_name: str, timeout: float = 10.0) -> bool:
        """The target does not know which medium a peer chose: every inner medium must confirm."""
        self._check_open()
        results = [await inner.fence(peer_name, timeout) for inner in self.inner.values()]
        return all(results)

    # -- transfers ------------------------------------------------------------------------------
    async def post_write(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        medium, inner_peer = peer.state
        return await self.inner[medium].post_write(inner_peer, self._translate(peer, pairs), notif)

    async def post_read(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        medium, inner_peer = peer.state
        return await self.inner[medium].post_read(inner_peer, self._translate(peer, pairs), notif)

    def _translate(self, peer: Peer, pairs: SegmentPairs) -> SegmentPairs:
        """Auto region ids -> the chosen medium's ids (validated against auto ids first)."""
        self._validate(peer, pairs)
        medium = peer.state[0]
        t = pairs.table.copy()
        for col, lookup, side in (
            (LOCAL_REGION, lambda rid: self._inner_regions[rid].get(medium), "local"),
            (REMOTE_REGION, lambda rid: peer.regions[rid].extra.get("ids", {}).get(medium), "remote"),
        ):
            for rid in np.unique(pairs.table[:, col]).tolist():
                inner = lookup(rid)
                if inner is None:
                    raise SegmentError(f"{side} region {rid} is not registered with {medium}, the medium chosen for "
                                       f"{peer.name!r} (device {self._device(peer, rid, side)})")
                t[pairs.table[:, col] == rid, col] = inner if isinstance(inner, int) else inner.region_id
        return SegmentPairs(t)

    def _device(self, peer: Peer, rid: int, side: str) -> str:
        return self.regions[rid].device if side == "local" else peer.regions[rid].device

    # -- lifetime ---------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self.is_closed:
            return
        for inner in self.inner.values():  # aborts in-flight transfers, releases inner regions
            await inner.aclose()
        await super().aclose()

