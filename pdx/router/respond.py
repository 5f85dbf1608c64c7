"""Writing ASGI responses: JSON bodies and OpenAI-style error bodies.

The dispatcher writes generation responses with these; the app writes the small
JSON answers of its other routes (health, ready, models, workers) with them too.
"""

from __future__ import annotations

from typing import Any

import orjson

_JSON = b"application/json"


async def send_json(
    send: Any, status: int, body: bytes, content_type: bytes = _JSON, request_id: str | None = None
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_body(message: str, type_: str, *, param: str | None = None, code: Any = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


async def client_error(
    send: Any, status: int, message: str, type_: str = "invalid_request_error", *, param: str | None = None,
    code: Any = None,
) -> None:
    """Send ``{"error": {...}}`` with ``status`` (4xx for client input, 5xx for engine trouble)."""
    await send_json(send, status, error_body(message, type_, param=param, code=code if code is not None else status))
