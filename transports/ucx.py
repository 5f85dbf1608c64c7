"""UCX through ``ucxx`` (async tag API): a one-sided write emulated with tagged messages.

ucxx's Python API has no RMA, so a write is a short exchange on the initiator's
endpoint to the target's listener (all int64 frames)::

    initiator                                         target
    [WRITE, xfer_id, n, notif_len] + table[n, 3] ->   check each (region, offset, nbytes) row
                                                  <-  status[n] (uint8; 0 = accepted)
    each accepted segment, in order              ->   received straight into the registered region
                                                  <-  [DONE, xfer_id, num_failed, 0]

The target pushes the notification before its final frame, and only when every
segment landed. Rows the target rejects (a region released since the descriptor
was taken) are the report's failed segments; a broken connection fails every
segment not yet acknowledged with ``PeerLost``.

Beside each endpoint the initiator holds a plain TCP liveness socket to the
target (``transports/_ucx_conn.py``): UCX alone may never end a pending request to
a killed peer, the socket's EOF does. No ucxx request is ever left with a freed
buffer: requests of a cut-off exchange end by aborting their endpoint, and
``aclose`` waits for them before it frees regions (``transports/_ucx_runtime.py``).

Every ucxx call of the process runs on one private event loop thread (ucxx binds
its context to one loop), so transports work whatever loop, or none, the caller
uses. A connection is used by one exchange at a time; a timed-out or aborted
exchange drops the connection and the next post reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from concurrent.futures import CancelledError, Future
from typing import Any

import numpy as np

from ._ucx_conn import UcxConn
from ._ucx_runtime import (
    CONNECT_TIMEOUT,
    DONE,
    WRITE,
    UcxRuntime,
    collect_endpoints,
    import_ucxx,
    region_view,
    run_op,
    settle_ops,
)
from ._ucx_target import UcxTarget
from .base import Peer, Transport
from .descriptor import decode_descriptor, encode_descriptor
from .errors import (
    ConnectError,
    PeerLost,
    TransferAborted,
    TransferError,
    TransportUnavailable,
)
from .segments import LOCAL_OFFSET, LOCAL_REGION, NBYTES, REMOTE_OFFSET, REMOTE_REGION, SegmentPairs
from .transfer import Transfer, TransferStatus

logger = logging.getLogger(__name__)

class UcxTransfer(Transfer):
    """One write exchange running on the runtime loop; settled when its future ends."""

    def __init__(self, peer: Peer, pairs: SegmentPairs, future: Future[Any], timeout: float,
                 runtime_loop: asyncio.AbstractEventLoop, inflight: set[UcxTransfer]) -> None:
        super().__init__(len(pairs), pairs.nbytes, timeout=timeout, label=f"ucx write to {peer.name}")
        self.peer = peer
        self._future = future
        self._runtime_loop = runtime_loop
        self._inflight = inflight  # the transport's in-flight set; this transfer leaves it when settled
        inflight.add(self)
        future.add_done_callback(self._collect)

    def _on_settled(self) -> None:
        self._inflight.discard(self)

    def _stop(self) -> None:
        self._future.cancel()
        try:  # the stream is mid-exchange: drop the connection; the next post reconnects
            self._runtime_loop.call_soon_threadsafe(self.peer.state.drop)
        except RuntimeError:  # the runtime already stopped (transport closed)
            pass

    def _collect(self, future: Future[Any]) -> None:
        try:
            failed = future.result()
        except (asyncio.CancelledError, CancelledError):
            self.settle(TransferStatus.ABORTED, TransferAborted, "aborted")
            return
        except Exception as exc:
            self.settle(TransferStatus.FAILED, PeerLost,
                        f"connection to {self.peer.name} broke: {type(exc).__name__}: {exc}")
            return
        if failed:
            self.settle(TransferStatus.FAILED, TransferError,
                        f"{len(failed)} segment(s) rejected by {self.peer.name}: region released or out of range",
                        failed)
        else:
            self.settle(TransferStatus.DONE)


class UcxTransport(Transport):
    """ucxx endpoint. Options: ``host`` to listen on (default 127.0.0.1), ``timeout`` (default
    seconds for ``wait``)."""

    kind = "ucx"
    supports_read = False
    process_threads = ("pdx-ucxx",)  # the process-wide ucxx runtime's loop thread (see UcxRuntime)
    devices = ("cpu",)

    @classmethod
    def is_available(cls) -> bool:
        try:
            import_ucxx()
        except ImportError:
            return False
        return True

    def __init__(self, name: str | None = None, *, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        super().__init__(name)
        try:
            import_ucxx()
        except ImportError as exc:
            raise TransportUnavailable(f"ucxx is not installed ({exc}); pip install ucxx-cu12") from exc
        self.host = host
        self.timeout = timeout
        self._runtime = UcxRuntime.acquire()
        self._peers: dict[str, Peer] = {}
        self._inflight: set[UcxTransfer] = set()
        self._exchanges: set[asyncio.Task[Any]] = set()  # on the runtime loop
        self._ops: set[asyncio.Task[Any]] = set()  # ucxx requests that may touch memory (see run_op)
        self._target = UcxTarget(self, self._ops)
        self._call(self._target.start(host))

    @classmethod
    def process_fds(cls) -> frozenset[str]:
        """fds (``"N->target"``) of the process-wide ucxx runtime, kept until the process exits."""
        return UcxRuntime.owned_fds()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._runtime.submit(coro).result(CONNECT_TIMEOUT + 5)

    # -- descriptors and peers ------------------------------------------------------------
    def descriptor(self) -> bytes:
        self._check_open()
        return encode_descriptor(self, {"host": self.host, "port": self._target.port,
                                        "alive_port": self._target.alive_port})

    async def connect(self, descriptor: bytes) -> Peer:
        self._check_open()
        desc = decode_descriptor(descriptor, self.kind)
        address = (desc.address.get("host"), desc.address.get("port"), desc.address.get("alive_port"))
        host, port, alive_port = address
        if not isinstance(host, str) or not isinstance(port, int) or not isinstance(alive_port, int):
            from .errors import DescriptorError

            raise DescriptorError(f"ucx descriptor of {desc.name} has no listener address")
        old = self._peers.get(desc.name)
        conn = old.state if old is not None and old.state.address == address \
            else UcxConn(host, port, alive_port, self._ops)
        try:
            await asyncio.wrap_future(self._runtime.submit(self._open(conn)))
        except Exception as exc:
            raise ConnectError(f"cannot reach ucx peer {desc.name} at {host}:{port} (stale descriptor, or the "
                               f"peer is gone): {exc!r}") from exc
        peer = Peer(desc.name, desc.regions, state=conn)
        self._peers[desc.name] = peer
        return peer

    async def _open(self, conn: UcxConn) -> None:
        await conn.ensure(self.name.encode(), is_connect=True)  # returns nothing: a future holding the endpoint keeps UCX alive

    async def disconnect(self, peer: Peer) -> None:
        if self._peers.pop(peer.name, None) is None:
            return
        for tr in list(self._inflight):
            if tr.peer is peer:
                tr.cancel(TransferStatus.FAILED, PeerLost, f"peer {peer.name} was disconnected")
        self._runtime.loop.call_soon_threadsafe(peer.state.drop)

    async def fence(self, peer_name: str, timeout: float = 10.0) -> bool:
        """End the peer's handlers into this endpoint (their endpoints aborted) and wait for UCX."""
        self._check_open()
        return bool(await asyncio.wrap_future(self._runtime.submit(self._target.fence(peer_name, timeout))))

    # -- transfers ------------------------------------------------------------------------
    async def post_write(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        self._validate(peer, pairs)
        if self._peers.get(peer.name) is not peer:
            from .errors import TransportClosed

            raise TransportClosed(f"peer {peer.name} is not connected to {self.name}; connect again")
        t = pairs.table
        local_addr = np.array([self.regions[int(r)].addr for r in t[:, LOCAL_REGION]], dtype=np.int64) \
            if len(t) else np.zeros(0, dtype=np.int64)
        sources = [region_view(int(a) + int(o), int(n)) for a, o, n in zip(local_addr, t[:, LOCAL_OFFSET], t[:, NBYTES],
                                                                     strict=True)]
        table = np.ascontiguousarray(t[:, [REMOTE_REGION, REMOTE_OFFSET, NBYTES]])
        future = self._runtime.submit(self._exchange(peer.state, table, sources, notif))
        return UcxTransfer(peer, pairs, future, self.timeout, self._runtime.loop, self._inflight)

    async def _exchange(self, conn: UcxConn, table: np.ndarray, sources: list[np.ndarray],
                        notif: bytes | None) -> list[int]:
        """Run one write exchange on the runtime loop; returns the failed row indices."""
        task = asyncio.current_task()
        assert task is not None
        self._exchanges.add(task)
        try:
            return await self._exchange_locked(conn, table, sources, notif)
        finally:
            self._exchanges.discard(task)

    async def _exchange_locked(self, conn: UcxConn, table: np.ndarray, sources: list[np.ndarray],
                               notif: bytes | None) -> list[int]:
        if conn.lock is None:
            conn.lock = asyncio.Lock()
        async with conn.lock:
            ep = await conn.ensure(self.name.encode())
            conn.task = asyncio.current_task()
            ops = self._ops
            try:
                conn.next_id += 1
                num = len(table)
                notif_len = -1 if notif is None else len(notif)
                await run_op(ops, ep.send(np.array([WRITE, conn.next_id, num, notif_len], dtype=np.int64)))
                if num:
                    await run_op(ops, ep.send(table))
                if notif:
                    await run_op(ops, ep.send(np.frombuffer(notif, dtype=np.uint8)))
                status = np.zeros(num, dtype=np.uint8)
                if num:
                    await run_op(ops, ep.recv(status))
                for i in np.flatnonzero(status == 0).tolist():
                    await run_op(ops, ep.send(sources[i]))
                done = np.zeros(4, dtype=np.int64)
                await run_op(ops, ep.recv(done))
                if done[0] != DONE or done[1] != conn.next_id:
                    raise ConnectionError(f"unexpected reply {done.tolist()}")
            except asyncio.CancelledError:
                broken = conn.broken
                conn.drop()
                if broken:
                    raise ConnectionError("the peer closed the connection mid-transfer") from None
                raise
            except BaseException:
                conn.drop()
                raise
            finally:
                conn.task = None
            return np.flatnonzero(status).tolist()

    # -- lifetime -------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        for tr in list(self._inflight):
            tr.cancel(TransferStatus.ABORTED, TransferAborted, "transport closed")
        for peer in list(self._peers.values()):
            await self.disconnect(peer)
        # UCX may still read a cut-off exchange's source memory, or receive into a target region:
        # end every request (abort the endpoints, then wait) before super().aclose() frees the regions
        try:
            settled = await asyncio.wait_for(asyncio.wrap_future(self._runtime.submit(self._shutdown())), 30)
        except Exception:
            logger.warning("ucx %s: shutdown did not finish", self.name, exc_info=True)
            settled = False
        finally:
            self._peers.clear()
        if not settled:
            logger.warning("ucx %s: UCX did not end every request; keeping the regions' memory", self.name)
            self._runtime.kept.extend(r.buffer for r in self.regions.values())
        await super().aclose()

    async def _shutdown(self) -> bool:
        if self._exchanges:
            await asyncio.wait(list(self._exchanges), timeout=10)
        await self._target.close()
        settled = await settle_ops(self._ops, 10)
        await collect_endpoints()
        return settled
