"""The store's trust boundaries (docs/storage.md, "Who may reach what"): the remote port never
runs without a token; the HTTP API needs a bearer token for mutations and, beyond loopback,
for everything but /healthz; a chunk a remote peer overwrites behind the store's back is
never served; silent connections are closed; frames nested too deep are refused before
parsing, and the store keeps serving."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from pdx.storage.messages import VERSION
from pdx.storage.protocol import encode_frame, recv_frame
from pdx.storage.remote_channel import parse_address
from tests.storage.helpers import CHUNK, make_chunk, make_keys

TOKEN = "s3cret"
DEEP = 100_000  # nesting of the hostile frames


def run_store(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDX_STORE_")}
    return subprocess.run(
        [sys.executable, "-m", "pdx.cli", "store", "--socket", str(tmp_path / "s.sock"), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def http(store, method: str, path: str, token: str | None = None, body: bytes | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(store.http + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def deep_frame() -> bytes:
    body = b'{"op":"lookup","keys":' + b"[" * DEEP + b"]" * DEEP + b"}"
    return len(body).to_bytes(4, "big") + body


def answer_then_eof(sock: socket.socket) -> tuple[dict, bytes]:
    """The server's one reply, then what follows it (b"" once it closed the connection)."""
    reply = recv_frame(sock)
    return reply, sock.recv(1)


# -- finding 4: tokens ---------------------------------------------------------------------
def test_remote_listener_without_a_token_refuses_to_start(tmp_path):
    out = run_store(tmp_path, "--remote-listen", "127.0.0.1:0", "--http-port", "-1")
    assert out.returncode == 2, out.stderr
    assert "--remote-token" in out.stderr and "PDX_STORE_REMOTE_TOKEN" in out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_http_mutations_need_the_bearer_token(store_factory):
    store = store_factory(extra=["--http-token", TOKEN])
    for path in ("/clear", "/pin", "/unpin"):
        body = b"{}" if path == "/clear" else b'{"keys": []}'
        assert http(store, "POST", path, body=body) == 401
        assert http(store, "POST", path, "wrong", body=body) == 401
        assert http(store, "POST", path, TOKEN, body=body) == 200
    for path in ("/healthz", "/stats", "/metrics"):  # loopback: reads stay open
        assert http(store, "GET", path) == 200
    assert http(store, "POST", "/lookup", body=b'{"keys": []}') == 200


def test_http_token_defaults_to_the_remote_token(store_factory):
    store = store_factory(extra=["--remote-listen", "127.0.0.1:0", "--remote-token", TOKEN])
    assert http(store, "POST", "/clear", body=b"{}") == 401
    assert http(store, "POST", "/clear", TOKEN, body=b"{}") == 200


def test_http_beyond_loopback_needs_a_token_for_everything_but_healthz(tmp_path, store_factory):
    out = run_store(tmp_path, "--http-host", "0.0.0.0", "--http-port", "0")
    assert out.returncode == 2 and "--http-token" in out.stderr, out.stderr

    store = store_factory(extra=["--http-host", "0.0.0.0", "--http-token", TOKEN], http_token=TOKEN)
    for path in ("/stats", "/metrics"):
        assert http(store, "GET", path) == 401
        assert http(store, "GET", path, TOKEN) == 200
    assert http(store, "POST", "/lookup", body=b'{"keys": []}') == 401
    assert http(store, "GET", "/healthz") == 200


