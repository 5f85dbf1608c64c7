"""Same-host transport: one copy by cross-memory attach, control over a unix socket.

The target endpoint pulls each written segment straight from the initiator's
memory into its own with ``process_vm_readv`` (reads: ``process_vm_writev``),
so any registered memory works with a single copy, including memory the engine
allocated itself (vLLM's KV cache), and nothing is created in /dev/shm that a
killed process could leave behind. The unix socket (abstract namespace) carries
segment tables, acks and notifications, and its EOF is how a dead peer is seen.

Where the kernel forbids cross-memory attach (Yama ``ptrace_scope`` >= 2, or
processes of different users) the handshake probe fails and the payload goes
through the unix socket instead (the ``tcp`` receive path: ``recv_into``
straight into the target memory).

Options: ``copy_threads`` (default 1): threads the target uses to pull one
frame of at least 2 MiB, the receiving thread included (``cma.py``); more helps
only where one core cannot use the memory bandwidth (on a 2-vCPU VM two threads
copied slower than one); ``allow_cma`` (default True; False forces the socket
path); ``num_streams``, ``split_bytes``, ``connect_timeout`` as for ``tcp``.
"""

from __future__ import annotations

import socket
from typing import Any

from .descriptor import Descriptor, host_id
from .errors import ConnectError, DescriptorError
from .stream_transport import StreamTransport


class ShmTransport(StreamTransport):
    kind = "shm"
    allow_cma = True

    def __init__(self, name: str | None = None, allow_cma: bool = True, copy_threads: int = 1, **options: Any) -> None:
        if copy_threads < 1:
            raise ValueError("copy_threads must be >= 1")
        self.allow_cma = allow_cma
        self.copy_threads = copy_threads
        super().__init__(name, **options)

    @classmethod
    def is_available(cls) -> bool:
        return hasattr(socket, "AF_UNIX")

    def _listen(self) -> tuple[socket.socket, dict[str, Any]]:
        path = f"pdx-shm-{self.name}-{self.instance[:12]}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind("\0" + path)  # abstract namespace: nothing on disk to clean up
        sock.listen(128)
        return sock, {"path": path}

    def _check_reachable(self, desc: Descriptor) -> None:
        if desc.host != host_id():
            raise ConnectError(f"shm peer {desc.name!r} runs on another host ({desc.host}); use tcp or nixl")

    def _new_socket(self, address: dict[str, Any]) -> tuple[socket.socket, Any]:
        path = address.get("path")
        if not isinstance(path, str) or not path:
            raise DescriptorError(f"shm descriptor has no socket path: {address}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock, "\0" + path
