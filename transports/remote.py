"""A transport endpoint in a separate process, driven through a command pipe.

The contract tests and ``pdx bench transport`` use it to put the target (or the
initiator) of a transfer in a real second process::

    ep = RemoteEndpoint.start("tcp")              # multiprocessing spawn
    rid = ep.call("allocate", 1 << 20)            # or "register_foreign" (memory the child owns)
    peer = await local.connect(ep.call("descriptor"))
    ...
    assert ep.call("digest", rid, 0, 1 << 20) == pattern_digest(7, 1 << 20)
    leaks = ep.close()                            # aclose in the child, then its leak report
    ep.stop()

``LocalEndpoint`` offers the same calls for a transport in this process (loopback).
The child runs its transport on a background event loop thread, the way the vLLM
connector does; commands arrive on the main thread.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

import numpy as np

from ._fds import open_fds
from .loop_thread import LoopThread

logger = logging.getLogger(__name__)

_PATTERN_BLOCK = 1 << 20


def pattern(seed: int, nbytes: int) -> np.ndarray:
    """Deterministic pseudo-random bytes (uint8 array) for ``seed``."""
    block = np.random.default_rng(seed).integers(0, 256, min(nbytes, _PATTERN_BLOCK), dtype=np.uint8)
    return np.resize(block, nbytes)


def digest(data: Any) -> str:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def pattern_digest(seed: int, nbytes: int) -> str:
    return digest(pattern(seed, nbytes))


class RemoteError(Exception):
    """An exception raised in the endpoint process; ``.kind`` is its class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Endpoint:
    """The commands, executed next to the transport (in the child, or in-process)."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.transport: Any = None
        self.foreign: dict[int, np.ndarray] = {}  # region id -> memory this endpoint owns
        self.peers: dict[str, Any] = {}
        self.posted: list[Any] = []

    def open(self, kind: str, options: dict[str, Any]) -> None:
        """Create a fresh transport (after ``close`` of the previous one: processes are reused)."""
        from . import create_transport

        self._threads = set(threading.enumerate())
        self._fds = open_fds()
        self.transport = self.loop.run(_create(create_transport, kind, options))

    def allocate(self, nbytes: int) -> int:
        return self.transport.allocate(nbytes).region_id

    def register_foreign(self, nbytes: int) -> int:
        buf = np.zeros(nbytes, dtype=np.uint8)
        region = self.transport.register(buf)
        self.foreign[region.region_id] = buf
        return region.region_id

    def release(self, region_id: int) -> None:
        region = self.transport.regions.get(region_id)
        if region is not None:
            region.release()
        self.foreign.pop(region_id, None)

    def descriptor(self) -> bytes:
        return self.transport.descriptor()

    def fill(self, region_id: int, seed: int, offset: int = 0, nbytes: int | None = None) -> None:
        view = self._view(region_id, offset, nbytes)
        view[:] = pattern(seed, len(view))

    def zero(self, region_id: int) -> None:
        self._view(region_id, 0, None)[:] = 0

    def digest(self, region_id: int, offset: int = 0, nbytes: int | None = None) -> str:
        return digest(self._view(region_id, offset, nbytes))

    def read(self, region_id: int, offset: int, nbytes: int) -> bytes:
        return self._view(region_id, offset, nbytes).tobytes()

    def wait_notification(self, timeout: float, peer: str | None = None, payload: bytes | None = None) -> tuple:
        note = self.loop.run(self.transport.wait_notification(timeout, peer, payload), timeout + 5)
        return note.peer, note.payload

    def pop_notifications(self) -> list[tuple[str, bytes]]:
        return [(n.peer, n.payload) for n in self.transport.pop_notifications()]

    def connect(self, descriptor: bytes) -> str:
        peer = self.loop.run(self.transport.connect(descriptor))
        self.peers[peer.name] = peer
        return peer.name

    def post_write(self, peer: str, table: np.ndarray, notif: bytes | None, timeout: float) -> tuple:
        from .segments import SegmentPairs

        async def go() -> tuple:
            t = await self.transport.post_write(self.peers[peer], SegmentPairs(table), notif)
            report = await t.wait(timeout)
            return report.status.value, report.failed_segments

        return self.loop.run(go(), timeout + 5)

    def post_write_nowait(self, peer: str, table: np.ndarray, notif: bytes | None = None) -> None:
        """Post and return at once (the transfer keeps running; used to kill an initiator mid-transfer)."""
        from .segments import SegmentPairs

        async def go() -> None:
            self.posted.append(await self.transport.post_write(self.peers[peer], SegmentPairs(table), notif))

        self.loop.run(go())

    def name(self) -> str:
        return self.transport.name

    def close(self) -> dict[str, Any]:
        self.loop.run(self.transport.aclose())
        self.foreign.clear()
        self.posted.clear()
        self.peers.clear()
        shared = getattr(type(self.transport), "process_threads", ())  # once-per-process library threads
        deadline = time.monotonic() + 5
        while True:  # threads finishing their last socket call may need a moment to exit
            threads = [t.name for t in threading.enumerate()
                       if t not in self._threads and t.is_alive() and t.name not in shared]
            gc.collect()  # unreachable library objects (ucxx endpoints sit in cycles) hold fds until collected
            fds = sorted(open_fds() - self._fds - _process_fds(self.transport))
            if (not threads and not fds) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return {
            "regions": len(self.transport.regions),
            "tasks": self.loop.run(_other_tasks()),
            "threads": threads,
            "fds": fds,
        }

    def _view(self, region_id: int, offset: int, nbytes: int | None) -> np.ndarray:
        from .pins import memory_view

        region = self.transport.regions[region_id]
        nbytes = region.nbytes - offset if nbytes is None else nbytes
        if offset < 0 or offset + nbytes > region.nbytes:
            raise ValueError(f"range [{offset}, {offset + nbytes}) outside region of {region.nbytes} bytes")
        return np.frombuffer(memory_view(region.addr + offset, nbytes), dtype=np.uint8)


def _process_fds(transport: Any) -> frozenset[str]:
    """fds of the transport's process-wide library runtime (``process_fds()``), which outlive it."""
    hook = getattr(type(transport), "process_fds", None)
    return frozenset(hook()) if hook is not None else frozenset()


