"""Operator HTTP API of the store (JSON), plus Prometheus ``/metrics``.

    GET  /healthz                      200 "ok"
    GET  /stats                        the stats dict
    GET  /metrics                      Prometheus text format
    POST /lookup  {"keys": [hex...]}   {"num_chunks", "num_l1"}
    POST /pin     {"keys": [hex...]}   {"num_chunks"}   (pinned chunks are never evicted)
    POST /unpin   {"keys": [hex...]}   {"num_chunks"}
    POST /clear   {"l2": false}        {"num_chunks"}   (removed from L1; L2 too if l2)

Operators call it rarely, so it is a few lines of HTTP/1.1 on the store's own
event loop (one request per connection) rather than a web framework; engines use
the unix socket. Bad input gets a 400 naming the field.

Authentication: ``Authorization: Bearer <token>`` with the store's ``--http-token``
(default: its ``--remote-token``). When a token is set, ``/clear``, ``/pin`` and
``/unpin`` need it; when the API is bound beyond loopback (a token is then required at
start-up) every endpoint but ``/healthz`` needs it. Otherwise 401. A request must arrive
whole within ``REQUEST_TIMEOUT_S`` (408), and a body nests at most ``MAX_DEPTH`` deep.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pdx.errors import StoreBadRequest, StoreProtocolError
from pdx.storage.config import http_token_of, is_loopback
from pdx.storage.messages import ErrorReply, parse_request
from pdx.storage.metrics import create_registry, render
from pdx.storage.protocol import check_depth

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pdx.storage.server import StoreServer

logger = logging.getLogger(__name__)

MAX_BODY = 64 << 20
REQUEST_TIMEOUT_S = 30.0  # the whole request (line, headers, body)
MAX_HEADERS = 100
MUTATING = ("/clear", "/pin", "/unpin")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    503: "Service Unavailable",
}


class KeysBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str]  # chunk keys, hex


class ClearBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l2: bool = False  # also clear the L2 tier


async def start_http(server: StoreServer, host: str, port: int) -> asyncio.Server:
    registry = create_registry(server.stats)  # this server's own, never the global one
    auth = _Auth(http_token_of(server.config.http_token, server.config.auth_token), is_loopback(host))
    if not auth.token and not auth.is_loopback:  # StoreOptions refuses this config first
        raise ValueError(f"the HTTP API on {host} needs --http-token (PDX_STORE_HTTP_TOKEN)")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, ctype, body = await _serve_one(server, reader, registry, auth)
        except TimeoutError:
            status, ctype, body = 408, "application/json", _json({"error": f"no request within {REQUEST_TIMEOUT_S} s"})
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, StoreProtocolError) as exc:
            status, ctype, body = (
                400,
                "application/json",
                _json({"error": f"malformed request: {exc}"}),
            )
        extra = 'WWW-Authenticate: Bearer realm="pdx store"\r\n' if status == 401 else ""
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


class _Auth:
    __slots__ = ("token", "is_loopback")

    def __init__(self, token: str, is_loopback: bool) -> None:
        self.token = token  # empty: none configured (loopback only)
        self.is_loopback = is_loopback

    def is_needed(self, path: str) -> bool:
        return bool(self.token) and (path in MUTATING or (not self.is_loopback and path != "/healthz"))

    def is_valid(self, header: str) -> bool:
        scheme, _, presented = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self.token.encode())


async def _serve_one(
    server: StoreServer, reader: asyncio.StreamReader, registry: CollectorRegistry, auth: _Auth
) -> tuple[int, str, bytes]:
    request_line = (await reader.readline()).decode("latin-1").split()
    if len(request_line) != 3:
        raise ValueError("bad request line")
    method, path = request_line[0], request_line[1].split("?", 1)[0]
    length = 0
    authorization = ""
    for _ in range(MAX_HEADERS + 1):
        if (line := await reader.readline()) in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "authorization":
            authorization = value
    else:
        raise ValueError(f"over {MAX_HEADERS} header lines")
    if auth.is_needed(path) and not auth.is_valid(authorization):
        return 401, "application/json", _json({"error": f"{path} needs 'Authorization: Bearer <token>' with the "
                                                        "store's --http-token (default: its --remote-token)"})  # fmt: skip
    if length > MAX_BODY:
        return 413, "application/json", _json({"error": f"body over {MAX_BODY} bytes"})
    raw = await reader.readexactly(length) if length else b""
    check_depth(raw)

    if method == "GET":
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/stats":
            return 200, "application/json", _json(server.stats())
        if path == "/metrics":
            body, content_type = render(registry)
            return 200, content_type, body
    elif method == "POST" and path in ("/lookup", "/pin", "/unpin", "/clear"):
        model = ClearBody if path == "/clear" else KeysBody
        try:
            parsed = model.model_validate_json(raw or b"{}")
            reply = await server.dispatch(parse_request({"op": path[1:], **parsed.model_dump()}), None)
        except ValidationError as exc:
            return 400, "application/json", _json({"error": _first_error(exc)})
        except StoreBadRequest as exc:
            return 400, "application/json", _json({"error": str(exc)})
        if isinstance(reply, ErrorReply):
            return (503 if reply.is_unavailable else 400), "application/json", _json({"error": reply.error})
        return 200, "application/json", _json(reply.model_dump(exclude={"ok"}))
    if path in ("/healthz", "/stats", "/metrics", "/lookup", "/pin", "/unpin", "/clear"):
        return 405, "application/json", _json({"error": f"{method} not allowed on {path}"})
    return 404, "application/json", _json({"error": f"no such endpoint {path}"})


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{field}: {err.get('msg')}"


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()
