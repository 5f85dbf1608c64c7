"""TCP transport: the stream protocol over TCP sockets (anywhere; the CPU default).

The target ``recv_into``s every segment straight into the registered memory; the
initiator sends one header with the whole segment table, then the payload with
``sendmsg`` over memoryviews of its registered memory (no staging copies). With
``num_streams > 1`` posts of at least ``split_bytes`` are spread over parallel
connections.

Options: ``host`` to listen on (default 127.0.0.1; use 0.0.0.0 plus
``advertise_host`` to accept remote peers), ``port`` (0: any), ``num_streams``,
``split_bytes``, ``connect_timeout``.
"""

from __future__ import annotations

import socket
from typing import Any

from .errors import DescriptorError
from .stream_transport import StreamTransport

KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}  # a silent dead host is found in ~25 s


class TcpTransport(StreamTransport):
    kind = "tcp"

    def __init__(
        self,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        **options: Any,
    ) -> None:
        self._host, self._port, self._advertise = host, port, advertise_host
        super().__init__(name, **options)

    @classmethod
    def is_available(cls) -> bool:
        return True

    def _listen(self) -> tuple[socket.socket, dict[str, Any]]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.listen(128)
        host = self._advertise or (self._host if self._host not in ("0.0.0.0", "") else socket.gethostname())
        return sock, {"host": host, "port": sock.getsockname()[1]}

    def _new_socket(self, address: dict[str, Any]) -> tuple[socket.socket, Any]:
        try:
            addr = (str(address["host"]), int(address["port"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DescriptorError(f"tcp descriptor has no valid host/port: {address}") from exc
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in KEEPALIVE.items():
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        sock.setblocking(False)
        return sock, addr
