"""Wire format and socket helpers of the stream transports (``tcp``, ``shm``).

One connection = one or more streams (sockets). On each stream the initiator
sends frames and the target answers every frame with an ack, in order::

    hello   u32 length + JSON, both directions, once per stream
    frame   FRAME header | int64 table [num_segments, 4] | notif bytes | payload
            table columns: remote_region, remote_offset, nbytes, initiator_addr
            payload: the bytes of every row, in order (write, inline mode only)
    ack     ACK header | int32 failed rows (part-local) | error text | payload
            payload: the bytes of every row not failed (read, inline mode only)

In ``cma`` mode (same host, cross-memory attach permitted) no payload crosses
the socket: the target copies with ``process_vm_readv``/``process_vm_writev``
straight between the initiator's and its own memory (``cma.py``).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

FRAME = struct.Struct("<4sBBHQIIII")  # magic, op, mode, 0, transfer_id, part, num_parts, num_segments, notif_len
ACK = struct.Struct("<4sBBHQIII")  # magic, op, 0, 0, transfer_id, part, num_failed, error_len
FRAME_MAGIC, ACK_MAGIC = b"PDXF", b"PDXA"
OP_WRITE, OP_READ = 1, 2
MODE_INLINE, MODE_CMA = 0, 1
TABLE_COLUMNS = 4
IOV_MAX = 1024  # buffers per sendmsg/recvmsg call
MAX_HELLO = 1 << 16


class ProtocolError(ConnectionError):
    """The peer sent something that is not the pdx stream protocol."""


def send_json(sock: socket.socket, doc: dict[str, Any]) -> None:
    data = json.dumps(doc).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


def recv_json(sock: socket.socket) -> dict[str, Any]:
    (n,) = struct.unpack("<I", recv_exact(sock, 4))
    if n > MAX_HELLO:
        raise ProtocolError(f"hello of {n} bytes is too large")
    doc = json.loads(recv_exact(sock, n))
    if not isinstance(doc, dict):
        raise ProtocolError("hello is not a JSON object")
    return doc


def recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    recv_views(sock, [memoryview(buf)])
    return bytes(buf)


def recv_views(sock: socket.socket, views: list[memoryview]) -> None:
    """Fill every view from the socket (scatter reads); ConnectionError on EOF."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        if len(views) - i == 1:
            got = sock.recv_into(views[i])
        else:
            got = sock.recvmsg_into(views[i : i + IOV_MAX])[0]
        if got == 0:
            raise ConnectionResetError("peer closed the connection")
        while got:
            n = len(views[i])
            if got >= n:
                got -= n
                i += 1
            else:
                views[i] = views[i][got:]
                got = 0


def send_views(sock: socket.socket, views: list[Any]) -> None:
    """Send every buffer (gather writes), handling partial sends."""
    views = [memoryview(v).cast("B") for v in views if len(v)]
    i = 0
    while i < len(views):
        if len(views) - i == 1:
            sock.sendall(views[i])
            return
        sent = sock.sendmsg(views[i : i + IOV_MAX])
        while sent:
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def discard(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and drop ``nbytes`` (payload of segments the target rejected)."""
    while nbytes:
        n = min(nbytes, len(scratch))
        recv_views(sock, [scratch[:n]])
        nbytes -= n
