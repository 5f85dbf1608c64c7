"""Wire format of the store's hot path: length-prefixed JSON frames over a unix socket.

Each frame is a 4-byte big-endian length followed by a UTF-8 JSON object. A client
sends one request and reads one reply (``{"ok": true, ...}`` or ``{"ok": false,
"error": "..."}``). Chunk keys travel as hex strings; one request carries a whole
batch of keys, so a request costs one round trip however many chunks it names.

Requests (``op`` and fields) and replies:

    hello                                  -> arena, arena_bytes, has_l2, version
    lookup   keys                          -> num_chunks (L1 + L2 leading run), num_l1
    acquire  keys, budget_s                -> lease, chunks [[offset, nbytes, checksum], ...]
    release  lease, copy_s                 -> {}
    reserve  keys, sizes                   -> lease, offsets [offset | null (skip)]
    commit   lease, checksums, copy_s      -> num_committed
    abort    lease                         -> {}
    pin / unpin  keys                      -> num_chunks
    clear    l2                            -> num_chunks (removed from L1)
    stats                                  -> the server's stats dict

``acquire`` returns the leading run of stored chunks (promoting from L2 within
``budget_s``) under one read lease; the chunks cannot be evicted or overwritten
until ``release`` (or the connection closes, or the lease TTL passes).
``reserve`` hands out FILLING slots under a write lease; ``commit`` publishes
those whose checksum is given and frees the rest.

Remote clients (``remote_server.py``) speak the same frames over TCP; their hello carries
``token`` and its reply names the store's transport endpoint instead of the arena.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

VERSION = 1
MAX_FRAME = 64 << 20  # bytes; a batch of 100k keys is about 7 MB
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A peer sent something that is not a valid frame."""


def encode_frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


async def read_frame(reader: Any) -> dict[str, Any] | None:
    """Read one frame from an ``asyncio.StreamReader``; None at a clean EOF."""
    import asyncio

    try:
        header = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside a frame header") from exc
    (length,) = _LEN.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return decode_body(await reader.readexactly(length))


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Read one frame from a blocking socket (honours the socket's timeout)."""
    (length,) = _LEN.unpack(_recv_exactly(sock, _LEN.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return decode_body(_recv_exactly(sock, length))


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


def parse_keys(value: Any) -> list[bytes]:
    """Hex strings -> keys; raises ValueError naming the problem."""
    if not isinstance(value, list):
        raise ValueError("'keys' must be a list of hex strings")
    try:
        return [bytes.fromhex(k) for k in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"'keys' must be hex strings: {exc}") from None
