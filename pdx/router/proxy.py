"""Run one attempt of a generation request on a (P, D) pair and write the client's response.

The app parses the request, picks the pair and retries; the ``Dispatcher`` sends
the legs its ``PDProtocol`` builds, relays D's answer (SSE passthrough or whole
JSON), writes error answers, and keeps the request metrics. It never calls back
into the app.

An attempt can fail over to another pair only until the first byte reaches the
client; after that the response is committed. A client disconnect cancels the
handler, which aborts both legs (closing an upstream connection makes vLLM and
SGLang abort the request and free its blocks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from pdx.errors import EngineRejected, LegFailed, UpstreamError
from pdx.router.metrics import RouterMetrics
from pdx.router.respond import client_error, send_json
from pdx.router.upstream import AbortHandle

if TYPE_CHECKING:
    from pdx.config.topology import Timeouts
    from pdx.router.protocols.base import PDProtocol
    from pdx.router.request import RequestCtx
    from pdx.router.state import EngineState

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_POST = b"POST"
_STATS_MARK = b"pdx_transfer_stats"
_JSON = b"application/json"


def leg_headers(state: EngineState, ctx: RequestCtx) -> bytes:
    h = b"X-Request-Id: " + ctx.request_id.encode() + b"\r\n"
    if state.auth_header:
        return h + state.auth_header
    if state.forwards_client_auth and ctx.client_auth:
        return h + b"Authorization: " + ctx.client_auth + b"\r\n"
    return h


class Dispatcher:
    """Sends legs, writes responses, counts requests; owned by the router app."""

    def __init__(self, timeouts: Timeouts, metrics: RouterMetrics | None = None) -> None:
        self.timeouts = timeouts
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self._background: set[asyncio.Task] = set()  # P legs still running after D answered

    async def aclose(self) -> None:
        """Cancel P legs still running on their own (idempotent)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- outcomes the app reports -------------------------------------------------------
    async def reject(self, send: Any, route: str, status: int, message: str, type_: str = "invalid_request_error",
                     *, param: str | None = None, code: str | None = None) -> None:
        """Refuse a request before dispatch (bad input, auth, size): error body, counted."""
        self.metrics.requests[(route, status)] += 1
        self.metrics.errors["bad_request" if status < 500 else "engine"] += 1
        await client_error(send, status, message, type_, param=param, code=code)

    async def fail(self, send: Any, status: int, message: str, type_: str, *, kind: str,
                   code: str | None = None, param: str | None = None) -> int:
        """End a dispatched request with an error (no engine, retries exhausted, a request the pair
        cannot serve); returns ``status``."""
        self.metrics.errors[kind] += 1
        await client_error(send, status, message, type_, param=param, code=code)
        return status

    def finish(self, ctx: RequestCtx, status: int) -> None:
        """Count a dispatched request once its response is sent."""
        self.metrics.requests[(ctx.route, status)] += 1
        self.metrics.latency.observe(time.perf_counter() - ctx.t0)

    def record_retry(self) -> None:
        self.metrics.retries += 1

    def record_disconnect(self, ctx: RequestCtx) -> None:
        self.metrics.errors["client_disconnect"] += 1
        logger.info("request %s: client disconnected; both legs aborted", ctx.request_id)

    # -- one attempt --------------------------------------------------------------------
    async def attempt(self, ctx: RequestCtx, protocol: PDProtocol, p: EngineState | None, d: EngineState,
                      send: Any) -> int:
        """Serve ``ctx`` on (``p``, ``d``); ``p`` None: D alone. Returns the status sent.

        Raises ``LegFailed`` when nothing was sent and another pair may succeed.
        An engine's 4xx is passed to the client unchanged.
        """
        try:
            if p is None:
                self.metrics.decode_only += 1
                await self._decode(d, ctx, protocol.decode_only(ctx), send, AbortHandle())
            elif protocol.is_concurrent:
                await self._concurrent(ctx, protocol, p, d, send)
            else:
                await self._sequential(ctx, protocol, p, d, send)
        except EngineRejected as answer:
            await send_json(send, answer.status, answer.body, answer.content_type, ctx.request_id)
            return answer.status
        return 200

    async def _sequential(self, ctx: RequestCtx, protocol: PDProtocol, p: EngineState, d: EngineState,
                          send: Any) -> None:
        legs = protocol.legs(ctx, p.engine)
        p_data = await self._prefill(p, ctx, legs.prefill)
        try:
            d_body = protocol.decode_after_prefill(ctx, p_data)
        except ValueError:
            raise LegFailed(p.id, f"prefill engine {p.id} answered with invalid JSON") from None
        await self._decode(d, ctx, d_body, send, AbortHandle())

    async def _concurrent(self, ctx: RequestCtx, protocol: PDProtocol, p: EngineState, d: EngineState,
                          send: Any) -> None:
        legs = protocol.legs(ctx, p.engine)
        assert legs.decode is not None, f"{protocol.name}: concurrent legs need both bodies"
        handle = AbortHandle()
        p_task = asyncio.get_running_loop().create_task(self._prefill(p, ctx, legs.prefill))

        def on_p_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                handle.abort()  # no effect once D's answer is fully relayed

        p_task.add_done_callback(on_p_done)
        merge = protocol if legs.is_merged else None
        try:
            await self._decode(d, ctx, legs.decode, send, handle, p_task, merge)
        except BaseException:
            if not p_task.done():
                p_task.cancel()
            raise
        if not p_task.done():
            self._background.add(p_task)  # P's leg finishes on its own
            p_task.add_done_callback(self._background.discard)
        elif not p_task.cancelled() and p_task.exception() is not None:
            logger.warning("request %s: prefill failed after decode answered: %s", ctx.request_id, p_task.exception())

    # -- one leg that must complete (P) ---------------------------------------------------
    async def _prefill(self, p: EngineState, ctx: RequestCtx, body: bytes) -> bytes:
        """Send the P leg and read its whole response; LegFailed / EngineRejected on failure."""
        p.begin()
        ok = is_cancelled = False
        timeout = self.timeouts.prefill_s
        try:
            resp = await p.pool.request(_POST, ctx.route_bytes, body, leg_headers(p, ctx), timeout=timeout)
            data = await resp.read(timeout)
            if resp.status == 200:
                ok = True
                return data
            if resp.status in RETRYABLE_STATUS:
                raise LegFailed(p.id, f"prefill engine {p.id} answered {resp.status}: {data[:200]!r}")
            ok = True
            raise EngineRejected(resp.status, data, resp.header(b"content-type") or _JSON)
        except UpstreamError as exc:
            raise LegFailed(p.id, f"prefill engine {p.id}: {exc}", is_timeout=exc.is_timeout) from None
        except asyncio.CancelledError:
            is_cancelled = True  # D failed or the client left: not P's failure
            raise
        finally:
            if is_cancelled:
                p.abandon()
            else:
                p.end(ok)

    # -- the leg whose answer the client gets (D) -----------------------------------------
    async def _decode(
        self,
        d: EngineState,
        ctx: RequestCtx,
        body: bytes,
        send: Any,
        handle: AbortHandle,
        p_task: asyncio.Task | None = None,
        merge: PDProtocol | None = None,
    ) -> None:
        """Send the D leg and relay its answer; commit at the first byte sent to the client.

        ``p_task`` (concurrent protocols): its failure before the commit aborts D and
        raises P's LegFailed/EngineRejected instead. ``merge``: read D whole and send
        ``merge.merge_answers`` of P's and D's answers.
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
                    raise EngineRejected(resp.status, data, resp.header(b"content-type") or _JSON)
                content_type = resp.header(b"content-type") or _JSON
                is_sse = content_type.startswith(b"text/event-stream")
                if not is_sse or merge is not None:
                    data = await resp.read(t.idle_s)
                    first, chunks = data, None
                else:
                    chunks = resp.iter_body(t.idle_s)
                    first = await chunks.__anext__()
                if merge is not None and p_task is not None:
                    p_data = await p_task  # raises P's failure: nothing sent yet
                    first = merge.merge_answers(ctx, p_data, first)
                handle.is_committed = True  # D produced output: P's fate no longer matters here
            except UpstreamError as exc:
                if handle.is_aborted and p_task is not None:
                    await p_task  # P failed first: report P's failure
                ok = False
                raise LegFailed(d.id, f"decode engine {d.id}: {exc}", is_timeout=exc.is_timeout) from None
            except StopAsyncIteration:
                first, chunks = b"", None
            # committed from here on
            await self._send_start(send, content_type, ctx, None if chunks is not None else len(first))
            await send({"type": "http.response.body", "body": first, "more_body": chunks is not None})
            self.metrics.ttft.observe(time.perf_counter() - ctx.t0)
            if chunks is None:
                if _STATS_MARK in first:
                    self._record_transfer_stats(first)
                return
            if _STATS_MARK in first:
                self._record_transfer_stats_sse(first)
            try:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if _STATS_MARK in chunk:
                        self._record_transfer_stats_sse(chunk)
            except UpstreamError as exc:
                ok = False
                logger.warning("decode engine %s broke the stream of %s: %s", d.id, ctx.request_id, exc)
                self.metrics.errors["stream_broken"] += 1
                err = orjson.dumps({"error": {"message": f"decode engine failed mid-stream: {exc}",
                                              "type": "engine_error", "code": 502}})
                await send({"type": "http.response.body", "body": b"data: " + err + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if chunks is not None:
                await chunks.aclose()  # an abandoned stream closes its connection now, not at GC
            d.end(ok)

    # -- response writing -----------------------------------------------------------------
    @staticmethod
    async def _send_start(send: Any, content_type: bytes, ctx: RequestCtx, content_length: int | None) -> None:
        headers = [(b"content-type", content_type), (b"x-request-id", ctx.request_id.encode())]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    def _record_transfer_stats(self, data: bytes) -> None:
        try:
            params = orjson.loads(data).get("kv_transfer_params") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return
        self.metrics.record_kv_stats(params.get("pdx_transfer_stats"))

    def _record_transfer_stats_sse(self, chunk: bytes) -> None:
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: {") and _STATS_MARK in line:
                self._record_transfer_stats(line[6:])
