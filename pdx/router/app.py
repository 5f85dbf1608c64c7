"""The router's ASGI app: OpenAI endpoints, health, metrics, membership.

Routes::

    POST /v1/completions, /v1/chat/completions   (and /generate for SGLang fleets)
    GET  /v1/models, /health (liveness), /ready (a usable pair exists), /metrics
    GET  /workers, POST /workers, DELETE /workers/{id}

Client input errors get an OpenAI-style error body with a 4xx status; engine
failures 502 (after retries) and no usable engine 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson

from pdx.config.topology import Topology
from pdx.router import workers
from pdx.router.errors import client_error, send_json
from pdx.router.fleet import Fleet, NoEngine
from pdx.router.health import run_checks
from pdx.router.prefix import num_prompt_tokens, prefix_keys, prompt_units
from pdx.router.proxy import Dispatcher, EngineAnswer, LegFailed, RequestCtx

logger = logging.getLogger(__name__)

GENERATE_ROUTES = {"/v1/completions": "prompt", "/v1/chat/completions": "messages", "/generate": None}
ROUTE_BYTES = {route: route.encode() for route in GENERATE_ROUTES}


WATCH_AFTER_S = 0.02  # a client disconnect is noticed this late at most


class _Finished:
    __slots__ = ("is_done", "is_disconnected", "watcher")

    def __init__(self) -> None:
        self.is_done = False
        self.is_disconnected = False
        self.watcher: asyncio.Task | None = None


class RouterApp:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.config = topology.router
        self.fleet = Fleet(topology)
        self.metrics = self.fleet.metrics
        self.dispatcher = Dispatcher(self)
        self._background: set[asyncio.Task] = set()
        self._health_task: asyncio.Task | None = None
        self._session_header = self.config.policies.session_header.lower().encode()
        token = self.config.auth_token
        self._auth = b"Bearer " + token.encode() if token else None
        self._models = orjson.dumps(
            {"object": "list", "data": [{"id": topology.model, "object": "model", "created": 0, "owned_by": "pdx"}]}
        )

    # -- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle_http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        self.fleet.open()
        self._health_task = asyncio.ensure_future(run_checks(self.fleet.states, self.config.health))

    async def shutdown(self) -> None:
        tasks = list(self._background) + ([self._health_task] if self._health_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.fleet.aclose()

    def keep_until_done(self, task: asyncio.Task) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- HTTP ---------------------------------------------------------------------------
    async def handle_http(self, scope: dict, receive: Any, send: Any) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in GENERATE_ROUTES:
            if method != "POST":
                return await client_error(send, 405, f"use POST for {path}")
            return await self.handle_generate(scope, receive, send, path)
        if method == "GET":
            if path == "/health":
                return await send_json(send, 200, b'{"status":"ok"}')
            if path == "/ready":
                ready, why = self.fleet.readiness()
                return await send_json(send, 200 if ready else 503, orjson.dumps({"ready": ready, "reason": why}))
            if path == "/metrics":
                body = self.metrics.render(self.fleet.states())
                return await send_json(send, 200, body, b"text/plain; version=0.0.4")
            if path == "/v1/models":
                return await send_json(send, 200, self._models)
        if path == "/workers" or path.startswith("/workers/"):
            if not self._is_authorized(scope):
                return await client_error(send, 401, "missing or wrong bearer token", "authentication_error")
            return await workers.handle(self, scope, receive, send)
        return await client_error(send, 404, f"no route {method} {path}", code="not_found")

    def _is_authorized(self, scope: dict) -> bool:
        if self._auth is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return value == self._auth
        return False

    async def handle_generate(self, scope: dict, receive: Any, send: Any, path: str) -> None:
        t0 = time.perf_counter()
        cfg = self.config
        request_id = client_auth = session_id = None
        content_length = -1
        session_header = self._session_header
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"authorization":
                client_auth = value
            elif name == session_header:
                session_id = value.decode("latin-1")
        if self._auth is not None and client_auth != self._auth:
            return await self._fail(send, path, 401, "missing or wrong bearer token", "authentication_error")
        if content_length > cfg.max_body_bytes:
            return await self._fail(send, path, 413, f"request body over {cfg.max_body_bytes} bytes")
        # body
        message = await receive()
        raw = message.get("body", b"")
        if message.get("more_body"):
            parts = [raw]
            size = len(raw)
            while message.get("more_body"):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                parts.append(message.get("body", b""))
                size += len(parts[-1])
                if size > cfg.max_body_bytes:
                    return await self._fail(send, path, 413, f"request body over {cfg.max_body_bytes} bytes")
            raw = b"".join(parts)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return await self._fail(send, path, 400, f"request body is not valid JSON: {exc}")
        problem = self._validate(path, body)
        if problem is not None:
            status, text, param = problem
            code = "model_not_found" if status == 404 else None
            return await self._fail(send, path, status, text, param=param, code=code)
        units = prompt_units(body)
        chunk_size = cfg.policies.chunk_size
        ctx = RequestCtx(
            route=path,
            route_bytes=ROUTE_BYTES[path],
            body=body,
            is_stream=body.get("stream") is True,
            request_id=request_id or os.urandom(16).hex(),
            client_auth=client_auth,
            keys=prefix_keys(units, chunk_size, self.topology.model),
            num_tokens=num_prompt_tokens(units),
            session_id=session_id,
            t0=t0,
        )
        # a client disconnect cancels this task, which aborts both legs
        finished = _Finished()
        task = asyncio.current_task()
        # most requests end within WATCH_AFTER_S: watch for a disconnect only after that
        watch = asyncio.get_running_loop().call_later(
            WATCH_AFTER_S, self._start_watch, receive, task, finished
        )

        async def tracked_send(msg: dict) -> None:
            if not msg.get("more_body") and msg["type"] == "http.response.body":
                finished.is_done = True
            await send(msg)

        try:
            status = await self.generate(ctx, tracked_send)
        except asyncio.CancelledError:
            if not finished.is_disconnected:
                raise
            self.metrics.errors["client_disconnect"] += 1
            logger.info("request %s: client disconnected; both legs aborted", ctx.request_id)
            return
        finally:
            watch.cancel()
            if finished.watcher is not None:
                finished.watcher.cancel()
        self.metrics.requests[(path, status)] += 1
        self.metrics.latency.observe(time.perf_counter() - t0)

    def _start_watch(self, receive: Any, task: asyncio.Task | None, finished: _Finished) -> None:
        if not finished.is_done:
            finished.watcher = asyncio.ensure_future(self._watch_disconnect(receive, task, finished))

    async def _watch_disconnect(self, receive: Any, task: asyncio.Task | None, finished: _Finished) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not finished.is_done and task is not None:
                    finished.is_disconnected = True
                    task.cancel()
                return

    def _validate(self, path: str, body: Any) -> tuple[int, str, str | None] | None:
        if not isinstance(body, dict):
            return 400, "request body must be a JSON object", None
        model = body.get("model")
        if model is not None and model != self.topology.model:
            return 404, f"The model `{model}` does not exist; this router serves `{self.topology.model}`", "model"
        field = GENERATE_ROUTES[path]
        if field == "prompt" and body.get("prompt") in (None, "", []):
            return 400, "missing required field 'prompt'", "prompt"
        if field == "messages":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return 400, "missing required field 'messages' (a non-empty list)", "messages"
        if field is None:
            if self.fleet.protocol != "sglang":
                return 400, "/generate is served for SGLang fleets only; use /v1/completions", None
            if body.get("text") is None and body.get("input_ids") is None:
                return 400, "missing required field 'text' or 'input_ids'", "text"
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return 400, "'stream' must be true or false", "stream"
        return None

    async def _fail(self, send: Any, path: str, status: int, message: str, type_: str = "invalid_request_error",
                    param: str | None = None, code: str | None = None) -> None:
        self.metrics.requests[(path, status)] += 1
        self.metrics.errors["bad_request" if status < 500 else "engine"] += 1
        await client_error(send, status, message, type_, param=param, code=code)

    # -- dispatch with retries ----------------------------------------------------------
    async def generate(self, ctx: RequestCtx, send: Any) -> int:
        """Serve one request; return the status sent to the client."""
        cfg = self.config
        fleet = self.fleet
        excluded: set[str] = set()
        last: LegFailed | None = None
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self.metrics.retries += 1
                await asyncio.sleep(cfg.retry_backoff_ms / 1000.0 * (2 ** (attempt - 1)))
            try:
                p, d = fleet.pick_pair(ctx, excluded)
            except NoEngine as exc:
                if last is not None:
                    break
                self.metrics.errors["no_engine"] += 1
                await client_error(send, 503, str(exc), "service_unavailable", code="no_engine")
                return 503
            try:
                if p is None:
                    self.metrics.decode_only += 1
                    await self.dispatcher.run_decode_only(ctx, d, send)
                elif fleet.protocol == "pdx":
                    await self.dispatcher.run_pdx(ctx, p, d, send)
                elif fleet.protocol == "nixl":
                    await self.dispatcher.run_nixl(ctx, p, d, send)
                else:
                    await self.dispatcher.run_sglang(ctx, p, d, send)
            except LegFailed as exc:
                logger.info("request %s attempt %d failed: %s", ctx.request_id, attempt + 1, exc)
                excluded.add(exc.engine_id)
                last = exc
                continue
            except EngineAnswer as answer:
                await send_json(send, answer.status, answer.body, answer.content_type, ctx.request_id)
                return answer.status
            fleet.record_prefix(ctx.keys, p, d)
            return 200
        assert last is not None
        self.metrics.errors["engine"] += 1
        kind = "timed out" if last.is_timeout else "failed"
        await client_error(send, 502, f"engine {kind} after {cfg.max_retries + 1} attempts: {last}", "engine_error")
        return 502

    # -- relay helpers (called by the dispatcher) ----------------------------------------
    async def send_start(self, send: Any, status: int, content_type: bytes, ctx: RequestCtx,
                         content_length: int | None) -> None:
        headers = [(b"content-type", content_type), (b"x-request-id", ctx.request_id.encode())]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def send_first(self, send: Any, first: bytes, ctx: RequestCtx, more: bool) -> None:
        await send({"type": "http.response.body", "body": first, "more_body": more})
        self.metrics.ttft.observe(time.perf_counter() - ctx.t0)

    def record_transfer_stats(self, data: bytes) -> None:
        try:
            params = orjson.loads(data).get("kv_transfer_params") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return
        self.metrics.record_kv_stats(params.get("pdx_transfer_stats"))

    def record_transfer_stats_sse(self, chunk: bytes) -> None:
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: {") and b"pdx_transfer_stats" in line:
                self.record_transfer_stats(line[6:])