def test_a_chunk_overwritten_by_a_remote_peer_is_never_served(store_factory, client_factory):
    """The transport is one-sided: a peer with the token can write any arena byte, not only its
    reserved slots. The node's clients then verify every load: the tampered chunk is a miss."""
    from pdx.transports import create_transport
    from pdx.transports.segments import SegmentPairs

    store = store_factory(extra=["--remote-listen", "127.0.0.1:0", "--remote-token", TOKEN])
    local = client_factory(store.socket, timeout_s=5.0)  # verify_loads left at its default (off)
    keys = make_keys(2, "tamper")
    assert local.save(keys, [make_chunk(k) for k in keys]).result(10) == 2
    with socket.socket(socket.AF_UNIX) as node:  # where the second chunk lives
        node.connect(store.socket)
        node.sendall(encode_frame({"op": "acquire", "keys": [k.hex() for k in keys]}))
        offset = recv_frame(node)["chunks"][1][0]

    async def overwrite() -> None:  # outside any lease of this peer: nothing reserved at all
        host, port = parse_address(store.remote_url)
        with socket.create_connection((host, port), timeout=10) as ctl:
            ctl.sendall(encode_frame({"op": "hello", "version": VERSION, "token": TOKEN}))
            hello = recv_frame(ctl)
            transport = create_transport("tcp")
            try:
                peer = await transport.connect(base64.b64decode(hello["descriptor"]))
                junk = transport.allocate(CHUNK)
                junk.buffer[:] = 7
                pairs = SegmentPairs.from_tuples([(junk.region_id, 0, hello["region"], offset, CHUNK)])
                await (await transport.post_write(peer, pairs)).wait(10)
            finally:
                await transport.aclose()

    asyncio.run(overwrite())
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    assert local.load(keys, dsts) == 1  # the run ends before the tampered chunk
    assert np.array_equal(dsts[0], make_chunk(keys[0]))  # dsts[1] holds junk: not counted as loaded
    with local.read_views(keys) as views:
        assert len(views) == 1
    assert local.stats().num_corrupt == 2


# -- finding 7: timeouts and parsing bounds ------------------------------------------------
def test_silent_connections_are_closed_and_clients_reconnect(store_factory, client_factory):
    store = store_factory(extra=["--remote-listen", "127.0.0.1:0", "--remote-token", TOKEN,
                                 "--hello-timeout-s", "0.5", "--idle-timeout-s", "1.5"])  # fmt: skip
    host, port = parse_address(store.remote_url)
    start = time.monotonic()
    with socket.socket(socket.AF_UNIX) as node, socket.create_connection((host, port), timeout=10) as remote:
        node.settimeout(10)
        node.connect(store.socket)
        for sock in (node, remote):  # nothing sent: closed after the hello timeout
            reply, rest = answer_then_eof(sock)
            assert reply["ok"] is False and "no hello within 0.5 s" in reply["error"] and rest == b""
    assert time.monotonic() - start < 5

    with socket.socket(socket.AF_UNIX) as node, socket.create_connection((host, port), timeout=10) as remote:
        node.settimeout(10)
        node.connect(store.socket)
        node.sendall(encode_frame({"op": "stats"}))
        remote.sendall(encode_frame({"op": "hello", "version": VERSION, "token": TOKEN}))
        for sock in (node, remote):  # served, then silent: closed after the idle timeout
            assert recv_frame(sock)["ok"] is True
            reply, rest = answer_then_eof(sock)
            assert "no request within 1.5 s" in reply["error"] and rest == b""

    client = client_factory(store.socket, timeout_s=5.0)  # an engine's idle socket costs no miss
    keys = make_keys(1, "idle")
    assert client.save(keys, [make_chunk(keys[0])]).result(10) == 1
    time.sleep(2.0)
    assert client.lookup_prefix(keys) == 1
    assert client.stats().num_errors == 0


def test_a_deeply_nested_frame_is_refused_and_the_store_keeps_serving(store_factory, client_factory):
    store = store_factory(extra=["--remote-listen", "127.0.0.1:0", "--remote-token", TOKEN])
    host, port = parse_address(store.remote_url)
    with socket.socket(socket.AF_UNIX) as node, socket.create_connection((host, port), timeout=10) as remote:
        node.settimeout(10)
        node.connect(store.socket)
        for sock in (node, remote):  # on the remote port, before any hello
            sock.sendall(deep_frame())
            reply, rest = answer_then_eof(sock)
            assert reply["ok"] is False and "nests deeper than" in reply["error"] and rest == b""
    deep_body = b'{"keys":' + b"[" * DEEP + b"]" * DEEP + b"}"
    assert http(store, "POST", "/lookup", body=deep_body) == 400
    assert http(store, "POST", "/pin", TOKEN, body=deep_body) == 400

    client = client_factory(store.socket, timeout_s=5.0)
    keys = make_keys(1, "deep")
    assert client.save(keys, [make_chunk(keys[0])]).result(10) == 1
    assert client.lookup_prefix(keys) == 1
    assert store.stats()["num_chunks"] == 1
