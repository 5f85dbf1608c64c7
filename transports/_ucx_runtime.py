"""The ucx transport's plumbing: the process's ucxx loop thread and one initiator connection.

See ``transports/ucx.py`` for the protocol.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import weakref
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

HELLO, WRITE, DONE = 1, 2, 3
CONNECT_TIMEOUT = 10.0


def _view(addr: int, nbytes: int) -> np.ndarray:
    raw: Any = (ctypes.c_uint8 * nbytes).from_address(addr)
    return np.frombuffer(raw, dtype=np.uint8)


class _Runtime:
    """The process's ucxx event loop thread, shared by its ucx transports (reference-counted:
    the last ``release`` resets ucxx and stops the thread, so a closed transport leaves nothing)."""

    _instance: _Runtime | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.users = 0
        self.dirty = False  # an exchange was cut off mid-flight: tearing ucxx down then can crash
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pdx-ucxx", daemon=True)
        self.thread.start()

    @classmethod
    def acquire(cls) -> _Runtime:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            cls._instance.users += 1
            return cls._instance

    def release(self) -> None:
        with _Runtime._lock:
            self.users -= 1
            if self.users > 0 or self.dirty:  # a dirty runtime stays up for the process's lifetime
                return
            _Runtime._instance = None
        try:
            self.submit(_reset_ucxx()).result(10)
        except Exception:
            logger.warning("ucxx did not reset cleanly", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        import gc

        gc.collect()  # ucxx objects in cycles with the loop hold the UCX worker and its fds

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


async def _reset_ucxx() -> None:
    import gc

    import ucxx
    from ucxx import core

    await asyncio.sleep(0.05)  # let UCX finish cancelling aborted requests before their objects go
    gc.collect()  # endpoints of dropped connections still hold the context
    await asyncio.sleep(0)
    if core._ctx is not None:  # the progress thread's callback keeps the worker (and its fds) alive
        core._ctx.worker.stop_progress_thread()
    ucxx.reset()
    from ucxx._lib_async import application_context

    application_context.clear_progress_tasks()  # the progress task keeps the UCX worker alive


async def _open(conn: _Conn, hello: bytes) -> None:
    await conn.ensure(hello)  # returns nothing: a future holding the endpoint would keep UCX alive


class _Conn:
    """Initiator side of one peer: an endpoint used by one exchange at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.ep: Any = None
        self.lock: asyncio.Lock | None = None  # created on the runtime loop
        self.next_id = 0
        self.task: asyncio.Task[Any] | None = None  # the exchange running now
        self.broken = False

    async def ensure(self, hello: bytes) -> Any:
        import ucxx

        if self.ep is None or self.ep.closed:
            ep = await asyncio.wait_for(ucxx.create_endpoint(self.host, self.port), CONNECT_TIMEOUT)
            self.broken = False
            # ucxx keeps the callback's arguments alive: refer to the endpoint weakly
            ep.set_close_callback(self._closed_by_peer, cb_args=(asyncio.get_running_loop(), weakref.ref(ep)))
            await ep.send(np.array([HELLO, len(hello), 0, 0], dtype=np.int64))
            await ep.send(np.frombuffer(hello, dtype=np.uint8))
            self.ep = ep
        return self.ep

    def _closed_by_peer(self, loop: asyncio.AbstractEventLoop, ep_ref: Any) -> None:
        """ucxx's error/close callback (any thread): a pending send or receive may never finish."""
        def mark() -> None:
            if self.ep is not None and self.ep is ep_ref():
                self.broken = True
                if self.task is not None:
                    self.task.cancel()
        try:
            loop.call_soon_threadsafe(mark)
        except RuntimeError:
            pass

    def drop(self) -> None:
        ep, self.ep = self.ep, None
        if ep is not None:
            try:
                ep.abort()
            except Exception:
                logger.debug("ucxx endpoint abort failed", exc_info=True)
