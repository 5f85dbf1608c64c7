"""The router's ASGI app: OpenAI endpoints, health, metrics, membership.

Routes::

    POST /v1/completions, /v1/chat/completions   (and /generate for SGLang fleets)
    GET  /v1/models, /health (liveness), /ready (a usable pair exists), /metrics
    GET  /workers, POST /workers, DELETE /workers/{id}

Client input errors get an OpenAI-style error body with a 4xx status; engine
failures 502 (after retries) and no usable engine 503. Generation routes and
``/v1/models`` follow ``router.auth_token``; membership changes need
``router.admin_token`` (refused with 403 when it is not set).

For a generation request the app parses and validates, picks the pair (``Fleet``)
and retries; ``proxy.Dispatcher`` runs each attempt, writes the response and
keeps the request metrics. The dispatcher never calls back into the app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson

from pdx.config.topology import Topology
from pdx.errors import LegFailed, RoutingError
from pdx.router import workers
from pdx.router.fleet import Fleet
from pdx.router.health import run_checks
from pdx.router.metrics import create_registry, render
from pdx.router.prefix import num_prompt_tokens, prefix_keys, prompt_units
from pdx.router.proxy import Dispatcher
from pdx.router.request import RequestCtx
from pdx.router.respond import client_error, send_json
from pdx.router.validate import check_prompt, fan_out_problem, nesting_exceeds

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
        self.dispatcher = Dispatcher(self.config.timeouts)
        self.metrics = self.dispatcher.metrics  # read-only here: the dispatcher counts
        self.registry = create_registry(self.metrics, self.fleet.states)  # per app, never the global one
        self._health_task: asyncio.Task | None = None
        self._session_header = self.config.policies.session_header.lower().encode()
        token = self.config.auth_token
        self._auth = b"Bearer " + token.encode() if token else None
        admin = self.config.admin_token
        self._admin_auth = b"Bearer " + admin.encode() if admin else None
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
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.dispatcher.aclose()
        await self.fleet.aclose()

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
                body, content_type = render(self.registry)
                return await send_json(send, 200, body, content_type)
            if path == "/v1/models":
                if not self._is_authorized(scope, self._auth):
                    return await client_error(send, 401, "missing or wrong bearer token", "authentication_error")
                return await send_json(send, 200, self._models)
        if path == "/workers" or path.startswith("/workers/"):
            if method == "GET":  # read-only: the router token or the admin token
                is_allowed = self._is_authorized(scope, self._auth) or (
                    self._admin_auth is not None and self._is_authorized(scope, self._admin_auth)
                )
            elif self._admin_auth is None:
                return await client_error(send, 403, "membership changes are disabled: set router.admin_token "
                                          "(or PDX_ROUTER_ADMIN_TOKEN) to allow them", "permission_error")  # fmt: skip
            else:
                is_allowed = self._is_authorized(scope, self._admin_auth)
            if not is_allowed:
                return await client_error(send, 401, "missing or wrong bearer token", "authentication_error")
            return await workers.handle(self, scope, receive, send)
        return await client_error(send, 404, f"no route {method} {path}", code="not_found")

    @staticmethod
    def _is_authorized(scope: dict, expected: bytes | None) -> bool:
        if expected is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return value == expected
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
            return await self.dispatcher.reject(send, path, 401, "missing or wrong bearer token", "authentication_error")
        if content_length > cfg.max_body_bytes:
            return await self.dispatcher.reject(send, path, 413, f"request body over {cfg.max_body_bytes} bytes")
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
                    return await self.dispatcher.reject(send, path, 413, f"request body over {cfg.max_body_bytes} bytes")
            raw = b"".join(parts)
        if nesting_exceeds(raw, cfg.max_json_depth):
            return await self.dispatcher.reject(send, path, 400, f"request body nests arrays/objects deeper than "
                                                f"{cfg.max_json_depth} levels")  # fmt: skip
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return await self.dispatcher.reject(send, path, 400, f"request body is not valid JSON: {exc}")
        problem = self._validate(path, body)
        if problem is not None:
            status, text, param = problem
            code = "model_not_found" if status == 404 else None
            return await self.dispatcher.reject(send, path, status, text, param=param, code=code)
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
            self.dispatcher.record_disconnect(ctx)
            return
        finally:
            watch.cancel()
            if finished.watcher is not None:
                finished.watcher.cancel()
        self.dispatcher.finish(ctx, status)

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
        if field == "prompt":
            prompt = body.get("prompt")
            if prompt in (None, "", []):
                return 400, "missing required field 'prompt'", "prompt"
            problem = check_prompt(prompt, "prompt")
            if problem is not None:
                return problem
        if field == "messages":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return 400, "missing required field 'messages' (a non-empty list)", "messages"
        if field is None:
            if not self.fleet.protocol.serves_generate:
                return 400, "/generate is served for SGLang fleets only; use /v1/completions", None
            if body.get("text") is None and body.get("input_ids") is None:
                return 400, "missing required field 'text' or 'input_ids'", "text"
            if body.get("input_ids") is not None:
                problem = check_prompt(body["input_ids"], "input_ids")
                if problem is not None:
                    return problem
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return 400, "'stream' must be true or false", "stream"
        return None

    # -- dispatch with retries ----------------------------------------------------------
    async def generate(self, ctx: RequestCtx, send: Any) -> int:
        """Serve one request; return the status sent to the client."""
        cfg = self.config
        fleet = self.fleet
        dispatcher = self.dispatcher
        excluded: set[str] = set()
        last: LegFailed | None = None
        num_attempts = min(cfg.max_retries + 1, cfg.max_attempts)
        for attempt in range(num_attempts):
            if attempt:
                dispatcher.record_retry()
                await asyncio.sleep(cfg.retry_backoff_ms / 1000.0 * (2 ** (attempt - 1)))
            try:
                p, d = fleet.pick_pair(ctx, excluded)
            except RoutingError as exc:
                if last is not None:
                    break
                return await dispatcher.fail(send, 503, str(exc), "service_unavailable", kind="no_engine",
                                             code="no_engine")  # fmt: skip
            if p is not None:
                problem = fan_out_problem(ctx.body, fleet.protocol)
                if problem is not None:
                    status, text, param = problem
                    return await dispatcher.fail(send, status, text, "invalid_request_error", kind="bad_request",
                                                 param=param)  # fmt: skip
            try:
                status = await dispatcher.attempt(ctx, fleet.protocol, p, d, send)
            except LegFailed as exc:
                logger.info("request %s attempt %d failed: %s", ctx.request_id, attempt + 1, exc)
                excluded.add(exc.engine_id)
                last = exc
                continue
            if status == 200:
                fleet.record_prefix(ctx.keys, p, d)
            return status
        assert last is not None
        kind = "timed out" if last.is_timeout else "failed"
        return await dispatcher.fail(send, 502, f"engine {kind} after {num_attempts} attempts: {last}",
                                     "engine_error", kind="engine")  # fmt: skip
