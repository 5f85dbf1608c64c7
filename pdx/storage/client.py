"""``StoreClient``: the storage tier as seen from inside an engine process.

    client = StoreClient("/tmp/pdx-store.sock")
    n = client.lookup_prefix(keys)              # leading chunks stored (L1, then L2)
    n = client.load(keys[:n], dst_views)        # copies straight out of the shared arena
    client.save(new_keys, src_views)            # background: reserve -> copy -> commit
    client.close()

Called from the engine's threads (scheduler and worker side). The contract:

- Nothing the store does raises into the engine. A store that is slow or gone makes
  ``lookup_prefix``/``load`` return 0 (a miss) within ``timeout_s`` (plus
  ``l2_budget_s`` when L2 is consulted) and ``save`` drop the chunks; the client logs
  once and counts (``stats()``). It reconnects by itself every ``retry_s``.
- Bad arguments (mismatched lengths, a GPU or non-contiguous buffer, a read-only
  destination) raise ``ValueError``: they are bugs in the caller.
- ``load`` copies under a read lease: the chunks cannot be evicted or overwritten
  while being copied. A chunk whose size differs from its destination ends the
  run (a layout mismatch is a miss, not a partial copy).
- ``save`` returns a ``Future[int]`` (chunks stored) at once. The source buffers
  must stay unchanged until it is done; a full save queue drops the batch
  (future result 0). Keys already stored or being saved elsewhere are skipped.

Keys are ``bytes`` or ``pdx.keys.ChunkKey``. Buffers are numpy arrays, CPU torch
tensors or any buffer-protocol object; each is one chunk's bytes, C-contiguous.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdx.errors import StorageError
from pdx.storage.arena import SharedArena
from pdx.storage.channel import StoreChannel
from pdx.storage.checksum import checksum

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientStats:
    num_loaded: int  # chunks copied out of the store
    num_saved: int  # chunks committed into the store
    num_save_dropped: int  # chunks not saved: queue full, store down or full
    num_errors: int  # calls that failed because the store was slow or gone
    num_corrupt: int  # loaded chunks that failed verification (verify_loads)
    loaded_bytes: int
    saved_bytes: int
    load_seconds: float  # time spent copying out of the arena
    save_seconds: float  # time spent copying into the arena (and checksumming)


class StoreClient:
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 1.0,
        l2_budget_s: float = 2.0,
        retry_s: float = 2.0,
        save_queue: int = 64,
        verify_loads: bool = False,
    ):
        self.socket_path = address.removeprefix("unix://")
        self.timeout_s = timeout_s
        self.l2_budget_s = l2_budget_s
        self.verify_loads = verify_loads
        self._arena: SharedArena | None = None
        self._arena_lock = threading.Lock()
        self._ctl = StoreChannel(self.socket_path, timeout_s, retry_s, self._attach_arena)
        self._ctl_lock = threading.Lock()
        self._saver = StoreChannel(self.socket_path, timeout_s, retry_s, self._attach_arena)
        self._save_queue: queue.Queue[tuple[list[Any], list[Any], Future[int]]] = queue.Queue(
            save_queue
        )
        self._inflight: set[Future[int]] = set()
        self._stats: dict[str, float] = dict.fromkeys(ClientStats.__dataclass_fields__, 0)
        self._stats_lock = threading.Lock()
        self._is_down = False
        self._is_closed = False
        self._thread = threading.Thread(target=self._save_loop, name="pdx-store-saver", daemon=True)
        self._thread.start()

    # -- engine API ----------------------------------------------------------------------
    def lookup_prefix(self, keys: Sequence[Any]) -> int:
        """How many leading keys the store holds (L1, then L2). 0 when the store is away."""
        if not keys or self._is_closed:
            return 0
        msg = {"op": "lookup", "keys": _hex_keys(keys), "budget_s": self.l2_budget_s}
        try:
            with self._ctl_lock:
                reply = self._ctl.call(msg, l2_budget_s=self.l2_budget_s)
        except StorageError as exc:
            self._note_failure(exc)
            return 0
        self._note_ok()
        return int(reply["num_chunks"])

    def load(self, keys: Sequence[Any], dst_views: Sequence[Any]) -> int:
        """Copy the leading stored chunks into ``dst_views``; returns how many were copied."""
        if len(keys) != len(dst_views):
            raise ValueError(f"{len(keys)} keys but {len(dst_views)} destination buffers")
        if not keys or self._is_closed:
            return 0
        dsts = [_byte_view(d, writable=True) for d in dst_views]
        msg = {"op": "acquire", "keys": _hex_keys(keys), "budget_s": self.l2_budget_s}
        with self._ctl_lock:
            try:
                reply = self._ctl.call(msg, l2_budget_s=self.l2_budget_s)
            except StorageError as exc:
                self._note_failure(exc)
                return 0
            self._note_ok()
            if reply["lease"] is None:
                return 0
            arena = self._ctl.array  # [arena bytes] uint8
            assert arena is not None
            num, nbytes, start = 0, 0, time.perf_counter()
            try:
                for (offset, size, want), dst in zip(reply["chunks"], dsts, strict=False):
                    if dst.nbytes != size:
                        logger.warning(
                            "stored chunk has %d bytes, destination %d: stopping", size, dst.nbytes
                        )
                        break
                    np.copyto(dst, arena[offset : offset + size])
                    if self.verify_loads and checksum(dst) != want:
                        self._add(num_corrupt=1)
                        logger.error(
                            "chunk %d of a load failed its checksum; treating it as a miss", num
                        )
                        break
                    num += 1
                    nbytes += size
            finally:
                copy_s = time.perf_counter() - start
                self._ctl.send({"op": "release", "lease": reply["lease"], "copy_s": copy_s})
        self._add(num_loaded=num, loaded_bytes=nbytes, load_seconds=copy_s)
        return num

    def save(self, keys: Sequence[Any], src_views: Sequence[Any]) -> Future[int]:
        """Queue chunks for storing; the future gives how many were stored."""
        if len(keys) != len(src_views):
            raise ValueError(f"{len(keys)} keys but {len(src_views)} source buffers")
        views = [_byte_view(s, writable=False) for s in src_views]
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

    # -- saver thread --------------------------------------------------------------------
    def _save_loop(self) -> None:
        while not self._is_closed:
            try:
                keys, views, fut = self._save_queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                num = self._save_now(keys, views)
            except StorageError as exc:
                self._note_failure(exc)
                num = 0
            except Exception:
                logger.exception("saving %d chunks failed; dropping them", len(keys))
                num = 0
            if num < len(keys):
                self._add(num_save_dropped=len(keys) - num)
            fut.set_result(num)

    def _save_now(self, keys: list[Any], views: list[np.ndarray]) -> int:
        msg = {"op": "reserve", "keys": _hex_keys(keys), "sizes": [v.nbytes for v in views]}
        reply = self._saver.call(msg)
        self._note_ok()
        if reply["lease"] is None:
            return 0
        arena = self._saver.array  # [arena bytes] uint8
        assert arena is not None
        checksums: list[int | None] = []
        nbytes, start = 0, time.perf_counter()
        try:
            for offset, src in zip(reply["offsets"], views, strict=True):
                if offset is None:
                    continue
                dst = arena[offset : offset + src.nbytes]
                np.copyto(dst, src)
                checksums.append(checksum(dst))
                nbytes += src.nbytes
        except BaseException:
            self._saver.send({"op": "abort", "lease": reply["lease"]})
            raise
        copy_s = time.perf_counter() - start
        done = self._saver.call(
            {"op": "commit", "lease": reply["lease"], "checksums": checksums, "copy_s": copy_s}
        )
        num = int(done["num_committed"])
        self._add(
            num_saved=num, saved_bytes=nbytes if num == len(checksums) else 0, save_seconds=copy_s
        )
        return num

    # -- helpers -------------------------------------------------------------------------
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
            logger.info("store at %s is back", self.socket_path)


def _hex_keys(keys: Sequence[Any]) -> list[str]:
    """Chunk keys as hex: ``bytes`` or ``pdx.keys.ChunkKey`` (its ``digest``)."""
    return [(k if isinstance(k, bytes) else k.digest).hex() for k in keys]


def _byte_view(buf: Any, *, writable: bool) -> np.ndarray:
    """A flat uint8 numpy view of one chunk buffer (no copy)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"chunk buffers must be in host memory, got a {buf.device} tensor")
        if not buf.is_contiguous():
            raise ValueError("chunk buffers must be contiguous")
        buf = buf.detach().reshape(-1).view(torch.uint8).numpy()
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("chunk buffers must be C-contiguous")
    if writable and not arr.flags.writeable:
        raise ValueError("destination buffer is read-only")
    return arr.reshape(-1).view(np.uint8)
