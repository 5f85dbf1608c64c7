"""``StoreClient``: the storage tier as seen from inside an engine process.

    client = create_client("/tmp/pdx-store.sock")   # or StoreClient(StoreConfig(...))
    n = client.lookup_prefix(keys)              # leading chunks stored (L1, then L2)
    n = client.load(keys[:n], dst_views)        # copies straight out of the shared arena
    client.save(new_keys, src_views)            # background: reserve -> copy -> commit
    client.close()

Zero-copy variants for a connector that gathers/scatters paged KV itself:

    with client.read_views(keys) as views:      # read-only arena views, leased
        scatter(views[i], ...)                  # len(views) = leading chunks stored
    with client.write_views(keys, sizes) as views:
        gather(..., views[i])                   # None = skip (stored, in flight, no room)
                                                # committed with checksums at block end

Called from the engine's threads (scheduler and worker side). The contract:

- Nothing the store does raises into the engine. A store that is slow or gone makes
  ``lookup_prefix``/``load`` return 0 (a miss) within ``timeout_s`` (plus
  ``l2_budget_s`` when the store has L2), views come back empty/None and ``save``
  drops the chunks; the client logs once and counts (``stats()``). It reconnects by
  itself after a back-off (``retry_s``, doubling per failure in a row, at most 30 s).
- Bad arguments (mismatched lengths, a GPU or non-contiguous buffer, a read-only
  destination) raise ``ValueError``: they are bugs in the caller.
- Reads happen under a read lease: the chunks cannot be evicted or overwritten while
  being copied (or inside a ``read_views`` block; views must not outlive it). A chunk
  whose size differs from its destination ends the run of ``load``.
- ``save`` returns a ``Future[int]`` (chunks stored) at once. The source buffers
  must stay unchanged until it is done; a full save queue drops the batch (future
  result 0). Keys already stored or being saved elsewhere are skipped.

Keys are ``bytes`` or ``pdx.keys.ChunkKey``. Buffers are numpy arrays, CPU torch
tensors or any buffer-protocol object; each is one chunk's bytes, C-contiguous.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from pdx.errors import StorageError
from pdx.storage import messages as m
from pdx.storage.arena import SharedArena
from pdx.storage.buffers import byte_view, key_bytes
from pdx.storage.channel import StoreChannel
from pdx.storage.checksum import checksum
from pdx.storage.config import StoreConfig
from pdx.storage.metrics import ClientStats

logger = logging.getLogger(__name__)


def create_client(address: str | StoreConfig, **options: Any) -> StoreClient:
    """A client for ``address``: a unix socket path (this node's store, through its shared
    arena) or ``pdx-store://HOST:PORT`` (a store on another node, through a transport), or
    a whole ``StoreConfig``. ``options`` are ``StoreConfig`` fields; ``token`` is
    ``auth_token`` (None or empty: env ``PDX_STORE_REMOTE_TOKEN``)."""
    if "token" in options:
        options["auth_token"] = options.pop("token") or ""
    if isinstance(address, StoreConfig):
        config = replace(address, **options)
    else:
        config = StoreConfig(address, **options)
    if config.is_remote:
        from pdx.storage.remote_client import RemoteStoreClient

        return RemoteStoreClient(config)
    return StoreClient(config)


class StoreClient:
    def __init__(self, config: StoreConfig):
        self.config = config
        self.address = config.socket
        self.socket_path = config.socket.removeprefix("unix://")
        self.timeout_s = config.timeout_s
        self.l2_budget_s = config.l2_budget_s
        self.verify_loads = config.verify_loads
        retry_s = config.retry_s
        self._arena: SharedArena | None = None
        self._arena_lock = threading.Lock()
        self._ctl = self._new_channel(retry_s)
        self._ctl_lock = threading.Lock()  # one request at a time on the caller's socket
        self._saver = self._new_channel(retry_s)
        self._save_queue: queue.Queue[tuple[list[Any], list[np.ndarray], Future[int]]]
        self._save_queue = queue.Queue(config.save_queue)
        self._inflight: set[Future[int]] = set()
        self._stats: dict[str, float] = dict.fromkeys(ClientStats.__dataclass_fields__, 0)
        self._stats_lock = threading.Lock()
        self._is_down = False
        self._is_closed = False
        self._thread = threading.Thread(target=self._save_loop, name="pdx-store-saver", daemon=True)
        self._thread.start()

    # -- reads -----------------------------------------------------------------------------
    def lookup_prefix(self, keys: Sequence[Any]) -> int:
        """How many leading keys the store holds (L1, then L2). 0 when the store is away."""
        if not keys or self._is_closed:
            return 0
        request = m.Lookup.model_construct(keys=key_bytes(keys), budget_s=self.l2_budget_s)
        with self._ctl_lock:
            reply: m.LookupReply | None = self._call(self._ctl, request, l2=True)
        return 0 if reply is None else reply.num_chunks

    def load(self, keys: Sequence[Any], dst_views: Sequence[Any]) -> int:
        """Copy the leading stored chunks into ``dst_views``; returns how many were copied."""
        if len(keys) != len(dst_views):
            raise ValueError(f"{len(keys)} keys but {len(dst_views)} destination buffers")
        dsts = [byte_view(d, writable=True) for d in dst_views]
        num = 0
        with self._leased(keys) as (views, checksums):
            verify = self.verify_loads or self._ctl.must_verify  # known once connected
            for src, want, dst in zip(views, checksums, dsts, strict=False):
                if dst.nbytes != src.nbytes:
                    logger.warning(
                        "stored chunk has %d bytes, destination %d", src.nbytes, dst.nbytes
                    )
                    break
                np.copyto(dst, src)
                if verify and checksum(dst) != want:
                    self._add(num_corrupt=1)
                    logger.error(
                        "chunk %d of a load failed its checksum; treating it as a miss", num
                    )
                    break
                num += 1
        return num

    @contextmanager
    def read_views(self, keys: Sequence[Any]) -> Iterator[list[np.ndarray]]:
        """Read-only uint8 views of the leading stored chunks, leased for the block.

        Against a store with remote peers (``Welcome.verify_loads``) the run ends before the
        first view whose bytes fail their checksum when handed out."""
        with self._leased(keys) as (views, checksums):
            if self.verify_loads or self._ctl.must_verify:
                views = self._verified_prefix(views, checksums)
            yield views

    def _verified_prefix(self, views: list[np.ndarray], checksums: list[int]) -> list[np.ndarray]:
        for i, (view, want) in enumerate(zip(views, checksums, strict=True)):
            if checksum(view) != want:
                self._add(num_corrupt=1)
                logger.error("chunk %d of a load failed its checksum; treating it as a miss", i)
                return views[:i]
        return views

    @contextmanager
    def _leased(self, keys: Sequence[Any]) -> Iterator[tuple[list[np.ndarray], list[int]]]:
        """(views, checksums) of the leading stored chunks, read-leased for the block."""
        acquired = self._acquire(keys)
        if acquired is None:
            yield [], []
            return
        with self._read_leased(*acquired) as leased:
            yield leased

    @contextmanager
    def _read_leased(self, reply: m.AcquireReply, arena: Any) -> Iterator[tuple[list[np.ndarray], list[int]]]:
        """The leased chunks as views into ``arena`` (``_target``: [arena bytes] uint8); released at the end."""
        views, checksums = [], []
        for offset, nbytes, want in reply.chunks:
            view = arena[offset : offset + nbytes]
            view.flags.writeable = False
            views.append(view)
            checksums.append(want)
        start = time.perf_counter()
        try:
            yield views, checksums
        finally:
            copy_s = time.perf_counter() - start
            with self._ctl_lock:
                self._ctl.send(m.Release.model_construct(lease=reply.lease, copy_s=copy_s, noreply=True))
            nbytes = sum(v.nbytes for v in views)
            self._add(num_loaded=len(views), loaded_bytes=nbytes, load_seconds=copy_s)

    # -- writes ----------------------------------------------------------------------------
    def save(self, keys: Sequence[Any], src_views: Sequence[Any]) -> Future[int]:
        """Queue chunks for storing; the future gives how many were stored."""
        if len(keys) != len(src_views):
            raise ValueError(f"{len(keys)} keys but {len(src_views)} source buffers")
        views = [byte_view(s, writable=False) for s in src_views]
        fut: Future[int] = Future()
        if not keys:
            fut.set_result(0)
            return fut
        if self._is_closed:
            self._drop(fut, len(keys))
            return fut
        try:
            self._save_queue.put_nowait((list(keys), views, fut))
        except queue.Full:
            self._drop(fut, len(keys))
            return fut
        with self._stats_lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    @contextmanager
    def write_views(
        self, keys: Sequence[Any], sizes: Sequence[int]
    ) -> Iterator[list[np.ndarray | None]]:
        """Writable uint8 views of new slots (None = skip); committed at the end of the block.

        Fill every non-None view inside the block. On normal exit each is checksummed and
        committed; if the block raises, the slots are freed and nothing is stored.
        """
        if len(keys) != len(sizes):
            raise ValueError(f"{len(keys)} keys but {len(sizes)} sizes")
        with self._ctl_lock:
            lease, views = self._reserve(self._ctl, keys, sizes)
        start = time.perf_counter()
        try:
            yield views
        except BaseException:
            if lease is not None:
                with self._ctl_lock:
                    self._abort(self._ctl, lease)
            raise
        num = 0
        if lease is not None:
            with self._ctl_lock:
                num = self._commit(self._ctl, lease, views, start)
        self._add(num_save_dropped=len(keys) - num)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for queued saves; True if all finished in time."""
        with self._stats_lock:
            pending = list(self._inflight)
        _, not_done = wait_futures(pending, timeout=timeout_s)
        return not not_done

    def stats(self) -> ClientStats:
        with self._stats_lock:
            return ClientStats(**self._stats)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the saver (queued saves resolve to 0), close sockets, unmap. Idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        self._thread.join(timeout=max(1.0, 3 * self.timeout_s))
        while True:
            try:
                _, _, fut = self._save_queue.get_nowait()
            except queue.Empty:
                break
            fut.set_result(0)
        with self._ctl_lock:
            self._ctl.detach()
        self._saver.detach()
        with self._arena_lock:
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- saver thread ----------------------------------------------------------------------
    def _save_loop(self) -> None:
        while not self._is_closed:
            try:
                keys, srcs, fut = self._save_queue.get(timeout=0.1)
            except queue.Empty:
                continue
            num = 0
            try:
                lease, views = self._reserve(self._saver, keys, [s.nbytes for s in srcs])
                start = time.perf_counter()
                if lease is not None:
                    for src, view in zip(srcs, views, strict=True):
                        if view is not None:
                            np.copyto(view, src)
                    num = self._commit(self._saver, lease, views, start)
            except Exception:
                logger.exception("saving %d chunks failed; dropping them", len(keys))
            self._add(num_save_dropped=len(keys) - num)
            fut.set_result(num)

    def _reserve(
        self, channel: StoreChannel, keys: Sequence[Any], sizes: Sequence[int]
    ) -> tuple[int | None, list[np.ndarray | None]]:
        """Write-lease slots: (lease, a view to fill per key or None = skip), or (None, all None)."""
        reply: m.ReserveReply | None = self._call(channel, m.Reserve.model_construct(keys=key_bytes(keys), sizes=[int(s) for s in sizes]))
        target = self._target(channel)
        if reply is None or reply.lease is None or target is None:
            return None, [None] * len(keys)
        views = self._slot_views(channel, reply, target, sizes)
        return (reply.lease, views) if views is not None else (None, [None] * len(keys))

    def _slot_views(
        self, channel: StoreChannel, reply: m.ReserveReply, arena: Any, sizes: Sequence[int]
    ) -> list[np.ndarray | None] | None:
        """Views of the reserved slots in ``arena`` (``_target``: [arena bytes] uint8)."""
        return [
            None if offset is None else arena[offset : offset + size]
            for offset, size in zip(reply.offsets, sizes, strict=True)
        ]

    def _commit(
        self, channel: StoreChannel, lease: int, views: list[np.ndarray | None], start: float
    ) -> int:
        filled = [v for v in views if v is not None]
        checksums = [checksum(v) for v in filled]
        copy_s = time.perf_counter() - start
        reply: m.CommitReply | None = self._call(channel, m.Commit.model_construct(lease=lease, checksums=checksums, copy_s=copy_s))
        num = 0 if reply is None else reply.num_committed
        nbytes = sum(v.nbytes for v in filled) if num == len(filled) else 0
        self._add(num_saved=num, saved_bytes=nbytes, save_seconds=copy_s)
        return num

    def _abort(self, channel: StoreChannel, lease: int) -> None:
        channel.send(m.Abort.model_construct(lease=lease, noreply=True))

    # -- helpers ---------------------------------------------------------------------------
    def _new_channel(self, retry_s: float) -> StoreChannel:
        return StoreChannel(self.socket_path, self.timeout_s, retry_s, self._attach_arena)

    def _acquire(self, keys: Sequence[Any]) -> tuple[m.AcquireReply, Any] | None:
        """Read-lease the leading stored chunks over ``_ctl``: (reply, ``_target``), or None
        when nothing was leased (no keys, closed, the store is away or holds none of them)."""
        if not keys or self._is_closed:
            return None
        with self._ctl_lock:
            reply: m.AcquireReply | None = self._call(self._ctl, m.Acquire.model_construct(keys=key_bytes(keys), budget_s=self.l2_budget_s), l2=True)
            target = self._target(self._ctl)
        if reply is None or reply.lease is None or target is None:
            return None
        return reply, target

    def _target(self, channel: StoreChannel) -> Any:
        """What chunk bytes move through: here the arena mapping of the channel's store."""
        return channel.array

    def _call(self, channel: StoreChannel, request: m.Request, *, l2: bool = False) -> Any:
        """One request; its reply, or None (logged once, counted) if the store failed or refused it.

        Callers hold ``_ctl_lock`` for ``_ctl``; ``_saver`` belongs to the saver thread.
        """
        try:
            reply = channel.call(request, l2_budget_s=self.l2_budget_s if l2 else 0.0)
        except StorageError as exc:
            self._note_failure(exc)
            return None
        self._note_ok()
        return reply

    def _attach_arena(self, name: str, nbytes: int) -> SharedArena:
        with self._arena_lock:
            if self._arena is not None and self._arena.name == name and self._arena.is_open:
                return self._arena
            old, self._arena = self._arena, SharedArena.attach(name, nbytes)
            if old is not None:
                old.close()  # a restarted store: the old mapping goes once no view uses it
            return self._arena

    def _forget(self, fut: Future[int]) -> None:
        with self._stats_lock:
            self._inflight.discard(fut)

    def _drop(self, fut: Future[int], num: int) -> None:
        self._add(num_save_dropped=num)
        fut.set_result(0)

    def _add(self, **deltas: float) -> None:
        with self._stats_lock:
            for name, value in deltas.items():
                self._stats[name] += value

    def _note_failure(self, exc: Exception) -> None:
        self._add(num_errors=1)
        if not self._is_down:
            self._is_down = True
            logger.warning(
                "store unavailable (%s): loads miss and saves drop until it is back", exc
            )
        else:
            logger.debug("store still unavailable: %s", exc)

    def _note_ok(self) -> None:
        if self._is_down:
            self._is_down = False
            logger.info("store at %s is back", self.address)
