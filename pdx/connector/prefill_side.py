"""P's worker side, on the connector's event loop: control server, layer-wise sender, leases.

``save`` (one call per layer per step, from the forward thread through the
loop) queues the layer's new blocks; once D has registered its blocks for the
transfer, one flusher task per transfer posts them, in order, on the transport,
each write carrying a notification ``{transfer, layer, token range}``. Nothing
is copied: the writes read P's paged KV directly, so P holds the blocks (vLLM
``delay_free``) until the state is released: all written, released by D,
failed, or lease expired. ``pop_released`` hands released request ids to the
worker thread, which reports them as ``finished_sending``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from typing import Any

from pdx.connector.control import (
    Connection,
    ControlError,
    ControlHandler,
    ControlServer,
    Failed,
    Register,
    Release,
)
from pdx.connector.messages import LayerLanded
from pdx.connector.send_book import Destination, SendBook, SendState, WriteItem
from pdx.errors import LayoutError
from pdx.segments import BufferRef
from pdx.transports.errors import TransportError
from pdx.transports.segments import SegmentPairs

logger = logging.getLogger(__name__)

TICK_S = 0.05  # lease / release check period
READY_POLL_S = 0.0002  # GPU: poll period of a layer's "KV written" event


class PrefillSide(ControlHandler):
    def __init__(self, transport: Any, book: SendBook, src: list[BufferRef], host: str, port: int,
                 token: str, write_timeout_s: float) -> None:
        self.transport = transport
        self.book = book
        self.src = src
        self.server = ControlServer(host, port, token, self)
        self.write_timeout_s = write_timeout_s
        self._released: list[str] = []  # request ids, drained by the worker thread
        self._released_lock = threading.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick: asyncio.Task[None] | None = None
        self._peers: dict[bytes, Any] = {}  # descriptor -> transports Peer

    async def start(self) -> None:
        await self.server.start()
        self._tick = asyncio.create_task(self._tick_loop())

    # -- from the worker thread (scheduled on the loop) ---------------------------------
    def save(self, req_id: str, transfer_id: str, block_ids: list[int], num_tokens: int, item: WriteItem) -> None:
        state = self.book.save(req_id, transfer_id, block_ids, num_tokens, item)
        self._kick(state)

    def finish(self, req_id: str, transfer_id: str, is_aborted: bool) -> None:
        state = self.book.finish(req_id, transfer_id, is_aborted, time.monotonic())
        if state.is_aborted:
            self._notify_failed(state)
        self._collect()

    def close(self, transfer_id: str, why: str) -> None:
        """The request ended with nothing computed and no block held: refuse or fail its decoder."""
        dest = self.book.close(transfer_id, why, time.monotonic())
        if dest is not None and dest.conn is not None:
            self._spawn(dest.conn.send(Failed(transfer_id=transfer_id, reason=why)))

    def pop_released(self) -> list[str]:
        with self._released_lock:
            out, self._released = self._released, []
        return out

    # -- control messages ------------------------------------------------------------------
    async def on_register(self, conn: Connection, msg: Register) -> None:
        try:
            layout = msg.layout.to_layout()
            self.book.check_layout(layout)
        except (LayoutError, ControlError) as exc:
            why = str(exc) if isinstance(exc, ControlError) else f"the decoder's KV layout is malformed: {exc}"
            logger.warning("transfer %s refused: %s", msg.transfer_id, why)
            self.book.refuse(msg.transfer_id, why, time.monotonic())
            self._collect()
            raise ControlError(why) from exc
        dest = Destination(list(msg.block_ids), msg.first_block, msg.num_tokens, list(msg.layers), layout,
                           base64.b64decode(msg.descriptor), conn=conn)
        try:
            dest.peer = await self._connect(dest.descriptor)
        except TransportError as exc:
            raise ControlError(f"prefill cannot reach the decoder's transport: {exc}") from exc
        state = self.book.register(msg.transfer_id, dest, time.monotonic())
        conn.transfer_ids.add(msg.transfer_id)
        logger.debug("transfer %s registered: %d blocks from block %d", msg.transfer_id,
                     len(msg.block_ids), msg.first_block)
        if state is not None:
            self._kick(state)

    async def on_release(self, conn: Connection, msg: Release) -> None:
        conn.transfer_ids.discard(msg.transfer_id)
        early = self.book.early.pop(msg.transfer_id, None)
        if early is not None:
            self.book.closed[msg.transfer_id] = (f"released by the decoder: {msg.reason}",
                                                 time.monotonic() + self.book.lease_s)
        state = self.book.states.get(msg.transfer_id)
        if state is None:
            return
        self.book.stop(state, f"released by the decoder: {msg.reason}")
        while state.num_inflight or state.is_flushing:  # D reuses the blocks once we answer
            await asyncio.sleep(0.002)
        self._collect()

    async def on_disconnect(self, conn: Connection) -> None:
        for tid in list(conn.transfer_ids):
            state = self.book.states.get(tid)
            if state is not None:
                self.book.stop(state, "the decoder's control connection closed")
        self._collect()

    # -- sending ---------------------------------------------------------------------------
    async def _connect(self, descriptor: bytes) -> Any:
        peer = self._peers.get(descriptor)
        if peer is None:
            peer = await self.transport.connect(descriptor)
            self._peers[descriptor] = peer
        return peer

    def _kick(self, state: SendState) -> None:
        if state.is_flushing or state.dest is None or not state.pending:
            return
        state.is_flushing = True
        self._spawn(self._flush(state))

    async def _flush(self, state: SendState) -> None:
        try:
            while True:
                items = self.book.take_pending(state)
                if not items:
                    return
                for item in items:
                    if state.is_stopped:
                        return
                    await self._write(state, item)
        finally:
            state.is_flushing = False
            self._collect()

    async def _write(self, state: SendState, item: WriteItem) -> None:
        assert state.dest is not None
        try:
            table, start, end = self.book.plan(state, item, self.src)
        except ControlError as exc:
            self._fail(state, str(exc))
            return
        if not len(table):
            return
        while item.ready is not None and not item.ready.query():
            await asyncio.sleep(READY_POLL_S)
        pairs = SegmentPairs(table).merged()
        notif = LayerLanded(state.transfer_id, item.layer, start, end, pairs.nbytes, item.t_saved,
                            time.time()).encode()
        state.num_inflight += 1
        t0 = time.perf_counter()
        try:
            transfer = await self.transport.post_write(state.dest.peer, pairs, notif)
            await transfer.wait(self.write_timeout_s)
        except TransportError as exc:
            self._fail(state, f"write of layer {item.layer} failed: {exc}")
            return
        finally:
            state.num_inflight -= 1
        state.busy_s += time.perf_counter() - t0
        state.nbytes_sent += pairs.nbytes
        state.num_writes += 1

    def _fail(self, state: SendState, why: str) -> None:
        logger.warning("transfer %s (request %s) failed: %s", state.transfer_id, state.req_id, why)
        self.book.stop(state, why)
        self._notify_failed(state)

    def _notify_failed(self, state: SendState) -> None:
        conn = state.dest.conn if state.dest is not None else None
        if conn is not None:
            self._spawn(conn.send(Failed(transfer_id=state.transfer_id, reason=state.error or "failed")))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- releasing ---------------------------------------------------------------------------
    def _collect(self) -> None:
        released = self.book.pop_releasable(time.monotonic())
        for state in released:
            if state.dest is not None and state.dest.conn is not None:
                state.dest.conn.transfer_ids.discard(state.transfer_id)
            if state.is_complete():
                logger.debug("transfer %s sent: %d bytes in %d writes, %.1f ms busy", state.transfer_id,
                             state.nbytes_sent, state.num_writes, 1e3 * state.busy_s)
            else:
                logger.info("transfer %s released without completing: %s", state.transfer_id, state.error)
                if state.dest is not None and not state.is_aborted:
                    self._notify_failed(state)
        if released:
            with self._released_lock:
                self._released.extend(s.req_id for s in released)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._collect()

    async def aclose(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.server.aclose()
