"""The transport interface: move bytes between registered memory of two endpoints.

A transport endpoint lives in one process. Who calls what:

Both sides
    ``register(buffer)`` / ``allocate(nbytes)``  -> ``MemoryRegion`` (owned; ``release()`` idempotent)
    ``descriptor()``                             -> bytes naming this endpoint and its regions; send to the peer
    ``aclose()``                                 releases every region, peer, transfer and task (idempotent)

Initiator (for KV: the prefill engine)
    ``await connect(peer_descriptor)``           -> ``Peer`` (reconnect with a newer descriptor to refresh it)
    ``await post_write(peer, pairs, notif)``     -> ``Transfer``: one-sided write, then ``notif`` to the target
    ``await post_read(peer, pairs, notif)``      -> ``Transfer`` (``supports_read`` says if the medium can)
    ``await transfer.wait(timeout)``             -> ``TransferReport`` (raises ``TransferError`` subclasses)
    ``transfer.wait_blocking(timeout)`` / ``transfer.poll()`` / ``transfer.abort()``

Target (for KV: the decode engine)
    ``await wait_notification(timeout, peer=None)`` -> ``Notification`` (each delivered exactly once)
    ``pop_notifications()``                      -> every notification received so far, removed from the box
    ``await fence(peer_name, timeout)``          -> bool: True once nothing more from that peer can land here

Segments never see tokens or layers: a ``SegmentPairs`` (``segments.py``) is a table of
``(local_region, local_offset, remote_region, remote_offset, nbytes)`` rows, int64.
A ``Notification`` (``notifications.py``) is sent only after every byte of its transfer
is in place at the target. A ``Transfer`` and its ``TransferReport`` are in ``transfer.py``.

Failure contract: a transfer completes, or fails with a report naming its failed
segment indices, within its timeout; a peer that dies gives ``PeerLost`` within a
bounded time; a bad descriptor or segment raises before anything is posted and
leaves both sides usable.

Fence: a transfer that timed out or was aborted may still be writing (no medium can take
back bytes already on their way). Before the target hands the destination blocks of such a
transfer back to its engine it calls ``fence(peer_name)``. True means: no byte sent by that
peer over any connection open when the fence began can land in this endpoint's memory after
the call returns (those connections are dropped, writes in progress have ended, their
notifications are never delivered; the peer's later posts fail with ``PeerLost`` until it
connects again). False means the medium could not confirm it within ``timeout``: the
blocks must stay out of use (quarantined) until a later ``fence`` returns True or the peer
is known dead. A fence never disturbs other peers. Which blocks a peer may write after it
reconnects is the business of the transfer's grant, not of the fence.
"""

from __future__ import annotations

import abc
import itertools
import logging
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RegistrationError, TransportClosed, TransportUnavailable
from .notifications import Notification, NotificationBox
from .segments import SegmentPairs
from .transfer import Transfer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionInfo:
    """What a peer needs to address one registered region (part of a descriptor)."""

    region_id: int
    nbytes: int
    device: str = "cpu"  # "cpu" or "cuda:N"
    extra: dict[str, Any] = field(default_factory=dict)  # transport-specific (shm name, IPC handle, ...)
    addr: int | None = None  # address in the peer's process; only one-sided media publish it


_region_ids = itertools.count(1)


