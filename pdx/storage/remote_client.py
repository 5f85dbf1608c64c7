"""``RemoteStoreClient``: a store on another node, reached over a pdx transport.

    client = create_client("pdx-store://10.0.0.7:8301", token="...")
    n = client.lookup_prefix(keys)
    n = client.load(keys[:n], dst_views)     # one-sided transport read of the leased slots
    client.save(new_keys, src_views)         # reserve -> transport write -> commit
    client.close()

The same API and contract as ``StoreClient`` (read_views, write_views, flush, stats).
Lookups and leases go over a TCP control connection (``remote_channel.py``); chunk
bytes move between the store's arena, registered on its transport, and a registered
staging buffer here:

- load: ``acquire`` (read lease) -> ``post_read`` of every leased slot into staging ->
  ``release`` -> each chunk's xxh3 checked against the store's; the run ends at the
  first chunk that fails, so a partial or wrong chunk is never handed out.
- save: ``reserve`` (FILLING slots) -> chunks copied into staging -> ``post_write`` into
  the slots -> ``commit`` with checksums, which the store verifies before publishing; a
  failed write drops the control connection, and the store frees the slots.

A store that is slow or gone costs at most ``timeout_s`` per control call, and a transfer
``timeout_s`` plus its bytes at ``MIN_TRANSFER_BPS``; then it is a miss or a dropped save,
logged once and counted, as with the node-local client. ``close()`` releases the staging
regions, the transport, its loop thread and the sockets.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pdx.errors import StoreUnavailable
from pdx.storage.channel import StoreChannel
from pdx.storage.checksum import checksum
from pdx.storage.client import StoreClient
from pdx.storage.config import StoreConfig
from pdx.storage.messages import Abort, AcquireReply, Release, RemoteWelcome, ReserveReply
from pdx.storage.remote_channel import RemoteChannel, parse_address
from pdx.transports.loop_thread import LoopThread

if TYPE_CHECKING:
    from pdx.transports.base import MemoryRegion, Peer, Transport

logger = logging.getLogger(__name__)

MIN_TRANSFER_BPS = 100e6  # a transfer may take timeout_s plus its bytes at this rate
STAGING_ROUND = 1 << 20  # staging buffers are allocated in whole MiB
STAGING_KEEP = 4  # free staging buffers kept registered for reuse
TOKEN_ENV = "PDX_STORE_REMOTE_TOKEN"


@dataclass(frozen=True)
class StorePeer:
    """The store's transport endpoint as this client is connected to it."""

    peer: Peer
    region_id: int  # the store's arena region
    descriptor: bytes


@dataclass(frozen=True)
class _Staged:
    region: MemoryRegion
    rows: list[tuple[int, int, int, int, int]]  # SegmentPairs rows: staging -> arena slot
    store: StorePeer