async def _create(factory: Any, kind: str, options: dict[str, Any]) -> Any:
    return factory(kind, **options)


async def _other_tasks() -> int:
    me = asyncio.current_task()
    return len([t for t in asyncio.all_tasks() if t is not me])


def _child_main(conn: Any, kind: str, options: dict[str, Any]) -> None:
    logging.basicConfig(level=os.environ.get("PDX_LOG_LEVEL", "WARNING"))
    loop = LoopThread("pdx-endpoint-loop")
    endpoint = Endpoint(loop)
    try:
        endpoint.open(kind, options)
    except Exception as exc:  # report start-up failure to the parent
        conn.send(("err", type(exc).__name__, str(exc)))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        cmd, args, kwargs = msg
        try:
            conn.send(("ok", getattr(endpoint, cmd)(*args, **kwargs)))
        except Exception as exc:
            conn.send(("err", type(exc).__name__, str(exc)))
    try:
        if endpoint.transport is not None:
            loop.run(endpoint.transport.aclose(), 10)
    finally:
        loop.stop()


class RemoteEndpoint:
    """A transport endpoint in a spawned child process."""

    def __init__(self, process: Any, conn: Any, pid: int, kind: str) -> None:
        self.process = process
        self.conn = conn
        self.pid = pid
        self.kind = kind

    @classmethod
    def start(cls, kind: str, timeout: float = 60.0, **options: Any) -> RemoteEndpoint:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_child_main, args=(child, kind, options), daemon=True)
        process.start()
        child.close()
        if not parent.poll(timeout):
            process.kill()
            process.join()
            raise RemoteError("TimeoutError", f"{kind} endpoint process did not start in {timeout}s")
        try:
            reply = parent.recv()
        except EOFError:
            process.join(5)
            parent.close()
            raise RemoteError("EOFError", f"{kind} endpoint process exited during start-up") from None
        if reply[0] != "ok":
            process.join(5)
            raise RemoteError(reply[1], reply[2])
        return cls(process, parent, reply[1], kind)

    def call(self, cmd: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        self.conn.send((cmd, args, kwargs))
        if not self.conn.poll(timeout):
            raise RemoteError("TimeoutError", f"endpoint command {cmd!r} did not answer in {timeout}s")
        reply = self.conn.recv()
        if reply[0] == "ok":
            return reply[1]
        raise RemoteError(reply[1], reply[2])

    def send(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        """Queue a command without waiting (a paused process runs it once resumed); ``answer`` reads its reply."""
        self.conn.send((cmd, args, kwargs))

    def answer(self, timeout: float = 120.0) -> tuple[Any, ...]:
        """The reply to the command ``send`` queued: ``("ok", value)`` or ``("err", kind, message)``."""
        if not self.conn.poll(timeout):
            raise RemoteError("TimeoutError", f"no answer from the endpoint in {timeout}s")
        return tuple(self.conn.recv())

    def close(self) -> dict[str, Any]:
        return self.call("close")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): its transfers stay in flight until it is killed."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused process run again (SIGCONT)."""
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """End the process (gracefully if it still runs) and free the pipe; idempotent."""
        if self.process is None:
            return
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self.conn.close()
        self.process.close()
        self.process = None


class LocalEndpoint:
    """``RemoteEndpoint``'s calls for a transport in this process (``loopback``)."""

    def __init__(self, kind: str, loop: LoopThread, **options: Any) -> None:
        self.kind = kind
        self.endpoint = Endpoint(loop)
        self.endpoint.open(kind, options)
        self.pid = os.getpid()

    def call(self, cmd: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        try:
            return getattr(self.endpoint, cmd)(*args, **kwargs)
        except Exception as exc:
            raise RemoteError(type(exc).__name__, str(exc)) from exc

    def close(self) -> dict[str, Any]:
        return self.call("close")

    def kill(self) -> None:
        self.endpoint.loop.run(self.endpoint.transport.aclose())

    def pause(self) -> None:
        """Nothing to freeze in-process: loopback transfers complete when posted."""

    def stop(self) -> None:
        self.endpoint.loop.run(self.endpoint.transport.aclose())
