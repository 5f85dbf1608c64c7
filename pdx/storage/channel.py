"""One blocking connection from an engine process to its node's store (client side).

A call either returns the reply or raises ``StoreUnavailable`` within its timeout;
after a failure the socket is dropped and no new connect is tried for ``retry_s``,
doubling with each failure in a row up to ``MAX_RETRY_S``, so a store that is gone
or frozen costs nothing per call between attempts. ``StorageError`` means
the store answered but refused the request (the connection stays usable). A socket the
store closed while it sat idle (its ``--idle-timeout-s``) is noticed before the next call
and replaced without counting as a failure.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import ValidationError

from pdx.errors import StorageError, StoreProtocolError, StoreUnavailable
from pdx.storage.arena import SharedArena
from pdx.storage.messages import (
    VERSION,
    ErrorReply,
    Hello,
    RemoteWelcome,
    Request,
    Welcome,
    parse_reply,
)
from pdx.storage.protocol import encode_frame, recv_body

logger = logging.getLogger(__name__)

MAX_RETRY_S = 30.0


class StoreChannel:
    welcome: type[Welcome | RemoteWelcome] = Welcome  # what this kind of store answers a hello with

    def __init__(
        self,
        socket_path: str,
        timeout_s: float,
        retry_s: float,
        attach_arena: Callable[[str, int], SharedArena],
    ):
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.arena: SharedArena | None = None  # the arena of the server this socket talks to
        self.array: np.ndarray | None = None  # [arena bytes] uint8; holds the mapping while set
        self.has_l2 = False  # that server has an L2 tier (calls may spend an L2 budget)
        self.must_verify = False  # that server lets remote peers write its arena: verify every load
        self._attach_arena = attach_arena
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._num_failures = 0  # in a row; sets the back-off

    def call(self, request: Request, *, l2_budget_s: float = 0.0) -> Any:
        """One request/reply within ``timeout_s`` (plus ``l2_budget_s`` if the store has L2);
        returns the request's reply type (``request.reply``)."""
        self._drop_if_hung_up()
        sock = self._connected()
        extra_timeout_s = l2_budget_s if self.has_l2 else 0.0
        op = request.op  # type: ignore[attr-defined]
        try:
            sock.settimeout(self.timeout_s + extra_timeout_s)
            sock.sendall(encode_frame(request))
            reply = parse_reply(recv_body(sock), request.reply)
        except (OSError, StoreProtocolError, ValidationError) as exc:  # timeouts are OSErrors
            self._fail()
            raise StoreUnavailable(f"store at {self.socket_path} failed {op!r}: {exc!r}") from exc
        if isinstance(reply, ErrorReply):
            raise StorageError(f"store refused {op!r}: {reply.error}")
        return reply

    def send(self, request: Request) -> None:
        """Send a request that gets no reply (``noreply``); failures only drop the socket."""
        self._drop_if_hung_up()
        if self._sock is None:
            return
        try:
            self._sock.settimeout(self.timeout_s)
            if not request.noreply:
                request = request.model_copy(update={"noreply": True})
            self._sock.sendall(encode_frame(request))
        except OSError:
            self._fail()

    def close(self) -> None:
        """Close the socket (the arena stays mapped until ``detach`` or a reconnect)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def detach(self) -> None:
        """Close the socket and drop this channel's hold on the arena mapping."""
        self.close()
        self.arena = None
        self.array = None

    def _drop_if_hung_up(self) -> None:
        """Close, without a back-off, a socket that has something to read between calls: the
        store closed it (idle timeout, restart) and may have said why."""
        sock = self._sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            logger.debug("store at %s closed an idle connection; reconnecting", self.socket_path)
            self.close()

    def _fail(self) -> None:
        self.close()
        self._num_failures += 1
        back_off = min(self.retry_s * 2 ** (self._num_failures - 1), MAX_RETRY_S)
        self._retry_at = time.monotonic() + back_off

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        if time.monotonic() < self._retry_at:
            raise StoreUnavailable(f"store at {self.socket_path} is down; retrying later")
        sock: socket.socket | None = None
        try:
            sock = self._open()
            sock.sendall(encode_frame(self._hello()))
            hello = parse_reply(recv_body(sock), self.welcome)
            if isinstance(hello, ErrorReply):
                raise StoreProtocolError(f"store refused the connection: {hello.error}")
            if hello.version != VERSION:
                raise StoreProtocolError(f"store speaks protocol v{hello.version}, client v{VERSION}")
            self._attach(hello)
        except (OSError, StorageError, ValidationError, ValueError) as exc:
            if sock is not None:
                sock.close()
            self._fail()
            raise StoreUnavailable(
                f"cannot connect to the store at {self.socket_path}: {exc}"
            ) from exc
        self._sock = sock
        self._num_failures = 0
        return sock

    # -- hooks (``pdx.storage.remote_channel`` overrides them for remote stores) ---------------
    def _open(self) -> socket.socket:
        """A connected blocking socket with ``timeout_s`` set."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout_s)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _hello(self) -> Hello:
        return Hello(version=VERSION)

    def _attach(self, hello: Any) -> None:
        """Map what the hello reply (``Welcome``) names: the node's arena."""
        self.arena = self._attach_arena(hello.arena, hello.arena_bytes)
        self.array = self.arena.array
        self.has_l2 = hello.has_l2
        self.must_verify = hello.verify_loads
