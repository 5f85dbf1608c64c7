"""The engine protocol validates every request and reply: a malformed or unknown request
gets an error reply naming the problem (the connection stays), a frame that is not the
protocol gets "malformed frame" and the connection closes; the store never crashes or
hangs, and a client never takes a malformed reply for an answer."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from pdx.errors import StorageError, StoreBadRequest, StoreProtocolError, StoreUnavailable
from pdx.storage.messages import (
    MAX_KEYS,
    VERSION,
    Acquire,
    Clear,
    Lookup,
    LookupReply,
    Release,
    Reserve,
    parse_reply,
    parse_request,
)
from pdx.storage.protocol import MAX_FRAME, encode_frame, recv_frame
from tests.storage.helpers import make_keys

KEY = make_keys(1, "proto")[0].hex()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"op": "explode"}, "unknown op 'explode'"),
        ({"keys": [KEY]}, "needs an 'op'"),
        ({"op": "lookup", "keys": ["zz"]}, "'keys' must be hex"),
        ({"op": "lookup", "keys": [KEY], "bogus": 1}, "bogus"),
        ({"op": "lookup"}, "keys: Field required"),
        ({"op": "reserve", "keys": [KEY], "sizes": [1, 2]}, "one positive int per key"),
        ({"op": "reserve", "keys": [KEY], "sizes": [0]}, "sizes.0"),
        ({"op": "commit", "lease": "one", "checksums": []}, "lease"),
        ({"op": "release", "lease": 1, "copy_s": -1.0}, "copy_s"),
        ({"op": "lookup", "keys": [KEY] * (MAX_KEYS + 1)}, "keys"),
        ({"op": "hello", "version": 1, "token": "x" * 10_000}, "token"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(request_, message):
    with pytest.raises(StoreBadRequest, match=message):
        parse_request(request_)
    with pytest.raises(StoreBadRequest, match=message):
        parse_request(encode_frame(request_)[4:])


@pytest.mark.parametrize("body", [b"nope!", b"[1, 2]", b'"lookup"', b""])
def test_a_body_that_is_not_a_json_object_is_a_protocol_error(body):
    with pytest.raises(StoreProtocolError, match="not a JSON object") as info:
        parse_request(body)
    assert not isinstance(info.value, StoreBadRequest)


def test_requests_round_trip_through_the_wire():
    for request in (
        Lookup(keys=[KEY], budget_s=0.5),
        Acquire(keys=[KEY]),
        Reserve(keys=[KEY], sizes=[4096]),
        Clear(l2=True),
    ):
        assert parse_request(encode_frame(request)[4:]) == request
    assert parse_reply(b'{"ok":true,"num_chunks":2,"num_l1":1}', LookupReply) == LookupReply(num_chunks=2, num_l1=1)
    assert parse_reply(b'{"ok":false,"error":"no"}', LookupReply).error == "no"  # type: ignore[union-attr]


def _talk(path: str, *frames: bytes, expect: int) -> list[dict]:
    """Send frames on one connection; read ``expect`` replies, then {"closed": True} at EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        for frame in frames:
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break  # the store closed the connection
        replies: list[dict] = []
        for _ in range(expect):
            try:
                replies.append(recv_frame(sock))
            except ConnectionError:
                replies.append({"closed": True})
        return replies


def test_bad_requests_on_the_node_socket_get_error_replies_and_the_connection_stays(store):
    hello = encode_frame({"op": "hello", "version": VERSION})
    welcome, unknown, bad_keys, lookup, stats = _talk(
        store.socket,
        hello,
        encode_frame({"op": "explode"}),
        encode_frame({"op": "lookup", "keys": ["zz"]}),
        encode_frame({"op": "release", "lease": "x", "noreply": True}),  # no reply, not even an error
        encode_frame({"op": "lookup", "keys": [KEY]}),
        encode_frame({"op": "stats"}),
        expect=5,
    )
    assert welcome["ok"] and welcome["version"] == VERSION
    assert unknown["ok"] is False and "unknown op 'explode'" in unknown["error"]
    assert bad_keys["ok"] is False and "'keys' must be hex" in bad_keys["error"]
    assert lookup == {"ok": True, "num_chunks": 0, "num_l1": 0}  # the lookup's own reply, in step
    assert stats["ok"] and stats["stats"]["num_leases"] == 0


@pytest.mark.parametrize(
    "frame", [b"\x00\x00\x00\x05nope!", struct.pack(">I", MAX_FRAME + 1) + b"{}"], ids=["not-json", "too-large"]
)
def test_a_malformed_frame_gets_a_reply_then_the_connection_closes(store, client_factory, frame):
    reply, after = _talk(store.socket, frame, encode_frame({"op": "stats"}), expect=2)
    assert reply["ok"] is False and "malformed frame" in reply["error"]
    assert after == {"closed": True}
    keys = make_keys(1, "after-junk")  # the store is unharmed
    client = client_factory(store.socket)
    assert client.save(keys, [bytes(4096)]).result(10) == 1
    assert client.lookup_prefix(keys) == 1


def test_a_request_needing_a_connection_is_refused_over_http(store):
    import asyncio

    from pdx.storage.config import StoreConfig
    from pdx.storage.server import StoreServer

    async def main() -> str:
        server = StoreServer(StoreConfig(socket=store.socket + ".http", capacity_bytes=1 << 20,
                                         slab_bytes=1 << 20, http_port=-1))  # fmt: skip
        await server.start()
        try:
            reply = await server.dispatch(Acquire(keys=[KEY]), None)
        finally:
            await server.aclose()
        return reply.error  # type: ignore[union-attr]

    assert "needs an engine connection" in asyncio.run(main())


def _fake_store(path: str, reply: bytes) -> threading.Thread:
    """A unix server that answers one connection's first frame with ``reply`` (raw body)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.recv(1 << 16)
            conn.sendall(struct.pack(">I", len(reply)) + reply)
            conn.recv(1 << 16)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b'{"ok": true, "arena": 7}', "validation error"),
        (b"junk", "Invalid JSON"),
        (b'{"ok": false, "error": "go away"}', "go away"),
        (b'{"ok": true, "arena": "pdx-store-x", "arena_bytes": 1, "has_l2": false, "version": 99}', "v99"),
    ],
)
def test_a_malformed_or_refusing_hello_reply_is_store_unavailable(tmp_path, reply, message):
    from pdx.storage.arena import SharedArena
    from pdx.storage.channel import StoreChannel

    path = str(tmp_path / "fake.sock")
    thread = _fake_store(path, reply)
    channel = StoreChannel(path, 5.0, 1.0, SharedArena.attach)
    with pytest.raises(StoreUnavailable, match=message):
        channel.call(Lookup(keys=[KEY]))
    channel.detach()
    thread.join(5)
    assert not thread.is_alive()


def test_the_client_treats_an_error_reply_as_a_refusal_and_keeps_the_connection(store):
    from pdx.storage.arena import SharedArena
    from pdx.storage.channel import StoreChannel

    channel = StoreChannel(store.socket, 5.0, 1.0, SharedArena.attach)
    try:
        with pytest.raises(StorageError, match="no open lease 12345"):
            channel.call(Release(lease=12345))
        assert channel.call(Lookup(keys=[KEY])).num_chunks == 0  # same socket, still in step
    finally:
        channel.detach()

