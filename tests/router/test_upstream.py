"""The router's pooled HTTP/1.1 client against a raw loopback server."""

from __future__ import annotations

import asyncio

import pytest

from pdx.errors import UpstreamError
from pdx.router.upstream import AbortHandle, EnginePool

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """Answers each request with ``reply`` (or not at all); counts connections."""

    def __init__(self, reply: bytes | None = OK, close_after: bool = False, delay: float = 0.0) -> None:
        self.reply, self.close_after, self.delay = reply, close_after, delay
        self.num_connections = 0
        self.max_open = 0
        self.open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))  # fmt: skip
                await reader.readexactly(length)
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.reply is None:
                    await reader.read(1)  # never answer; returns when the client closes
                    break
                writer.write(self.reply)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_keep_alive_connections_are_reused():
    async def main():
        server = Server()
        async with server as port:
            pool = EnginePool("e", "127.0.0.1", port)
            for _ in range(5):
                resp = await pool.request(b"POST", b"/x", b"{}")
                assert resp.status == 200 and await resp.read(5) == b"{}"
            await pool.aclose()
        return server.num_connections

    assert run(main()) == 1


def test_a_connection_the_engine_closed_is_replaced_transparently():
    async def main():
        server = Server(close_after=True)
        async with server as port:
            pool = EnginePool("e", "127.0.0.1", port)
            for _ in range(3):
                resp = await pool.request(b"POST", b"/x", b"{}")
                assert await resp.read(5) == b"{}"
                await asyncio.sleep(0.05)
            await pool.aclose()
        return server.num_connections

    assert run(main()) == 3


def test_the_pool_never_opens_more_than_max_connections():
    async def main():
        server = Server(delay=0.05)
        async with server as port:
            pool = EnginePool("e", "127.0.0.1", port, max_connections=2)

            async def one():
                resp = await pool.request(b"POST", b"/x", b"{}")
                return await resp.read(5)

            bodies = await asyncio.gather(*(one() for _ in range(6)))
            await pool.aclose()
        return bodies, server.max_open

    bodies, max_open = run(main())
    assert bodies == [b"{}"] * 6 and max_open <= 2


def test_timeouts_refusals_and_aborts_raise_upstream_error():
    async def main():
        server = Server(reply=None)
        async with server as port:
            pool = EnginePool("e", "127.0.0.1", port)
            with pytest.raises(UpstreamError) as err:
                await pool.request(b"POST", b"/x", b"{}", timeout=0.3)
            assert err.value.is_timeout
            handle = AbortHandle()
            asyncio.get_running_loop().call_later(0.1, handle.abort)
            with pytest.raises(UpstreamError, match="aborted"):
                await pool.request(b"POST", b"/x", b"{}", timeout=10, handle=handle)
            await pool.aclose()
            await asyncio.sleep(0.1)
            assert server.open == 0  # every connection was closed: the engine saw the abort
        refused = EnginePool("gone", "127.0.0.1", port)
        with pytest.raises(UpstreamError) as err:
            await refused.request(b"POST", b"/x", b"{}")
        assert not err.value.is_sent  # nothing reached an engine: always safe to retry
        await refused.aclose()

    run(main())
