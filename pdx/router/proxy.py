"""Dispatch one generation request to a (P, D) pair, relay D's answer, retry on failure.

The retry loop re-picks the pair (excluding engines that just failed) and mints a
fresh transfer id / bootstrap room each attempt. A failure can be retried only
until the first byte reaches the client; after that the response is committed.
A client disconnect cancels the handler, which aborts both legs (closing an
upstream connection makes vLLM and SGLang abort the request and free its blocks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from pdx.router.protocols import nixl as nixl_protocol
from pdx.router.protocols import pdx as pdx_protocol
from pdx.router.protocols import sglang as sglang_protocol
from pdx.router.state import EngineState
from pdx.router.upstream import AbortHandle, UpstreamError

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_POST = b"POST"
_STATS_MARK = b"pdx_transfer_stats"


@dataclass(slots=True)
class RequestCtx:
    route: str  # "/v1/completions", ...
    route_bytes: bytes  # the same, encoded
    body: dict[str, Any]
    is_stream: bool
    request_id: str
    client_auth: bytes | None  # the client's Authorization value
    keys: list[bytes]  # prefix chunk keys
    num_tokens: int
    session_id: str | None
    t0: float


class LegFailed(Exception):
    """One leg failed in a way another pair may not (retry with that engine excluded)."""

    def __init__(self, engine_id: str, message: str, *, is_timeout: bool = False) -> None:
        super().__init__(message)
        self.engine_id = engine_id
        self.is_timeout = is_timeout


class EngineAnswer(Exception):
    """An engine answered with a client error (4xx): pass it through unchanged."""

    def __init__(self, status: int, body: bytes, content_type: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


def leg_headers(state: EngineState, ctx: RequestCtx) -> bytes:
    h = b"X-Request-Id: " + ctx.request_id.encode() + b"\r\n"
    if state.auth_header:
        return h + state.auth_header
    if state.forwards_client_auth and ctx.client_auth:
        return h + b"Authorization: " + ctx.client_auth + b"\r\n"
    return h


class Dispatcher:
    """Runs one attempt of a request on a chosen pair; owned by the router app."""

    def __init__(self, app: Any) -> None:
        self.app = app  # RouterApp: metrics, timeouts, background tasks
        self.timeouts = app.config.timeouts

    # -- one leg that must complete (P) ---------------------------------------------------
    async def prefill(self, p: EngineState, ctx: RequestCtx, body: bytes) -> bytes:
        """Send the P leg and read its whole response; LegFailed / EngineAnswer on failure."""
        p.begin()
        ok = False
        try:
            resp = await p.pool.request(
                _POST, ctx.route_bytes, body, leg_headers(p, ctx), timeout=self.timeouts.prefill_s
            )
            data = await resp.read(self.timeouts.prefill_s)
            if resp.status == 200:
                ok = True
                return data
            if resp.status in RETRYABLE_STATUS:
                raise LegFailed(p.id, f"prefill engine {p.id} answered {resp.status}: {data[:200]!r}")
            ok = True
            raise EngineAnswer(resp.status, data, resp.header(b"content-type") or b"application/json")
        except UpstreamError as exc:
            raise LegFailed(p.id, f"prefill engine {p.id}: {exc}", is_timeout=exc.is_timeout) from None
        finally:
            p.end(ok)

    # -- the leg whose answer the client gets (D) -----------------------------------------
    async def decode(
        self,
        d: EngineState,
        ctx: RequestCtx,
        body: bytes,
        send: Any,
        handle: AbortHandle,
        p_task: asyncio.Task | None = None,
        merge_logprobs: bool = False,
    ) -> None:
        """Send the D leg and relay its answer; commit at the first byte sent to the client.

        ``p_task`` (concurrent protocols): its failure before the commit aborts D and
        raises P's LegFailed/EngineAnswer instead.
        """
        d.begin()
        ok = True
        t = self.timeouts
        chunks = None
        try:
            try:
                resp = await d.pool.request(
                    _POST, ctx.route_bytes, body, leg_headers(d, ctx), timeout=t.decode_first_byte_s, handle=handle
                )
                if resp.status != 200:
                    data = await resp.read(t.idle_s)
                    if resp.status in RETRYABLE_STATUS:
                        ok = False
                        raise LegFailed(d.id, f"decode engine {d.id} answered {resp.status}: {data[:200]!r}")
                    raise EngineAnswer(resp.status, data, resp.header(b"content-type") or b"application/json")
                content_type = resp.header(b"content-type") or b"application/json"
                is_sse = content_type.startswith(b"text/event-stream")
                if not is_sse or merge_logprobs:
                    data = await resp.read(t.idle_s)
                    first, chunks = data, None
                else:
                    chunks = resp.iter_body(t.idle_s)
                    first = await chunks.__anext__()
                if merge_logprobs and p_task is not None:
                    p_data = await p_task  # raises P's failure: nothing sent yet
                    first = orjson.dumps(
                        sglang_protocol.merge_input_logprobs(orjson.loads(p_data), orjson.loads(first))
                    )
                handle.is_committed = True  # D produced output: P's fate no longer matters here
            except UpstreamError as exc:
                if handle.is_aborted and p_task is not None:
                    await p_task  # P failed first: report P's failure
                ok = False
                raise LegFailed(d.id, f"decode engine {d.id}: {exc}", is_timeout=exc.is_timeout) from None
            except StopAsyncIteration:
                first, chunks = b"", None
            # committed from here on
            await self.app.send_start(send, 200, content_type, ctx, None if chunks is not None else len(first))
            await self.app.send_first(send, first, ctx, more=chunks is not None)
            if chunks is None:
                if _STATS_MARK in first:
                    self.app.record_transfer_stats(first)
                return
            if _STATS_MARK in first:
                self.app.record_transfer_stats_sse(first)
            try:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if _STATS_MARK in chunk:
                        self.app.record_transfer_stats_sse(chunk)
            except UpstreamError as exc:
                ok = False
                logger.warning("decode engine %s broke the stream of %s: %s", d.id, ctx.request_id, exc)
                self.app.metrics.errors["stream_broken"] += 1
                err = orjson.dumps({"error": {"message": f"decode engine failed mid-stream: {exc}",
                                              "type": "engine_error", "code": 502}})
                await send({"type": "http.response.body", "body": b"data: " + err + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if chunks is not None:
                await chunks.aclose()  # an abandoned stream closes its connection now, not at GC
            d.end(ok)

    # -- protocols --------------------------------------------------------------------------
    async def run_pdx(self, ctx: RequestCtx, p: EngineState, d: EngineState, send: Any) -> None:
        tid = pdx_protocol.new_transfer_id()
        p_body = orjson.dumps(pdx_protocol.prefill_body(ctx.body, tid))
        d_body = orjson.dumps(pdx_protocol.decode_body(ctx.body, tid, p.pool.host, p.engine.kv_port or 0))
        await self._concurrent(ctx, p, d, p_body, d_body, send, merge_logprobs=False)

    async def run_sglang(self, ctx: RequestCtx, p: EngineState, d: EngineState, send: Any) -> None:
        room = sglang_protocol.new_room()
        body = orjson.dumps(sglang_protocol.leg_body(ctx.body, p.pool.host, p.engine.bootstrap_port, room))
        merge = ctx.route == "/generate" and bool(ctx.body.get("return_logprob")) and not ctx.is_stream
        await self._concurrent(ctx, p, d, body, body, send, merge_logprobs=merge)

    async def run_nixl(self, ctx: RequestCtx, p: EngineState, d: EngineState, send: Any) -> None:
        p_data = await self.prefill(p, ctx, orjson.dumps(nixl_protocol.prefill_body(ctx.body)))
        try:
            p_json = orjson.loads(p_data)
        except orjson.JSONDecodeError:
            raise LegFailed(p.id, f"prefill engine {p.id} answered with invalid JSON") from None
        d_body = orjson.dumps(nixl_protocol.decode_body(ctx.body, p_json))
        await self.decode(d, ctx, d_body, send, AbortHandle())

    async def run_decode_only(self, ctx: RequestCtx, d: EngineState, send: Any) -> None:
        body = dict(ctx.body)
        body.pop("kv_transfer_params", None)
        await self.decode(d, ctx, orjson.dumps(body), send, AbortHandle())

    async def _concurrent(
        self, ctx: RequestCtx, p: EngineState, d: EngineState, p_body: bytes, d_body: bytes, send: Any,
        *, merge_logprobs: bool,
    ) -> None:
        handle = AbortHandle()
        p_task = asyncio.get_running_loop().create_task(self.prefill(p, ctx, p_body))

        def on_p_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                handle.abort()  # no effect once D's answer is fully relayed

        p_task.add_done_callback(on_p_done)
        try:
            await self.decode(d, ctx, d_body, send, handle, p_task, merge_logprobs)
        except BaseException:
            if not p_task.done():
                p_task.cancel()
            raise
        if not p_task.done():
            self.app.keep_until_done(p_task)  # P's leg finishes on its own
        elif not p_task.cancelled() and p_task.exception() is not None:
            logger.warning("request %s: prefill failed after decode answered: %s", ctx.request_id, p_task.exception())



def now() -> float:
    return time.perf_counter()
