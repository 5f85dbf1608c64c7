"""The ucx transport's initiator side of one peer: a ucxx endpoint plus a liveness socket.

UCX does not reliably report a peer that died (a pending tag send or receive to a killed
process may never complete, and the endpoint error callback may not come), so each
connection also holds a plain TCP socket to the target's liveness port, opened first. The
target never writes to it: EOF (the target process died, or it closed or dropped this
connection) marks the connection broken, aborts the endpoint (UCX cancels its pending
requests) and cancels the exchange running on it, which then fails with ``PeerLost``.
The target watches its end the same way to drop the endpoints of initiators that are gone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from typing import Any

import numpy as np

from ._ucx_runtime import CONNECT_TIMEOUT, HELLO, abort_endpoint, run_op

logger = logging.getLogger(__name__)


class UcxConn:
    """Initiator side of one peer: an endpoint used by one exchange at a time (on the runtime loop)."""

    def __init__(self, host: str, port: int, alive_port: int, ops: set[asyncio.Task[Any]]) -> None:
        self.host, self.port, self.alive_port = host, port, alive_port
        self.ops = ops  # the transport's pending ucxx requests
        self.ep: Any = None
        self.lock: asyncio.Lock | None = None  # created on the runtime loop
        self.next_id = 0
        self.task: asyncio.Task[Any] | None = None  # the exchange running now
        self.broken = False
        self.is_refused = False  # the target dropped us (died, or fenced us): no reconnect until ``connect``
        self._writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int, int]:
        return self.host, self.port, self.alive_port

    async def ensure(self, hello: bytes, is_connect: bool = False) -> Any:
        """The open endpoint, connecting (liveness socket, endpoint, hello) if there is none.

        After the target dropped the connection only ``connect`` (``is_connect``) opens a new one:
        a write queued behind a fence must fail, not land through a fresh connection."""
        import ucxx

        if is_connect:
            self.is_refused = False
        if self.ep is not None and not self.ep.closed:
            return self.ep
        if self.is_refused:
            raise ConnectionError(f"ucx peer at {self.host}:{self.port} dropped the connection; connect again")
        self.drop()
        token = secrets.randbits(62) + 1  # pairs the liveness socket with the endpoint at the target
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.alive_port),
                                                CONNECT_TIMEOUT)
        ep = None
        try:
            writer.write(token.to_bytes(8, "little"))
            await writer.drain()
            ep = await asyncio.wait_for(ucxx.create_endpoint(self.host, self.port), CONNECT_TIMEOUT)
            # ucxx keeps the callback's arguments alive: refer to the endpoint weakly
            ep.set_close_callback(self._closed_by_peer, cb_args=(asyncio.get_running_loop(), weakref.ref(ep)))
            await run_op(self.ops, ep.send(np.array([HELLO, len(hello), token, 0], dtype=np.int64)))
            await run_op(self.ops, ep.send(np.frombuffer(hello, dtype=np.uint8).copy()))
        except BaseException:
            writer.close()
            if ep is not None:
                abort_endpoint(ep)
            raise
        self.ep, self._writer, self.broken = ep, writer, False
        self._watch = asyncio.create_task(self._watch_alive(reader, ep))
        return ep

    async def _watch_alive(self, reader: asyncio.StreamReader, ep: Any) -> None:
        try:
            while await reader.read(4096):
                pass
        except OSError:
            pass
        self._lost(ep, "liveness socket closed")

    def _closed_by_peer(self, loop: asyncio.AbstractEventLoop, ep_ref: Any) -> None:
        """ucxx's error/close callback (any thread): a pending send or receive may never finish."""
        try:
            loop.call_soon_threadsafe(self._lost, ep_ref(), "endpoint error callback")
        except RuntimeError:
            pass

    def _lost(self, ep: Any, why: str) -> None:
        if ep is None or self.ep is not ep:
            return
        logger.debug("ucx connection to %s:%d lost (%s)", self.host, self.port, why)
        self.broken = self.is_refused = True
        task = self.task
        self.drop()
        if task is not None:
            task.cancel()

    def drop(self) -> None:
        """Abort the endpoint (its requests end as cancelled) and close the liveness socket."""
        ep, self.ep = self.ep, None
        writer, self._writer = self._writer, None
        watch, self._watch = self._watch, None
        if ep is not None:
            abort_endpoint(ep)
        if writer is not None:
            writer.close()
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
