"""L1 <-> L2 movement inside the store server: write-through and promotion.

``L2Tier`` lives on the server's event loop and touches the index there; the L2
backend's blocking calls run in two thread pools (writes, reads) so a slow L2 never
stalls engines. Write-through is a bounded queue of chunk keys: a full queue drops
the chunk from L2 (counted), never blocks a save. A write-through holds a read
lease on its chunk while copying it out, so the slot is not reused under it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pdx.errors import ChunkCorrupt, StoreUnavailable
from pdx.storage.arena import SharedArena
from pdx.storage.config import StoreConfig
from pdx.storage.index import ChunkIndex, Entry, ReserveStatus
from pdx.storage.l2.base import L2Store
from pdx.storage.metrics import StoreCounters

logger = logging.getLogger(__name__)

NUM_READ_THREADS = 4


class L2Tier:
    def __init__(
        self,
        l2: L2Store,
        index: ChunkIndex,
        arena: SharedArena,
        counters: StoreCounters,
        config: StoreConfig,  # l2_queue, l2_workers
    ):
        self.l2 = l2
        self._index = index
        self._arena = arena
        self._counters = counters
        num_writers = config.l2_workers
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=config.l2_queue)
        self._write_pool = ThreadPoolExecutor(num_writers, thread_name_prefix="pdx-l2-write")
        self._read_pool = ThreadPoolExecutor(NUM_READ_THREADS, thread_name_prefix="pdx-l2-read")
        self._writers = [asyncio.create_task(self._write_through()) for _ in range(num_writers)]
        self._promoting: dict[bytes, asyncio.Task[bool]] = {}

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def aclose(self) -> None:
        """Cancel writers and promotions, wait for L2 calls in flight, close L2. Idempotent."""
        tasks = self._writers + list(self._promoting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writers.clear()
        for pool in (self._write_pool, self._read_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        self.l2.close()

    # -- called by the server ------------------------------------------------------------
    def enqueue_write(self, key: bytes) -> None:
        try:
            self._queue.put_nowait(key)
        except asyncio.QueueFull:
            self._counters.l2_write_dropped += 1

    async def contains_prefix(self, keys: list[bytes], budget_s: float) -> int:
        """Leading keys L2 holds (0 on error or past the budget); starts promoting them."""
        try:
            num = await asyncio.wait_for(
                self._in_read_pool(self.l2.contains_prefix, keys), budget_s
            )
        except (StoreUnavailable, asyncio.TimeoutError) as exc:
            self._failed("lookup", exc)
            return 0
        for key in keys[:num]:
            self._start_promotion(key)
        return num

    async def promoted(self, key: bytes, deadline: float) -> Entry | None:
        """Promote key from L2 (or join a promotion in flight) and read-acquire it."""
        task = self._start_promotion(key)
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            return None
        return self._index.acquire(key)

    async def clear(self) -> int:
        return int(await self._in_read_pool(self.l2.clear))

    # -- internals -----------------------------------------------------------------------
    async def _in_read_pool(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, *args)

    def _failed(self, what: str, exc: BaseException) -> None:
        self._counters.l2_errors += 1
        if self._counters.l2_errors == 1 or self._counters.l2_errors % 1000 == 0:
            logger.warning(
                "L2 %s failed (%d failures so far): %s", what, self._counters.l2_errors, exc
            )

    def _start_promotion(self, key: bytes) -> asyncio.Task[bool]:
        task = self._promoting.get(key)
        if task is None:
            task = asyncio.create_task(self._promote(key))
            self._promoting[key] = task
            task.add_done_callback(functools.partial(self._end_promotion, key))
        return task

    def _end_promotion(self, key: bytes, _task: asyncio.Task[bool]) -> None:
        self._promoting.pop(key, None)

    async def _promote(self, key: bytes) -> bool:
        try:
            value = await self._in_read_pool(self.l2.get, key)
        except ChunkCorrupt as exc:
            self._counters.l2_corrupt += 1
            logger.warning("%s; serving a miss", exc)
            return False
        except StoreUnavailable as exc:
            self._failed("read", exc)
            return False
        if value is None:
            return False
        status, entry = self._index.reserve(key, len(value.payload))
        if entry is None:
            return status is ReserveStatus.EXISTS
        assert self._arena.array is not None
        dst = self._arena.array[entry.offset : entry.offset + entry.nbytes]  # [nbytes] uint8
        try:
            await self._in_read_pool(np.copyto, dst, np.frombuffer(value.payload, dtype=np.uint8))
        except BaseException:
            self._index.abort(entry)
            raise
        entry.is_from_l2 = True
        self._counters.l2_promotions += self._index.commit(entry, value.checksum)
        return True

    async def _write_through(self) -> None:
        assert self._arena.array is not None
        arena = self._arena.array  # [capacity] uint8
        loop = asyncio.get_running_loop()
        while True:
            key = await self._queue.get()
            entry = self._index.acquire(key, touch=False)
            if entry is None:
                continue  # evicted or cleared before its turn
            try:
                if entry.is_from_l2:
                    continue
                view = memoryview(arena[entry.offset : entry.offset + entry.nbytes])  # type: ignore[arg-type]
                await loop.run_in_executor(self._write_pool, self.l2.put, key, view, entry.checksum)
                view.release()
                self._counters.l2_writes += 1
            except StoreUnavailable as exc:
                self._failed("write", exc)
            finally:
                self._index.release(entry)
