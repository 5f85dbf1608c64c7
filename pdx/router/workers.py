"""Membership API: ``GET /workers``, ``POST /workers``, ``DELETE /workers/{id}``.

``POST /workers`` takes one engine entry exactly as in the topology file
(``{"id", "url", "role", "kind", "connector", "bootstrap_port", "kv_port", ...}``)
and answers 201 with the worker, 400 for an invalid entry or one at the router's
own listening address, 409 for a duplicate id or url. ``DELETE`` stops routing
new requests to the engine at once; open requests finish. The engine rejoins only
through ``POST``. The app checks the admin token before calling ``handle``.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import unquote

import orjson
from pydantic import ValidationError

from pdx.config import schema
from pdx.config.loader import to_engine
from pdx.router.health import check_engine
from pdx.router.respond import client_error, send_json
from pdx.router.validate import nesting_exceeds

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::", ""})


def is_router_address(host: str, port: int, listening: list[tuple[str, int]]) -> bool:
    """Whether ``host:port`` reaches one of the router's own ``(host, port)`` listening addresses."""
    h = host.lower().strip("[]")
    for listen_host, listen_port in listening:
        if port != listen_port:
            continue
        lh = listen_host.lower().strip("[]")
        if h == lh:
            return True
        if lh in _WILDCARD and (h in _LOOPBACK or h in _WILDCARD or h == socket.gethostname().lower()):
            return True
        if lh in _LOOPBACK and (h in _LOOPBACK or h in _WILDCARD):
            return True
    return False


async def _read_body(receive: Any, limit: int) -> bytes | None:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        if not message.get("more_body"):
            return b"".join(parts)


async def handle(app: Any, scope: dict, receive: Any, send: Any) -> None:
    fleet = app.fleet
    method, path = scope["method"], scope["path"]
    if path == "/workers" and method == "GET":
        body = orjson.dumps({"protocol": fleet.protocol.name, "workers": [s.describe() for s in fleet.states()]})
        return await send_json(send, 200, body)
    if path == "/workers" and method == "POST":
        raw = await _read_body(receive, 1 << 16)
        if raw is None:
            return await client_error(send, 413, "worker entry too large")
        if nesting_exceeds(raw, app.config.max_json_depth):
            return await client_error(send, 400, f"worker entry nests deeper than {app.config.max_json_depth} levels")
        try:
            spec = schema.EngineSpec.model_validate(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            return await client_error(send, 400, f"request body is not valid JSON: {exc}")
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            return await client_error(send, 400, f"invalid worker: {problems}")
        engine = to_engine(spec)
        listening = [(app.config.host, app.config.port)]
        if scope.get("server"):
            listening.append(tuple(scope["server"]))  # the address this connection reached
        if is_router_address(engine.host, engine.port, listening):
            return await client_error(send, 400, f"{engine.url} is this router's own address; "
                                      "a worker must be an engine", param="url")  # fmt: skip
        why = fleet.check_compatible(engine)
        if why is not None:
            status = 409 if "already registered" in why else 400
            return await client_error(send, status, why, code="conflict" if status == 409 else None)
        state = fleet.add(engine)
        await check_engine(state, app.config.health)  # in rotation now if it answers
        return await send_json(send, 201, orjson.dumps(state.describe()))
    if path.startswith("/workers/") and method == "DELETE":
        engine_id = unquote(path[len("/workers/") :])
        state = await fleet.remove(engine_id)
        if state is None:
            return await client_error(send, 404, f"no worker with id {engine_id!r}", code="not_found")
        return await send_json(send, 200, orjson.dumps({"removed": engine_id}))
    return await client_error(send, 405, f"{method} {path} is not supported")
