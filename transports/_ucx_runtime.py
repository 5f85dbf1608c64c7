"""The ucx transport's plumbing: the process's ucxx loop thread and one initiator connection.

See ``transports/ucx.py`` for the protocol.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
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


def open_fds() -> set[str]:
    """This process's open fds as ``"N->target"`` (the transport suite's leak-check format)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


class _Runtime:
    """The process's ucxx runtime: its event loop thread, UCX context, worker and progress thread.

    Like a CUDA context it is a once-per-process resource: started by the first ucx transport and
    kept until the process exits (tearing ucxx down while a cut-off exchange is still being cancelled
    crashes UCX). ``fds`` are the file descriptors it owns (epoll, eventfds, shared-memory segments),
    recorded after a warm-up exchange so the lazily opened ones are included; anything a transport
    opens after that (listeners, endpoints) is that transport's to close.
    """

    _instance: _Runtime | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        before = open_fds()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pdx-ucxx", daemon=True)
        self.thread.start()
        try:
            self.submit(_warm_up()).result(CONNECT_TIMEOUT + 5)
        except Exception:
            logger.warning("ucxx warm-up failed; the runtime's fds may be under-counted", exc_info=True)
        self.fds = frozenset(open_fds() - before)

    @classmethod
    def acquire(cls) -> _Runtime:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def owned_fds(cls) -> frozenset[str]:
        """fds of the running runtime (none before the first ucx transport of the process)."""
        inst = cls._instance
        return inst.fds if inst is not None else frozenset()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


async def _warm_up() -> None:
    """One tiny exchange through a throwaway listener, so UCX opens what it opens lazily now."""
    import gc

    import ucxx

    got: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve(ep: Any) -> None:
        buf = np.zeros(1, dtype=np.int64)
        try:
            await ep.recv(buf)
            await ep.send(buf)
        finally:
            if not got.done():
                got.set_result(None)

    listener = ucxx.create_listener(serve, 0)
    try:
        ep = await asyncio.wait_for(ucxx.create_endpoint("127.0.0.1", listener.port), CONNECT_TIMEOUT)
        await ep.send(np.ones(1, dtype=np.int64))
        await ep.recv(np.zeros(1, dtype=np.int64))
        await asyncio.wait_for(got, CONNECT_TIMEOUT)
        await ep.close()
        del ep
    finally:
        listener.close()
        del listener
    for _ in range(10):  # let UCX finish closing the throwaway endpoints
        gc.collect()
        await asyncio.sleep(0.02)


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
