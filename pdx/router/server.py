"""uvicorn's httptools protocol with one socket write per loop iteration.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, then the body in a second write: two syscalls and two
wake-ups of the client for every small JSON answer. ``CoalescingHttpToolsProtocol``
gives uvicorn a transport whose ``write`` buffers until the end of the current
event-loop iteration, so headers and body leave in one segment. Streams still
flush every iteration (each SSE chunk goes out as soon as it is relayed).

It also bounds how long a client may hold a connection without completing a
request (slowloris): the request line and headers must arrive within
``header_s`` of their first byte, the body within ``body_s`` of the headers, and
an idle connection (nothing sent yet, or between requests) is closed after
``keep_alive_s``. A request that runs out of time gets a 408 and the connection
closes. ``uvicorn_options(router_config)`` gives the settings; the defaults of
the class suit tests that pass ``http=CoalescingHttpToolsProtocol`` directly.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pdx.router.respond import error_body

if TYPE_CHECKING:
    from pdx.config.topology import ClientTimeouts, RouterConfig


class _CoalescingTransport:
    __slots__ = ("_transport", "_loop", "_buffer", "_is_scheduled")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._is_scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._buffer.append(data)
        if not self._is_scheduled:
            self._is_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._is_scheduled = False
        buffer = self._buffer
        if not buffer or self._transport.is_closing():
            buffer.clear()
            return
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, is_closing, pause_reading, ...
        return getattr(self._transport, name)


def _timeout_response(message: str) -> bytes:
    body = error_body(message, "timeout_error", code=408)
    head = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # first byte of a request -> end of its headers
    body_timeout_s = 30.0  # end of the headers -> end of the body

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._is_awaiting_headers = True
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        # a connection that never sends a byte gets the keep-alive timeout
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._is_awaiting_headers and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._time_out, "headers")
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._is_awaiting_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._time_out, "body")

    def on_message_complete(self) -> None:
        self._is_awaiting_headers = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        super().connection_lost(exc)

    def _time_out(self, part: str) -> None:
        if part == "headers":
            self._header_timer = None
            limit = self.header_timeout_s
        else:
            self._body_timer = None
            limit = self.body_timeout_s
        if self.transport.is_closing():
            return
        cycle = self.cycle
        is_responding = part == "body" and cycle is not None and cycle.response_started
        if not is_responding:
            self.transport.write(_timeout_response(f"request {part} not received within {limit:g} s"))
        self.transport.close()  # the app's receive() sees http.disconnect


def http_protocol(timeouts: ClientTimeouts) -> type[CoalescingHttpToolsProtocol]:
    """The protocol class with ``timeouts`` (the keep-alive one goes to uvicorn itself)."""
    return type(
        "CoalescingHttpToolsProtocol",
        (CoalescingHttpToolsProtocol,),
        {"header_timeout_s": timeouts.header_s, "body_timeout_s": timeouts.body_s},
    )


def uvicorn_options(cfg: RouterConfig) -> dict[str, Any]:
    """The ``uvicorn.Config`` settings that bound client connections by ``cfg.client_timeouts``."""
    return {"http": http_protocol(cfg.client_timeouts), "timeout_keep_alive": cfg.client_timeouts.keep_alive_s}
