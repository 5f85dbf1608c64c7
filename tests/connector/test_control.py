"""The control channel refuses bad peers and survives them."""

from __future__ import annotations

import asyncio

import pytest

from pdx.connector.control import (
    ControlClient,
    ControlError,
    ControlHandler,
    ControlServer,
    Register,
    Release,
)


class Recorder(ControlHandler):
    def __init__(self) -> None:
        self.released: list[str] = []

    async def on_register(self, conn, msg: Register) -> None:
        raise ControlError("no such transfer")

    async def on_release(self, conn, msg: Release) -> None:
        self.released.append(msg.transfer_id)


def test_garbage_and_bad_tokens_are_dropped_and_good_clients_still_served():
    async def main():
        handler = Recorder()
        server = ControlServer("127.0.0.1", 0, "tok", handler)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b'{"op": "register", "oops": 1}\n')  # no hello, bad schema
            await writer.drain()
            assert await reader.read() == b""  # closed by the server
            writer.close()

            bad = ControlClient("127.0.0.1", server.port, "wrong", "d", lambda t, r: None)
            with pytest.raises(ControlError, match="auth_token"):
                await bad.connect()

            good = ControlClient("127.0.0.1", server.port, "tok", "d", lambda t, r: None)
            await good.connect()
            reply = await good.request(lambda seq: Release(seq=seq, transfer_id="ab" * 8), timeout=5)
            assert reply.ok and handler.released == ["ab" * 8]
            reply = await good.request(
                lambda seq: Register(seq=seq, transfer_id="cd" * 8, block_ids=[1], first_block=0,
                                     num_tokens=4, block_size=4, block_nbytes=8, layers=[],
                                     descriptor=""), timeout=5)
            assert not reply.ok and reply.error == "no such transfer"
            await good.aclose()
        finally:
            await server.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_lost_connection_fails_every_open_transfer():
    async def main():
        server = ControlServer("127.0.0.1", 0, "tok", Recorder())
        await server.start()
        failed: list[tuple[str, str]] = []
        client = ControlClient("127.0.0.1", server.port, "tok", "d", lambda t, r: failed.append((t, r)))
        await client.connect()
        client.transfer_ids.update({"ab" * 8, "cd" * 8})
        await server.aclose()
        for _ in range(100):
            if len(failed) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(t for t, _ in failed) == ["ab" * 8, "cd" * 8]
        assert all("lost" in r for _, r in failed)

    asyncio.run(asyncio.wait_for(main(), 30))
