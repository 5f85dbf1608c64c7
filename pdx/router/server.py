"""uvicorn's httptools protocol with one socket write per loop iteration.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, then the body in a second write: two syscalls and two
wake-ups of the client for every small JSON answer. ``CoalescingHttpToolsProtocol``
gives uvicorn a transport whose ``write`` buffers until the end of the current
event-loop iteration, so headers and body leave in one segment. Streams still
flush every iteration (each SSE chunk goes out as soon as it is relayed).

Use it as ``uvicorn.Config(app, http=CoalescingHttpToolsProtocol)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
