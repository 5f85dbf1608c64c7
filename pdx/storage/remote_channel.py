"""One blocking control connection from an engine on another node to a store's remote port.

The same frames, timeouts and back-off as the node-local ``StoreChannel``, over TCP: the
hello carries the auth token, and its reply names the store's transport endpoint
(``transport``, ``descriptor``, ``region``) instead of a shared-memory arena. The
client connects its transport to that descriptor (``attach``) before the channel is used.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pdx.storage.channel import StoreChannel
from pdx.storage.messages import VERSION, Hello, RemoteWelcome

SCHEME = "pdx-store://"


def parse_address(address: str) -> tuple[str, int]:
    """``pdx-store://host:port`` -> (host, port); ValueError naming what is wrong."""
    if not address.startswith(SCHEME):
        raise ValueError(f"a remote store address looks like {SCHEME}HOST:PORT, got {address!r}")
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in remote store address {address!r}: {exc}") from None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"a remote store address looks like {SCHEME}HOST:PORT, got {address!r}")
    return parts.hostname, port


class RemoteChannel(StoreChannel):
    welcome = RemoteWelcome

    def __init__(
        self,
        address: str,
        token: str,
        timeout_s: float,
        retry_s: float,
        attach: Callable[[RemoteWelcome], Any],
    ):
        super().__init__(address, timeout_s, retry_s, attach_arena=_no_arena)
        self.host, self.port = parse_address(address)
        self._token = token
        self._attach_peer = attach
        self.peer: Any = None  # what ``attach`` returned: the client's view of the store endpoint

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _hello(self) -> Hello:
        return Hello(version=VERSION, token=self._token)

    def _attach(self, hello: RemoteWelcome) -> None:
        self.peer = self._attach_peer(hello)
        self.has_l2 = hello.has_l2

    def detach(self) -> None:
        super().detach()
        self.peer = None


def _no_arena(name: str, nbytes: int) -> Any:
    raise AssertionError("a remote channel maps no arena")
