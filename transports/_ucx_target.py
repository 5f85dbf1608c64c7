"""The ucx transport's target side: the ucxx listener that serves writes, and the liveness port.

Each initiator connection brings a liveness socket (see ``transports/_ucx_conn.py``) that sends
the token of its hello first. Both ends pair up by token: the liveness socket's EOF (the
initiator died or dropped the connection) cancels the handler of that endpoint, and a handler
that ends (bad frame, endpoint error, transport closed) closes the liveness socket, which the
initiator sees as a lost peer. Everything here runs on the ucxx runtime loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._ucx_runtime import (
    CONNECT_TIMEOUT,
    DONE,
    HELLO,
    WRITE,
    abort_endpoint,
    region_view,
    run_op,
)
from .notifications import Notification

if TYPE_CHECKING:
    from .ucx import UcxTransport

logger = logging.getLogger(__name__)


@dataclass
class _Link:
    """One initiator connection, as seen from both of its sockets."""

    writer: asyncio.StreamWriter | None = None  # the liveness socket
    task: asyncio.Task[None] | None = None  # the ucxx handler serving its endpoint
    is_gone: bool = False  # the liveness socket reached EOF
    sender: str = ""  # the initiator's name, from its hello
    ops: set[asyncio.Task[Any]] = field(default_factory=set)  # requests of this link that may touch memory


class UcxTarget:
    """Receives writes into ``transport``'s regions; ``start`` and ``close`` on the runtime loop."""

    def __init__(self, transport: UcxTransport, ops: set[asyncio.Task[Any]]) -> None:
        self.transport = transport
        self.ops = ops
        self.listener: Any = None
        self.alive: asyncio.AbstractServer | None = None
        self.port = self.alive_port = 0
        self._links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # handlers and liveness watchers

    async def start(self, host: str) -> None:
        import ucxx

        self.alive = await asyncio.start_server(self._watch, host, 0)
        self.alive_port = int(self.alive.sockets[0].getsockname()[1])
        self.listener = ucxx.create_listener(self._serve, 0)
        self.port = int(self.listener.port)

    async def close(self) -> None:
        """Stop listening and end every handler (aborting its endpoint) and liveness socket."""
        if self.alive is not None:
            self.alive.close()
            self.alive = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for link in self._links.values():
            if link.writer is not None:
                link.writer.close()
        self._links.clear()

    async def fence(self, sender: str, timeout: float) -> bool:
        """End every handler of ``sender`` (each aborts its endpoint) and wait until UCX has ended
        their requests: then no byte of that peer can land in a region. False if a request
        outlived ``timeout`` (UCX never ends a receive cut off mid-message without rendezvous)."""
        links = [link for link in self._links.values() if link.sender == sender and link.task is not None]
        tasks = [link.task for link in links if link.task is not None]
        for task in tasks:
            task.cancel()
        deadline = asyncio.get_running_loop().time() + timeout
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        ops = [op for link in links for op in link.ops]
        left = deadline - asyncio.get_running_loop().time()
        if ops and left > 0:
            await asyncio.wait(ops, timeout=left)
        return all(task.done() for task in tasks) and all(op.done() for op in ops)

    def _track(self) -> asyncio.Task[None]:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        return task  # type: ignore[return-value]

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._track()
        token, link = 0, None
        try:
            token = int.from_bytes(await asyncio.wait_for(reader.readexactly(8), CONNECT_TIMEOUT), "little")
            link = self._links.setdefault(token, _Link())
            link.writer = writer
            while await reader.read(4096):
                pass
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            if link is not None:
                link.is_gone = True
                if link.task is not None:
                    link.task.cancel()  # its handler aborts the endpoint and unlinks
                elif self._links.get(token) is link:
                    del self._links[token]

    async def _serve(self, ep: Any) -> None:
        task = self._track()
        token, link = 0, None
        try:
            frame = np.zeros(4, dtype=np.int64)
            ops: set[asyncio.Task[Any]] = set()  # this endpoint's requests, until its link is known
            await run_op(self.ops, ep.recv(frame), ops)
            if frame[0] != HELLO or not 0 < frame[1] <= 4096:
                logger.warning("ucx %s: bad hello from a peer; closing it", self.transport.name)
                return
            token = int(frame[2])
            name = np.zeros(int(frame[1]), dtype=np.uint8)
            await run_op(self.ops, ep.recv(name), ops)
            sender = name.tobytes().decode("utf-8", "replace")
            link = self._links.setdefault(token, _Link())
            if link.is_gone:
                return
            link.task, link.sender = task, sender
            link.ops = ops
            while not self.transport.is_closed:
                await run_op(self.ops, ep.recv(frame), ops)
                if frame[0] != WRITE or frame[2] < 0:
                    logger.warning("ucx %s: bad frame %s from %s; closing it", self.transport.name, frame, sender)
                    return
                await self._serve_write(ep, sender, int(frame[1]), int(frame[2]), int(frame[3]), ops)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # peer went away: nothing to report on this side
            logger.debug("ucx %s: connection closed: %s", self.transport.name, exc)
        finally:
            self._tasks.discard(task)
            abort_endpoint(ep)  # UCX cancels what is still pending into region memory
            if link is not None:
                if self._links.get(token) is link:
                    del self._links[token]
                if link.writer is not None:
                    link.writer.close()  # the initiator sees its peer lost

    async def _serve_write(
        self, ep: Any, sender: str, xfer_id: int, num: int, notif_len: int, ops: set[asyncio.Task[Any]]
    ) -> None:
        regions = self.transport.regions
        table = np.zeros((num, 3), dtype=np.int64)  # region, offset, nbytes
        if num:
            await run_op(self.ops, ep.recv(table), ops)
        notif = None
        if notif_len >= 0:
            buf = np.zeros(notif_len, dtype=np.uint8)
            if notif_len:
                await run_op(self.ops, ep.recv(buf), ops)
            notif = buf.tobytes()
        status = np.ones(num, dtype=np.uint8)
        views: list[np.ndarray] = []
        for i, (rid, off, n) in enumerate(table.tolist()):
            region = regions.get(rid)
            if region is not None and n > 0 and off >= 0 and off + n <= region.nbytes:
                status[i] = 0
                views.append(region_view(region.addr + off, n))
        if num:
            await run_op(self.ops, ep.send(status), ops)
        for view in views:
            await run_op(self.ops, ep.recv(view), ops)
        num_failed = int(status.sum())
        if notif is not None and num_failed == 0:
            self.transport.notifications.push(Notification(sender, notif))
        await run_op(self.ops, ep.send(np.array([DONE, xfer_id, num_failed, 0], dtype=np.int64)))