def buffer_address(buffer: Any) -> tuple[int, int, str]:
    """(address, nbytes, device) of a numpy array, torch tensor, writable buffer, or (addr, nbytes) tuple."""
    if isinstance(buffer, tuple) and len(buffer) in (2, 3):
        addr, nbytes = int(buffer[0]), int(buffer[1])
        return addr, nbytes, (buffer[2] if len(buffer) == 3 else "cpu")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buffer, torch.Tensor):
        if not buffer.is_contiguous():
            raise RegistrationError("a registered tensor must be contiguous")
        dev = "cpu" if buffer.device.type == "cpu" else f"{buffer.device.type}:{buffer.device.index or 0}"
        return buffer.data_ptr(), buffer.numel() * buffer.element_size(), dev
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise RegistrationError("a registered array must be C-contiguous")
        if not buffer.flags.writeable:
            raise RegistrationError("a registered array must be writable")
        return buffer.ctypes.data, buffer.nbytes, "cpu"
    try:
        arr = np.frombuffer(buffer, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise RegistrationError(f"cannot register {type(buffer).__name__}: not a buffer") from exc
    if not arr.flags.writeable:
        raise RegistrationError(f"cannot register read-only {type(buffer).__name__}")
    return arr.ctypes.data, arr.nbytes, "cpu"


class MemoryRegion:
    """A registered memory region owned by one transport. ``release()`` is idempotent."""

    __slots__ = ("region_id", "addr", "nbytes", "device", "extra", "_transport", "_owner", "__weakref__")

    def __init__(
        self,
        transport: Transport,
        addr: int,
        nbytes: int,
        device: str = "cpu",
        owner: Any = None,  # keeps allocated/registered memory alive while registered
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.region_id = next(_region_ids)
        self.addr = addr
        self.nbytes = nbytes
        self.device = device
        self.extra = extra or {}
        self._transport: Transport | None = transport
        self._owner = owner

    @property
    def is_released(self) -> bool:
        return self._transport is None

    @property
    def buffer(self) -> Any:
        """The object backing the region (numpy array for ``allocate``d regions)."""
        return self._owner

    def info(self) -> RegionInfo:
        return RegionInfo(self.region_id, self.nbytes, self.device, dict(self.extra))

    def release(self) -> None:
        t, self._transport = self._transport, None
        if t is not None:
            t._deregister(self)
        self._owner = None

    def __del__(self) -> None:
        if self._transport is not None:
            try:
                logger.debug("region %d garbage-collected while registered", self.region_id)
                self.release()
            except Exception:  # never raise from __del__
                pass

    def __repr__(self) -> str:
        return f"MemoryRegion(id={self.region_id}, nbytes={self.nbytes}, device={self.device})"


class Peer:
    """A connected remote endpoint. Returned by ``Transport.connect``."""

    __slots__ = ("name", "regions", "state")

    def __init__(self, name: str, regions: dict[int, RegionInfo], state: Any = None) -> None:
        self.name = name
        self.regions = regions
        self.state = state  # transport-specific (socket, nixl agent name, ...)

    def region_sizes(self) -> dict[int, int]:
        return {rid: r.nbytes for rid, r in self.regions.items()}


class Transport(abc.ABC):
    """One endpoint of a medium. Create through ``transports.create_transport(name, **options)``."""

    #: registry name ("tcp", "shm", ...)
    kind: str = ""
    #: whether ``post_read`` is implemented
    supports_read: bool = False
    #: devices this transport can register ("cpu", "cuda")
    devices: tuple[str, ...] = ("cpu",)

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"{self.kind}-{uuid.uuid4().hex[:12]}"
        self.instance = uuid.uuid4().hex  # nonce: a descriptor of an earlier object of this name is stale
        self.regions: dict[int, MemoryRegion] = {}
        self.notifications = NotificationBox()
        self._closed = False

    # -- memory ---------------------------------------------------------------------
    def register(self, buffer: Any) -> MemoryRegion:
        """Register caller-owned memory (array, tensor, buffer or ``(addr, nbytes[, device])``).

        The caller keeps the memory alive until ``region.release()`` or ``aclose()``.
        Raises ``RegistrationError`` for memory this transport cannot use.
        """
        self._check_open()
        addr, nbytes, device = buffer_address(buffer)
        if nbytes <= 0:
            raise RegistrationError("cannot register an empty buffer")
        if device.split(":")[0] not in self.devices:
            raise RegistrationError(f"{self.kind} cannot register {device} memory (supports {self.devices})")
        region = MemoryRegion(self, addr, nbytes, device, owner=buffer)
        self._register(region)
        self.regions[region.region_id] = region
        return region

    def allocate(self, nbytes: int, device: str = "cpu") -> MemoryRegion:
        """Allocate and register memory the peer can write into (zero-filled, pre-touched).

        ``region.buffer`` is a uint8 numpy array over it. Transports whose medium needs
        special memory (shm) override this.
        """
        self._check_open()
        if device != "cpu":
            raise RegistrationError(f"{self.kind}.allocate supports only cpu memory")
        buf = np.zeros(nbytes, dtype=np.uint8)
        return self.register(buf)

    def _register(self, region: MemoryRegion) -> None:  # noqa: B027 (optional hook)
        """Backend hook: make the region usable (pin, register with the NIC, ...)."""

    def _deregister(self, region: MemoryRegion) -> None:
        """Backend hook, called once per region by ``MemoryRegion.release``."""
        self.regions.pop(region.region_id, None)

    def region_sizes(self) -> dict[int, int]:
        return {rid: r.nbytes for rid, r in self.regions.items()}

    # -- descriptors and peers ----------------------------------------------------------
    @abc.abstractmethod
    def descriptor(self) -> bytes:
        """Serialisable bytes a peer passes to ``connect``: this endpoint and its regions."""

    @abc.abstractmethod
    async def connect(self, descriptor: bytes) -> Peer:
        """Connect to the peer a descriptor names. Raises ``DescriptorError`` or ``ConnectError``."""

    async def disconnect(self, peer: Peer) -> None:  # noqa: B027 (optional hook)
        """Forget a peer; in-flight transfers to it fail. Idempotent."""

    # -- transfers ------------------------------------------------------------------
    @abc.abstractmethod
    async def post_write(
        self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None
    ) -> Transfer:
        """Write local segments into the peer's segments, then deliver ``notif`` there.

        Validates every pair first (``SegmentError``); returns once posted.
        """

    async def post_read(
        self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None
    ) -> Transfer:
        """Read the peer's segments into local segments (where ``supports_read``)."""
        raise TransportUnavailable(f"{self.kind} does not support reads; use post_write from the other side")

    # -- notifications (target side) -----------------------------------------------------
    async def wait_notification(
        self, timeout: float | None = None, peer: str | None = None, payload: bytes | None = None
    ) -> Notification:
        """Next notification (optionally from ``peer`` / equal to ``payload``); each is returned once.
        Raises ``TimeoutError``."""
        return await self.notifications.wait(timeout, peer, payload)

    def pop_notifications(self) -> list[Notification]:
        return self.notifications.pop_all()

    async def fence(self, peer_name: str, timeout: float = 10.0) -> bool:
        """Target side, after a transfer from ``peer_name`` timed out or was aborted: return True
        only once nothing that peer sent (over connections open now) can still land in this
        endpoint's memory; False if the medium cannot confirm that within ``timeout`` (keep the
        destination blocks out of use). Drops the peer's connections into this endpoint; other
        peers are not disturbed. ``peer_name`` is ``Notification.peer`` (the initiator's name).

        The default cannot confirm anything: a medium that can fence overrides it."""
        self._check_open()
        return False

    # -- lifetime -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"{self.kind} transport {self.name} is closed")

    def _validate(self, peer: Peer, pairs: SegmentPairs) -> None:
        self._check_open()
        pairs.validate(self.region_sizes(), peer.region_sizes())

    async def aclose(self) -> None:
        """Abort in-flight transfers, release every region and peer, stop tasks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for region in list(self.regions.values()):
            region.release()
        self.regions.clear()

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
