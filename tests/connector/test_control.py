"""The control channel refuses bad peers and survives them."""

from __future__ import annotations

import asyncio

import pytest

from pdx.connector.control import (
    ControlClient,
    ControlError,
    ControlHandler,
    ControlServer,
    LayoutMsg,
    Register,
    Release,
)
from pdx.errors import LayoutError
from pdx.layout import vllm_cpu, vllm_flash


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
                                     num_tokens=4, layout=LayoutMsg.of(vllm_cpu(1, 1, 1, 4, "float32")), layers=[],
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


def test_a_layout_crosses_the_wire_with_its_fingerprint_and_a_tampered_one_is_refused():
    from dataclasses import replace

    layout = replace(vllm_flash(4, 8, 128, 16, "bfloat16", order="NHD", tp_size=2, tp_rank=1), block_stride=70000)
    msg = LayoutMsg.model_validate_json(LayoutMsg.of(layout).model_dump_json())
    assert msg.fingerprint == layout.fingerprint() and msg.to_layout() == layout
    with pytest.raises(LayoutError, match="does not match its description"):
        msg.model_copy(update={"dtype": "float16"}).to_layout()  # same bytes per block, other dtype
    with pytest.raises(LayoutError, match="unknown KV layout kind"):
        msg.model_copy(update={"kind": "vllm_xyz"}).to_layout()
    with pytest.raises(ValueError):
        LayoutMsg.model_validate({**msg.model_dump(), "fingerprint": "not hex"})


def test_silent_and_idle_connections_are_closed():
    """No hello within the hello timeout: closed. Idle with no transfer: closed, and D's next
    request reconnects (``ControlClient.is_closed``)."""

    async def main():
        server = ControlServer("127.0.0.1", 0, "tok", Recorder(), hello_timeout_s=0.3, idle_timeout_s=0.5)
        await server.start()
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # silent: closed
            assert loop.time() - start < 3
            writer.close()

            idle = ControlClient("127.0.0.1", server.port, "tok", "d", lambda t, r: None)
            await idle.connect()
            for _ in range(50):
                if idle.is_closed:
                    break
                await asyncio.sleep(0.1)
            assert idle.is_closed
            await idle.aclose()
        finally:
            await server.aclose()

    asyncio.run(main())


def test_a_deeply_nested_line_closes_the_connection_and_the_server_keeps_serving():
    async def main():
        handler = Recorder()
        server = ControlServer("127.0.0.1", 0, "tok", handler)
        await server.start()
        try:
            deep = b"[" * 100_000 + b"]" * 100_000 + b"\n"
            for first in (b"", b'{"op": "hello", "token": "tok"}\n'):  # before and after the hello
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(first + deep)
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 5)
                assert data in (b"", b'{"op":"reply","seq":0,"ok":true,"error":""}\n')
                writer.close()
            good = ControlClient("127.0.0.1", server.port, "tok", "d", lambda t, r: None)
            await good.connect()
            reply = await good.request(lambda seq: Release(seq=seq, transfer_id="ef" * 8), timeout=5)
            assert reply.ok and handler.released == ["ef" * 8]
            await good.aclose()
        finally:
            await server.aclose()

    asyncio.run(main())
