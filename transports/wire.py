"""Wire format and socket/CMA helpers of the stream transports (``tcp``, ``shm``).

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
straight between the initiator's and its own memory.
"""

from __future__ import annotations

import ctypes
import json
import socket
import struct
from typing import Any

import numpy as np

FRAME = struct.Struct("<4sBBHQIIII")  # magic, op, mode, 0, transfer_id, part, num_parts, num_segments, notif_len
ACK = struct.Struct("<4sBBHQIII")  # magic, op, 0, 0, transfer_id, part, num_failed, error_len
FRAME_MAGIC, ACK_MAGIC = b"PDXF", b"PDXA"
OP_WRITE, OP_READ = 1, 2
MODE_INLINE, MODE_CMA = 0, 1
TABLE_COLUMNS = 4
IOV_MAX = 1024
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


# -- cross-memory attach ---------------------------------------------------------------
_libc: Any = None


def _cma() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        for fn in (libc.process_vm_readv, libc.process_vm_writev):
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        _libc = libc
    return _libc


def cma_copy(pid: int, local: np.ndarray, remote: np.ndarray, nbytes: np.ndarray, is_read: bool) -> np.ndarray:
    """Copy rows between this process (``local`` addresses) and ``pid`` (``remote`` addresses).

    ``is_read`` pulls remote -> local. Returns a bool mask of rows that failed.
    """
    fn = _cma().process_vm_readv if is_read else _cma().process_vm_writev
    n = len(nbytes)
    failed = np.zeros(n, dtype=bool)
    liov = np.empty((n, 2), dtype=np.uint64)
    riov = np.empty((n, 2), dtype=np.uint64)
    liov[:, 0], liov[:, 1] = local, nbytes
    riov[:, 0], riov[:, 1] = remote, nbytes
    for start in range(0, n, IOV_MAX):
        k = min(IOV_MAX, n - start)
        want = int(nbytes[start : start + k].sum())
        done = fn(pid, liov[start:].ctypes.data, k, riov[start:].ctypes.data, k, 0)
        if done == want:
            continue
        # partial transfers stop at an iovec boundary: redo row by row to find the bad ones
        for row in range(start, start + k):
            one = fn(pid, liov[row:].ctypes.data, 1, riov[row:].ctypes.data, 1, 0)
            failed[row] = one != int(nbytes[row])
    return failed


def cma_probe(pid: int, addr: int, expected: bytes) -> bool:
    """Whether this process may read ``pid``'s memory (same host, ptrace permission)."""
    buf = np.zeros(len(expected), dtype=np.uint8)
    try:
        failed = cma_copy(pid, np.array([buf.ctypes.data]), np.array([addr]), np.array([len(expected)]), True)
    except (OSError, AttributeError):
        return False
    return not failed[0] and buf.tobytes() == expected
