"""An asyncio event loop on a daemon thread: the one bridge from threads into async code.

Used wherever synchronous callers (vLLM's model-runner thread, the store client, the ucx
runtime, test harnesses) drive async I/O::

    lt = LoopThread("pdx-connector")
    lt.run(coro, timeout=5)        # run a coroutine there and wait for its result
    lt.submit(coro)                # run it there; returns a concurrent Future
    lt.call(fn, *args)             # schedule a plain callback there (returns at once)
    lt.stop()                      # idempotent; closes the loop once its thread has ended
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any


class LoopThread:
    """An asyncio loop running on its own daemon thread."""

    def __init__(self, name: str = "pdx-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 60.0) -> Any:
        """Run ``coro`` on the loop and wait for it; on timeout the coroutine is cancelled."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop thread: await the coroutine instead")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():  # a loop still running cannot be closed
            self.loop.close()