class RemoteStoreClient(StoreClient):
    def __init__(self, config: StoreConfig):
        parse_address(config.socket)  # a malformed address is the caller's bug: ValueError now
        self._token = config.auth_token or os.environ.get(TOKEN_ENV, "")
        self._transport_options = dict(config.transport_options)
        self._loop = LoopThread("pdx-store-remote")
        self._transport: Transport | None = None
        self._store: StorePeer | None = None
        self._transport_lock = threading.Lock()
        self._free: list[MemoryRegion] = []  # staging regions not in use
        self._staged: dict[int, _Staged] = {}  # write lease -> its staging
        self._pool_lock = threading.Lock()
        super().__init__(config)
        self.verify_loads = False  # remote loads are always verified, in ``_leased``

    def _new_channel(self, retry_s: float) -> StoreChannel:
        return RemoteChannel(self.address, self._token, self.timeout_s, retry_s, self._attach_store)

    def _target(self, channel: StoreChannel) -> StorePeer | None:
        return channel.peer  # type: ignore[attr-defined, no-any-return]

    # -- reads -----------------------------------------------------------------------------
    @contextmanager
    def _read_leased(self, reply: AcquireReply, store: Any) -> Iterator[tuple[list[np.ndarray], list[int]]]:
        """The leased chunks read over the transport into staging, each checked; released here."""
        chunks = reply.chunks
        region: MemoryRegion | None = None
        copy_s, is_read = 0.0, False
        try:
            region = self._take(sum(n for _, n, _ in chunks))
            rows, pos = [], 0
            for offset, nbytes, _ in chunks:
                rows.append((region.region_id, pos, store.region_id, offset, nbytes))
                pos += nbytes
            is_read, copy_s = self._transfer(self._ctl, "read", store, rows)
        except Exception as exc:
            self._note_failure(exc)
        finally:
            with self._ctl_lock:
                if is_read:
                    self._ctl.send(Release.model_construct(lease=reply.lease, copy_s=copy_s, noreply=True))
                else:
                    self._ctl._fail()  # the store ends the connection's leases
        views: list[np.ndarray] = []
        checksums: list[int] = []
        if is_read and region is not None:
            pos = 0
            for _, nbytes, want in chunks:
                view = region.buffer[pos : pos + nbytes]
                pos += nbytes
                if checksum(view) != want:
                    self._add(num_corrupt=1)
                    logger.error("chunk %d read from %s failed its checksum; treating it as a miss",
                                 len(views), self.address)  # fmt: skip
                    break
                view.flags.writeable = False
                views.append(view)
                checksums.append(want)
        try:
            yield views, checksums
        finally:
            del views
            if region is not None and is_read:
                self._give(region)
            elif region is not None:
                self._discard(region)
            nbytes = sum(n for _, n, _ in chunks[: len(checksums)])
            self._add(num_loaded=len(checksums), loaded_bytes=nbytes, load_seconds=copy_s)

    # -- writes (hooks of StoreClient.write_views and its saver thread) ---------------------
    def _slot_views(
        self, channel: StoreChannel, reply: ReserveReply, store: Any, sizes: Sequence[int]
    ) -> list[np.ndarray | None] | None:
        """Staging views for the reserved slots, written to them at commit; None (the lease
        aborted) when no staging buffer can be had."""
        lease = reply.lease
        assert lease is not None
        pairs = [(o, int(s)) for o, s in zip(reply.offsets, sizes, strict=True)]
        try:
            region = self._take(sum(s for o, s in pairs if o is not None))
        except Exception as exc:
            self._note_failure(exc)
            channel.send(Abort.model_construct(lease=lease, noreply=True))
            return None
        views: list[np.ndarray | None] = []
        rows, pos = [], 0
        for offset, nbytes in pairs:
            if offset is None:
                views.append(None)
                continue
            views.append(region.buffer[pos : pos + nbytes])
            rows.append((region.region_id, pos, store.region_id, int(offset), nbytes))
            pos += nbytes
        with self._pool_lock:
            self._staged[lease] = _Staged(region, rows, store)
        return views

    def _commit(
        self, channel: StoreChannel, lease: int, views: list[np.ndarray | None], start: float
    ) -> int:
        with self._pool_lock:
            staged = self._staged.pop(lease)
        is_written = False
        try:
            is_written, _ = self._transfer(channel, "write", staged.store, staged.rows)
            if not is_written:
                channel._fail()  # the store frees the connection's reserved slots
                return 0
            return super()._commit(channel, lease, views, start)
        finally:
            if is_written:
                self._give(staged.region)
            else:
                self._discard(staged.region)

    def _abort(self, channel: StoreChannel, lease: int) -> None:
        with self._pool_lock:
            staged = self._staged.pop(lease, None)
        if staged is not None:
            self._give(staged.region)
        channel.send(Abort.model_construct(lease=lease, noreply=True))

    # -- transport ---------------------------------------------------------------------------
    def _transfer(
        self, channel: StoreChannel, op: str, store: StorePeer, rows: list[tuple[int, int, int, int, int]]
    ) -> tuple[bool, float]:
        """One batched read or write; (True, seconds) when every byte moved, else (False, 0)
        after dropping the transport peer; the caller then drops the control connection
        (``channel._fail()``, under the lock that guards it), which ends its leases."""
        if not rows:
            return True, 0.0
        from pdx.transports.errors import TransportError
        from pdx.transports.segments import SegmentPairs

        pairs = SegmentPairs.from_tuples(rows).merged()
        timeout = self.timeout_s + pairs.nbytes / MIN_TRANSFER_BPS
        try:
            report = self._loop.run(_post(self._transport, store.peer, pairs, op, timeout), timeout + 1.0)
        except (TransportError, TimeoutError) as exc:
            self._note_failure(StoreUnavailable(f"{op} of {pairs.nbytes} bytes from {self.address} failed: {exc}"))
            self._forget_store(store)
            return False, 0.0
        return True, report.seconds

    def _attach_store(self, hello: RemoteWelcome) -> StorePeer:
        """Called on each new control connection: connect the transport to the store's endpoint."""
        from pdx.transports import create_transport
        from pdx.transports.errors import TransportError

        kind, region_id = hello.transport, hello.region
        descriptor = base64.b64decode(hello.descriptor)
        with self._transport_lock:
            if self._store is not None and self._store.descriptor == descriptor:
                return StorePeer(self._store.peer, region_id, descriptor)
            try:
                if self._transport is None or self._transport.kind != kind:
                    self._close_transport()
                    options = _options(kind, self.timeout_s)
                    options.update(self._transport_options)
                    self._transport = self._loop.run(_create(create_transport, kind, options), 30.0)
                elif self._store is not None:  # the store restarted: forget its old endpoint
                    self._loop.run(self._transport.disconnect(self._store.peer), 30.0)
                self._store = None
                peer = self._loop.run(self._transport.connect(descriptor), self.timeout_s + 10.0)
            except TransportError as exc:
                raise StoreUnavailable(f"cannot reach the {kind} endpoint of {self.address}: {exc}") from exc
            self._store = StorePeer(peer, region_id, descriptor)
            return self._store

    def _forget_store(self, store: StorePeer) -> None:
        with self._transport_lock:
            if self._store is not None and self._store.peer is store.peer and self._transport is not None:
                self._store = None
                self._loop.run(self._transport.disconnect(store.peer), 30.0)

    def _close_transport(self) -> None:
        """Release the staging regions and close the transport (caller holds ``_transport_lock``)."""
        with self._pool_lock:
            free, self._free = self._free, []
        for region in free:
            region.release()
        transport, self._transport, self._store = self._transport, None, None
        if transport is not None:
            self._loop.run(transport.aclose(), 30.0)

    # -- staging buffers -----------------------------------------------------------------------
    def _take(self, nbytes: int) -> MemoryRegion:
        with self._pool_lock:
            fits = [r for r in self._free if r.nbytes >= nbytes and not r.is_released]
            if fits:
                region = min(fits, key=lambda r: r.nbytes)
                self._free.remove(region)
                return region
        transport = self._transport
        if transport is None:
            raise StoreUnavailable(f"no transport to {self.address} yet")
        size = -(-max(nbytes, 1) // STAGING_ROUND) * STAGING_ROUND
        return transport.allocate(size)

    def _give(self, region: MemoryRegion) -> None:
        with self._pool_lock:
            if region.is_released or self._is_closed:
                drop = [region]
            else:
                self._free.append(region)
                self._free.sort(key=lambda r: r.nbytes)
                drop = self._free[:-STAGING_KEEP] if len(self._free) > STAGING_KEEP else []
                del self._free[: len(drop)]
        for r in drop:
            r.release()

    def _discard(self, region: MemoryRegion) -> None:
        """Never reuse a buffer a failed transfer used (late bytes may still land in it); its
        release waits for the transport's I/O on it, so it runs off the caller's thread."""
        threading.Thread(target=region.release, name="pdx-store-discard", daemon=True).start()

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the saver, close the sockets, release staging and the transport. Idempotent."""
        if self._is_closed:
            return
        super().close()
        with self._transport_lock:
            self._close_transport()
        self._loop.stop()


def _options(kind: str, timeout_s: float) -> dict[str, Any]:
    from pdx.storage.remote_server import AUTO_MEDIA

    tcp = {"connect_timeout": timeout_s}
    if kind == "auto":
        return {"media": AUTO_MEDIA, "tcp": tcp}  # what the store offers; shm cannot cross hosts
    return tcp if kind == "tcp" else {}


async def _create(factory: Any, kind: str, options: dict[str, Any]) -> Transport:
    return factory(kind, **options)  # on the loop: transports that start tasks find it running


async def _post(transport: Any, peer: Peer, pairs: Any, op: str, timeout: float) -> Any:
    post = transport.post_read if op == "read" else transport.post_write
    transfer = await post(peer, pairs)
    return await transfer.wait(timeout)
