"""The ucx transport's plumbing: the process's ucxx loop thread, and ucxx requests that outlive a cancel.

See ``transports/ucx.py`` for the protocol.

A ucxx request does not keep its buffer alive, and UCX keeps writing into (receive) or reading
from (send) that buffer until the request ends: done, failed, or cancelled because its endpoint
was aborted. Cancelling the coroutine that awaits ``ep.send``/``ep.recv`` does not end the
request, so every ucxx call here runs through ``run_op``: the call is a task of its own that
holds its buffer until UCX is done with it, and whoever frees memory UCX may touch (region
release in ``aclose``) first aborts the endpoints and then waits for those tasks (``settle_ops``).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

import numpy as np

from ._fds import open_fds
from .loop_thread import LoopThread

logger = logging.getLogger(__name__)

HELLO, WRITE, DONE = 1, 2, 3
CONNECT_TIMEOUT = 10.0
# UCX options of pdx's ucxx context where another UCX copy (NIXL's) is already loaded in the
# process: that copy owns the memory hooks, so this one has no registration cache, and UCX 1.21
# crashes when it aborts a rendezvous whose peer died (it invalidates the registration through
# the missing cache). Without rendezvous, a receive cut off mid-message never ends instead: its
# memory is kept (see ``settle_ops``) and its endpoint socket stays open.
NO_RENDEZVOUS = {"RNDV_THRESH": "inf"}


def other_ucx_loaded() -> bool:
    """Whether a UCX library other than ucxx's (``libucx`` package) is mapped in this process."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libucp" in line}
    except OSError:
        return False
    return any("/libucx/" not in path for path in paths)


def import_ucxx() -> Any:
    """``import ucxx``. Its import sets ``UCX_*`` variables in the process environment, which a
    NIXL UCX backend created later in the process reads too (the nixl transport's frozen-target
    test passes only with ucxx's ``UCX_RNDV_THRESH=8192``), so they are left as ucxx sets them."""
    import ucxx

    return ucxx


def region_view(addr: int, nbytes: int) -> np.ndarray:
    raw: Any = (ctypes.c_uint8 * nbytes).from_address(addr)
    return np.frombuffer(raw, dtype=np.uint8)


async def run_op(ops: set[asyncio.Task[Any]], call: Coroutine[Any, Any, Any], *more: set[asyncio.Task[Any]]) -> Any:
    """Await one ucxx send/recv; cancelling the caller leaves the request (and its buffer) running.

    The request ends when UCX completes or cancels it (abort its endpoint to cancel); until
    then its task stays in ``ops`` (and in each set of ``more``: one connection's requests)."""
    task = asyncio.ensure_future(call)
    for group in (ops, *more):
        group.add(task)
        task.add_done_callback(_op_done(group))
    return await asyncio.shield(task)


def _op_done(ops: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        ops.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an op whose caller was cancelled fails unobserved
    return done


async def settle_ops(ops: set[asyncio.Task[Any]], timeout: float) -> bool:
    """Wait until UCX is done with every buffer of ``ops`` (their endpoints aborted first).
    False if some request outlived ``timeout``: its memory must then be kept, not freed."""
    if ops:
        await asyncio.wait(list(ops), timeout=timeout)
    return not ops


async def collect_endpoints() -> None:
    """Free closed ucxx endpoints now: ucxx objects sit in reference cycles, and UCX closes an
    endpoint's socket only when its object goes."""
    for _ in range(5):
        gc.collect()
        await asyncio.sleep(0.02)


def abort_endpoint(ep: Any) -> None:
    """Abort a ucxx endpoint: UCX cancels its pending requests (their ``run_op`` tasks end)."""
    try:
        ep.abort()
    except Exception:
        logger.debug("ucxx endpoint abort failed", exc_info=True)


class UcxRuntime:
    """The process's ucxx runtime: its event loop thread, UCX context, worker and progress thread.

    Like a CUDA context it is a once-per-process resource: started by the first ucx transport and
    kept until the process exits (tearing ucxx down while a cut-off exchange is still being cancelled
    crashes UCX). ``fds`` are the file descriptors it owns (epoll, eventfds, shared-memory segments),
    recorded after a warm-up exchange so the lazily opened ones are included; anything a transport
    opens after that (listeners, endpoints) is that transport's to close. ``kept`` holds memory of
    closed transports that a request UCX never ended might still touch (see ``settle_ops``).
    """

    _instance: UcxRuntime | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        before = open_fds()
        self.kept: list[Any] = []
        self._loop_thread = LoopThread("pdx-ucxx")
        self.loop = self._loop_thread.loop
        self.thread = self._loop_thread.thread
        try:
            self.submit(_warm_up()).result(CONNECT_TIMEOUT + 5)
        except Exception:
            logger.warning("ucxx warm-up failed; the runtime's fds may be under-counted", exc_info=True)
        self.fds = frozenset(open_fds() - before)

    @classmethod
    def acquire(cls) -> UcxRuntime:
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
        return self._loop_thread.submit(coro)


async def _warm_up() -> None:
    """Create pdx's ucxx context, then one tiny exchange through a throwaway listener, so UCX
    opens what it opens lazily now."""
    ucxx = import_ucxx()
    options = dict(NO_RENDEZVOUS) if other_ucx_loaded() else {}
    if options:
        logger.info("ucx: another UCX copy is loaded in this process; pdx's ucxx context uses no rendezvous")
    ucxx.init(options=options)
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
