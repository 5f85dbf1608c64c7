"""Wire format of the store's engine protocol: length-prefixed JSON frames.

Each frame is a 4-byte big-endian length followed by a UTF-8 JSON object, one typed
message of ``messages.py``: a client sends one request and reads one reply. Engines on
the node speak it over a unix socket (``server.py``), engines on other nodes over TCP
(``remote_server.py``). ``serve_requests`` is the serving loop of both.

A frame over ``MAX_FRAME``, one nested deeper than ``MAX_DEPTH`` (checked before it is
parsed) or one that is not a JSON object is a ``StoreProtocolError``: the server answers
"malformed frame" and closes the connection. A well-formed frame whose request fails
validation is answered with an ``ErrorReply`` naming the field, and the connection stays.
A connection whose first frame does not arrive within the hello timeout, or that then
sends nothing for the idle timeout, is closed (``ConnectionTimeout``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from pdx.errors import StoreBadRequest, StoreProtocolError
from pdx.storage.messages import ErrorReply, Message, Request, is_noreply, parse_request

MAX_FRAME = 64 << 20  # bytes; a batch of 100k keys is about 7 MB
MAX_DEPTH = 16  # JSON nesting; every message of ``messages.py`` is at most 3 deep
_LEN = struct.Struct(">I")
_OPEN, _CLOSE = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1


class ConnectionTimeout(Exception):
    """A connection sent no hello, or nothing at all, within its timeout (the server closes it)."""


def check_depth(body: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``StoreProtocolError`` if ``body`` nests brackets deeper than ``max_depth``.

    Runs before any JSON parser sees the body. Brackets inside strings count too (an
    upper bound): store messages carry hex keys and numbers, never bracketed text."""
    if body.count(b"[") + body.count(b"{") <= max_depth:  # every real request: no scan
        return
    raw = np.frombuffer(body, np.uint8)
    depth = np.cumsum(_OPEN[raw] - _CLOSE[raw], dtype=np.int64)
    if len(depth) and int(depth.max()) > max_depth:
        raise StoreProtocolError(f"frame nests deeper than {max_depth} levels")


def encode_frame(msg: Message | dict[str, Any]) -> bytes:
    if isinstance(msg, Message):
        body = msg.to_wire()
    else:  # raw objects: tools and tests that speak the wire by hand
        body = json.dumps(msg, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


async def read_body(reader: asyncio.StreamReader) -> bytes | None:
    """One frame's body from a stream; None at a clean EOF."""
    try:
        header = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise StoreProtocolError("connection closed inside a frame header") from exc
    return await reader.readexactly(_checked_length(header))


def recv_body(sock: socket.socket) -> bytes:
    """One frame's body from a blocking socket (honours the socket's timeout)."""
    return _recv_exactly(sock, _checked_length(_recv_exactly(sock, _LEN.size)))


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """One frame as a plain object, for tools and tests that speak the wire by hand."""
    body = recv_body(sock)
    check_depth(body)
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise StoreProtocolError("frame is not a JSON object")
    return obj


async def read_body_within(reader: asyncio.StreamReader, timeout_s: float, what: str) -> bytes | None:
    """``read_body`` that raises ``ConnectionTimeout`` when the whole frame takes over ``timeout_s``
    (0: no limit)."""
    if timeout_s <= 0:
        return await read_body(reader)
    try:
        async with asyncio.timeout(timeout_s):
            return await read_body(reader)
    except TimeoutError:
        raise ConnectionTimeout(f"no {what} within {timeout_s:g} s") from None


async def serve_requests(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[Request], Awaitable[Message]],
    idle_timeout_s: float = 0.0,
    first_timeout_s: float | None = None,
) -> None:
    """Answer each request with ``handle``'s reply until EOF; a request that fails validation
    gets an ``ErrorReply``. Raises ``StoreProtocolError`` on a malformed frame and
    ``ConnectionTimeout`` when the first frame takes over ``first_timeout_s`` (default: the
    idle timeout) or a later one over ``idle_timeout_s`` (0: no limit)."""
    timeout_s, what = (idle_timeout_s, "request") if first_timeout_s is None else (first_timeout_s, "hello")
    while (body := await read_body_within(reader, timeout_s, what)) is not None:
        timeout_s, what = idle_timeout_s, "request"
        check_depth(body)
        try:
            request = parse_request(body)
        except StoreBadRequest as exc:
            if not is_noreply(body):
                await send_reply(writer, ErrorReply(error=str(exc)))
            continue
        reply = await handle(request)
        if not request.noreply:
            await send_reply(writer, reply)


async def send_reply(writer: asyncio.StreamWriter, reply: Message) -> None:
    try:
        writer.write(encode_frame(reply))
        await writer.drain()
    except ConnectionError:
        pass


def _checked_length(header: bytes) -> int:
    (length,) = _LEN.unpack(header)
    if length > MAX_FRAME:
        raise StoreProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return length


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("store closed the connection")
        got += k
    return bytes(buf)
