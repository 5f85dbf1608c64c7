"""A lean HTTP/1.1 client for the router's hot path: one keep-alive pool per engine.

Why not httpx: the router makes two upstream calls per request and must cost no
more CPU than a Rust router; httpx spends several hundred microseconds per call.
This client is an ``asyncio.Protocol`` with ``httptools`` parsing, one write per
request, pooled connections (LIFO), and timeouts as deadlines that one sweeper
per pool checks every ``SWEEP_S`` (no timer or task per request).

    response = await pool.request(b"POST", b"/v1/completions", body, extra_headers)
    data = await response.read()            # whole body; connection goes back to the pool
    async for chunk in response.iter_body(): ...   # streaming; pool on completion
    response.abort()                        # drop the connection (the engine aborts)

Failures raise ``pdx.errors.UpstreamError`` (connect refused, reset, timeout, bad HTTP);
``is_sent`` tells whether the engine may have started on the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator

import httptools

from pdx.errors import UpstreamError

logger = logging.getLogger(__name__)

_PAUSE_BYTES = 1 << 20  # stop reading a streaming response this far ahead of the consumer
SWEEP_S = 0.1  # timeout resolution


class _Conn(asyncio.Protocol):
    __slots__ = (
        "pool", "transport", "parser", "status", "headers", "chunks", "nbytes", "is_done",
        "is_closed", "keep_alive", "error", "waiter", "is_paused", "received_any", "deadline",
    )  # fmt: skip

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.is_closed = False
        self.waiter: asyncio.Future | None = None
        self.deadline = 0.0  # loop.time() by which the awaited event must happen; 0: none
        self.parser = httptools.HttpResponseParser(self)  # parses one response after another
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.nbytes = 0
        self.is_done = False
        self.keep_alive = True
        self.error: UpstreamError | None = None
        self.is_paused = False
        self.received_any = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad HTTP from {self.pool.name}: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        if not self.is_done:
            self._fail(UpstreamError(f"{self.pool.name} closed the connection", is_sent=self.received_any))
        self.pool._forget(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.nbytes += len(body)
        if self.nbytes > _PAUSE_BYTES and not self.is_paused and self.transport is not None:
            self.is_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.is_done = True
        self._wake()

    # waiting
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timeout(self) -> None:
        self._fail(UpstreamError(f"{self.pool.name} timed out", is_timeout=True))
        self.close()

    async def wait(self, timeout: float) -> None:
        """Wait for the next parser event (headers, body, end) or failure."""
        if self.error is not None:
            raise self.error
        pool = self.pool
        self.waiter = pool.loop.create_future()
        self.deadline = pool.loop.time() + timeout
        if pool._sweeper is None:
            pool._start_sweeper()
        try:
            await self.waiter
        finally:
            self.waiter = None
            self.deadline = 0.0
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.is_closed = True
            self.transport.close()
            self.pool._forget(self)


class Response:
    """One upstream response. Read it fully, iterate it, or abort it; exactly once."""

    __slots__ = ("conn", "status", "headers", "_released")

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._released = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self, timeout: float) -> bytes:
        conn = self.conn
        try:
            while not conn.is_done:
                await conn.wait(timeout)
        except BaseException:
            self.abort()
            raise
        data = b"".join(conn.chunks) if len(conn.chunks) != 1 else conn.chunks[0]
        self.release()
        return data

    async def iter_body(self, idle_timeout: float) -> AsyncGenerator[bytes, None]:
        """Yield body chunks as they arrive; the pool gets the connection back at the end."""
        conn = self.conn
        try:
            while True:
                while conn.chunks:
                    chunk = conn.chunks.popleft()
                    conn.nbytes -= len(chunk)
                    if conn.is_paused and conn.nbytes < _PAUSE_BYTES // 2 and conn.transport:
                        conn.is_paused = False
                        conn.transport.resume_reading()
                    yield chunk
                if conn.is_done:
                    break
                await conn.wait(idle_timeout)
        except BaseException:
            self.abort()
            raise
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self.conn
        if conn.is_done and conn.keep_alive and conn.error is None and not conn.is_closed:
            conn.pool._put_back(conn)
        else:
            conn.close()

    def abort(self) -> None:
        """Close the connection: the engine sees a disconnect and aborts the request."""
        if not self._released:
            self._released = True
            self.conn.close()


class EnginePool:
    """Keep-alive connections to one engine (``host:port``), at most ``max_connections``."""

    def __init__(
        self, name: str, host: str, port: int, *, max_connections: int = 256, connect_timeout: float = 2.0
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.host_header = f"{host}:{port}".encode()
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._waiters: deque[asyncio.Future] = deque()
        self._sweeper: asyncio.Task | None = None
        self.is_closed = False

    def _start_sweeper(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        while not self.is_closed or self._open:
            await asyncio.sleep(SWEEP_S)
            now = self.loop.time()
            for conn in [c for c in self._open if c.deadline and c.deadline <= now]:
                conn._on_timeout()

    async def _acquire(self) -> tuple[_Conn, bool]:
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed:
                    return conn, True
            if self.is_closed:
                raise UpstreamError(f"{self.name}: pool closed", is_sent=False)
            if len(self._open) < self.max_connections:
                break
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            await waiter
        placeholder = _Conn(self)  # reserve a slot while connecting
        self._open.add(placeholder)
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self), self.host, self.port),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.name}: {exc or 'timeout'}", is_sent=False) from exc
        finally:
            self._open.discard(placeholder)
        self._open.add(conn)
        return conn, False

    def _put_back(self, conn: _Conn) -> None:
        if self.is_closed:  # draining: requests finish, connections go
            conn.close()
            return
        conn.reset()
        self._idle.append(conn)
        self._wake_one()

    def _forget(self, conn: _Conn) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes = b"",
        headers: bytes = b"",
        *,
        timeout: float = 300.0,
        handle: AbortHandle | None = None,
    ) -> Response:
        """Send one request and wait for the response headers.

        ``headers`` are extra, pre-encoded ``Name: value\\r\\n`` lines. A request on a
        reused connection that the engine closed before answering is resent once.
        """
        head = (
            method + b" " + path + b" HTTP/1.1\r\nHost: " + self.host_header
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nContent-Type: application/json\r\n" + headers + b"\r\n"
        )  # fmt: skip
        for attempt in (0, 1):
            conn, reused = await self._acquire()
            assert conn.transport is not None
            if handle is not None:
                if handle.is_aborted:
                    self._put_back(conn)
                    raise UpstreamError("aborted by the router", is_sent=False)
                handle.conn = conn
            conn.transport.write(head + body if body else head)
            try:
                while not conn.status:
                    await conn.wait(timeout)
            except UpstreamError as exc:
                conn.close()
                aborted = handle is not None and handle.is_aborted
                if reused and attempt == 0 and not conn.received_any and not exc.is_timeout and not aborted:
                    continue  # stale keep-alive connection
                raise
            except BaseException:
                conn.close()
                raise
            return Response(conn)
        raise AssertionError("unreachable")

    def drain(self) -> None:
        """Take no new requests; close idle connections now and busy ones when their
        response is done (``aclose`` closes everything at once)."""
        self.is_closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        self.is_closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open) + self._idle:
            conn.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class AbortHandle:
    """Lets another task abort an in-progress request (e.g. D when P failed)."""

    __slots__ = ("conn", "is_aborted", "is_committed")

    def __init__(self) -> None:
        self.conn: _Conn | None = None
        self.is_aborted = False
        self.is_committed = False  # set once the response is being relayed: abort() is a no-op

    def abort(self) -> None:
        if self.is_committed:
            return
        self.is_aborted = True
        if self.conn is not None:
            self.conn._fail(UpstreamError("aborted by the router"))
            self.conn.close()
