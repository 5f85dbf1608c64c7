"""D's worker side, on the connector's event loop: publish reserved blocks, count what lands.

For each ``RecvSpec`` it registers the reserved blocks with P's control server
(one authenticated connection per P), then counts the transport's
notifications until every layer of every block landed. A transfer that P
reports failed, whose control connection drops (P died), or that passes its
deadline is *failed*: D first releases it at P (so no write can land later),
then hands it to the worker thread with the blocks that did not land, which
vLLM recomputes or fails by ``kv_load_failure_policy``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdx.connector.control import (
    ControlClient,
    ControlError,
    LayerDst,
    LayoutMsg,
    Register,
    Release,
)
from pdx.connector.figures import TransferFigures
from pdx.connector.messages import LayerLanded
from pdx.connector.protocol import PeerAddress
from pdx.connector.recv_book import RecvBook, RecvState, RecvStatus
from pdx.errors import KVMessageError

if TYPE_CHECKING:
    from pdx.layout import PagedKVLayout

logger = logging.getLogger(__name__)

TICK_S = 0.05
RELEASE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RecvOutcome:
    req_id: str
    is_ok: bool
    failed_block_ids: frozenset[int]
    figures: TransferFigures
    first_block_id: int | None  # D's first block that was loaded (the debug corruption hook uses it)


class DecodeSide:
    def __init__(self, transport: Any, layout: PagedKVLayout, layers: list[LayerDst], token: str, engine: str,
                 recv_timeout_s: float) -> None:
        self.transport = transport
        self.layout = layout  # D's KV memory; P refuses to pair unless its own is the same
        self.layers = layers
        self.block_size = layout.block_size
        self._layout_msg = LayoutMsg.of(layout)
        self.token = token
        self.engine = engine
        self.recv_timeout_s = recv_timeout_s
        self.book = RecvBook()
        self._clients: dict[PeerAddress, ControlClient] = {}
        self.num_malformed = 0  # layer-landed notifications dropped as malformed
        self._outcomes: list[RecvOutcome] = []
        self._outcomes_lock = threading.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._main = [loop.create_task(self._notif_loop()), loop.create_task(self._tick_loop())]

    def pop_outcomes(self) -> list[RecvOutcome]:
        with self._outcomes_lock:
            out, self._outcomes = self._outcomes, []
        return out

    # -- from the worker thread (scheduled on the loop) ---------------------------------
    def recv(self, req_id: str, transfer_id: str, peer: PeerAddress, block_ids: list[int], first_block: int,
             num_tokens: int) -> None:
        state = RecvState(req_id, transfer_id, peer, block_ids, first_block, num_tokens, len(self.layers),
                          self.block_size,
                          deadline=time.monotonic() + self.recv_timeout_s, t_registered=time.time())
        self.book.add(state)
        self._spawn(self._register(state))

    def release(self, req_id: str, transfer_id: str, peer: PeerAddress) -> None:
        """D's request ended: stop P, then (if reserved) report the blocks free."""
        state = self.book.states.get(req_id)
        if state is not None:
            state.is_aborted = True
            if state.status is RecvStatus.WAITING:
                self.book.fail(transfer_id, "the decode request was aborted")
                self._spawn(self._release_and_finalize(state))
            return
        self._spawn(self._send_release(peer, transfer_id, "aborted before admission"))

    # -- registration --------------------------------------------------------------------
    async def _client(self, peer: PeerAddress) -> ControlClient:
        client = self._clients.get(peer)
        if client is None or client.is_closed:
            client = ControlClient(peer.host, peer.port, self.token, self.engine, self._on_failed)
            self._clients[peer] = client
            try:
                await client.connect()
            except (OSError, asyncio.TimeoutError, ControlError) as exc:
                self._clients.pop(peer, None)
                raise ControlError(f"cannot reach the prefill control server {peer}: {exc}") from exc
        return client

    async def _register(self, state: RecvState) -> None:
        try:
            client = await self._client(state.peer)
            client.transfer_ids.add(state.transfer_id)
            descriptor = base64.b64encode(self.transport.descriptor()).decode()
            reply = await client.request(lambda seq: Register(
                seq=seq, transfer_id=state.transfer_id, block_ids=state.block_ids,
                first_block=state.first_block, num_tokens=state.num_tokens, layout=self._layout_msg,
                layers=self.layers, descriptor=descriptor,
            ), timeout=self.recv_timeout_s)
        except ControlError as exc:
            self._failed_now(state, str(exc), connection_lost=True)
            return
        if not reply.ok:
            self._failed_now(state, f"prefill refused the transfer: {reply.error}", connection_lost=True)

    async def _on_failed(self, transfer_id: str, reason: str) -> None:
        state = self.book.by_transfer.get(transfer_id)
        if state is not None:
            # P stopped writing before it told us (failed) or cannot write any more (connection lost).
            self._failed_now(state, reason, connection_lost=True)

    def _failed_now(self, state: RecvState, why: str, connection_lost: bool) -> None:
        if self.book.fail(state.transfer_id, why) is None:
            return
        logger.warning("transfer %s (request %s) failed: %s", state.transfer_id, state.req_id, why)
        if connection_lost:
            self._finalize(state)
        else:
            self._spawn(self._release_and_finalize(state))

    async def _send_release(self, peer: PeerAddress, transfer_id: str, why: str) -> None:
        try:
            client = await self._client(peer)
            await client.request(lambda seq: Release(seq=seq, transfer_id=transfer_id, reason=why),
                                 timeout=RELEASE_TIMEOUT_S)
        except ControlError as exc:
            logger.debug("release of %s at %s: %s", transfer_id, peer, exc)

    async def _release_and_finalize(self, state: RecvState) -> None:
        await self._send_release(state.peer, state.transfer_id, state.error or "released")
        self._finalize(state)

    # -- landing ---------------------------------------------------------------------------
    async def _notif_loop(self) -> None:
        while True:
            note = await self.transport.wait_notification()
            try:
                msg = LayerLanded.decode(note.payload)
            except KVMessageError as exc:
                self.num_malformed += 1
                logger.warning("dropped a malformed notification from %s (%d so far): %s", note.peer,
                               self.num_malformed, exc)
                continue
            done = self.book.landed(msg.transfer_id, msg.layer, msg.start, msg.end, msg.nbytes, msg.t_saved,
                                    time.time(), msg.t_posted or None)
            if done is not None:
                self._finalize(done)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for state in self.book.expired(time.monotonic()):
                self._failed_now(state, f"KV did not land within recv_timeout_s={self.recv_timeout_s}",
                                 connection_lost=False)

    def _finalize(self, state: RecvState) -> None:
        if state.status is RecvStatus.FINAL:
            return
        is_ok = state.status is RecvStatus.DONE
        # An aborted request's blocks are freed, not recomputed: report no load errors for them.
        failed = frozenset() if is_ok or state.is_aborted else frozenset(state.failed_block_ids())
        self.book.finalize(state)
        client = self._clients.get(state.peer)
        if client is not None:
            client.transfer_ids.discard(state.transfer_id)
        t_done = state.t_done or time.time()
        has_post = bool(state.t_last_saved and state.t_last_posted)  # exposed = last_post + last_write
        figures = TransferFigures(
            transfer_id=state.transfer_id,
            is_ok=is_ok,
            error=state.error,
            nbytes=state.nbytes,
            num_tokens=state.num_tokens - state.start_token,
            num_writes=state.num_notifications,
            transfer_ms=1e3 * state.busy_s,
            wait_ms=1e3 * (t_done - state.t_registered),
            exposed_ms=1e3 * max(t_done - state.t_last_saved, 0.0) if state.t_last_saved else None,
            t_done=t_done,
            last_post_ms=1e3 * max(state.t_last_posted - state.t_last_saved, 0.0) if has_post else None,
            last_write_ms=1e3 * max(t_done - state.t_last_posted, 0.0) if has_post else None,
        )
        with self._outcomes_lock:
            first = state.block_ids[state.first_block] if state.first_block < len(state.block_ids) else None
            self._outcomes.append(RecvOutcome(state.req_id, is_ok, failed, figures, first))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in [*self._main, *self._tasks]:
            task.cancel()
        for client in list(self._clients.values()):
            await client.aclose()
