"""A store reached from other nodes (``--remote-listen``): chunks cross a real transport
between real processes over 127.0.0.1, bit-exact both ways; a store that dies costs a
remote client a bounded wait and misses; bad tokens and malformed frames get clear
errors; a remote client that dies or closes leaves nothing behind."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from pdx.engines.metrics import parse_prometheus_text
from pdx.storage.messages import VERSION
from pdx.storage.protocol import encode_frame, recv_frame
from pdx.storage.remote_channel import parse_address
from tests.storage.helpers import CHUNK, free_port, make_chunk, make_keys

TOKEN = "s3cret"
TIMEOUT_S = 0.5
BOUND_S = 10 * TIMEOUT_S  # generous bound on one call when the store is away (not a speed test)
WORKER = os.path.join(os.path.dirname(__file__), "client_worker.py")


def remote_store(store_factory, kind: str = "tcp", port: int = 0, **kwargs):
    extra = ["--remote-listen", f"127.0.0.1:{port}", "--remote-transport", kind, "--remote-token", TOKEN]
    return store_factory(extra=extra, **kwargs)


def run_worker(*args: str, token: str = TOKEN) -> dict:
    env = {**os.environ, "PDX_STORE_REMOTE_TOKEN": token, "UCX_NET_DEVICES": "lo"}
    out = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def chunks_equal(dsts, keys) -> bool:
    return all(np.array_equal(d, make_chunk(k)) for d, k in zip(dsts, keys, strict=True))


def eventually(check, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_remote_and_local_clients_share_chunks_bit_exact(store_factory, client_factory):
    store = remote_store(store_factory)
    assert store.remote_url is not None
    local = client_factory(store.socket, timeout_s=5.0)

    # a remote client in another process saves; the node-local client reads the arena
    keys = make_keys(6, "r2l")
    assert run_worker("save", store.remote_url, "r2l", "6") == {"num_saved": 6}
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    assert local.load(keys, dsts) == 6
    assert chunks_equal(dsts, keys)

    # the node-local client saves; a remote client in another process loads over the transport
    keys = make_keys(5, "l2r")
    assert local.save(keys, [make_chunk(k) for k in keys]).result(10) == 5
    assert run_worker("load", store.remote_url, "l2r", "5") == {"num_loaded": 5, "intact": True, "lookup": 5}

    stats = store.stats()
    assert stats["remote_saved_chunks"] == 6 and stats["remote_saved_bytes"] == 6 * CHUNK
    assert stats["remote_loaded_chunks"] == 5 and stats["remote_loaded_bytes"] == 5 * CHUNK
    assert stats["remote_save_corrupt"] == 0 and stats["num_leases"] == 0
    with urllib.request.urlopen(store.http + "/metrics", timeout=10) as resp:
        metrics = parse_prometheus_text(resp.read().decode())
    assert metrics.find("pdx_store_remote_loaded_bytes_total")[0].value == 5 * CHUNK
    assert metrics.find("pdx_store_remote_saved_bytes_total")[0].value == 6 * CHUNK


@pytest.mark.nixl
def test_remote_client_over_nixl(store_factory, client_factory, monkeypatch):
    from pdx.transports.nixl import NixlTransport

    if not NixlTransport.is_available():
        pytest.skip("nixl is not installed")
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    store = remote_store(store_factory, "nixl", ready_timeout=120.0)  # NIXL starts slowly on a busy box
    local = client_factory(store.socket, timeout_s=5.0)
    remote = client_factory(store.remote_url, token=TOKEN, timeout_s=5.0)
    keys = make_keys(6, "nixl")
    assert remote.save(keys[:3], [make_chunk(k) for k in keys[:3]]).result(30) == 3
    assert local.save(keys[3:], [make_chunk(k) for k in keys[3:]]).result(10) == 3
    for client in (local, remote):
        dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
        assert client.load(keys, dsts) == 6 and chunks_equal(dsts, keys)
    stats = store.stats()
    assert stats["remote_saved_bytes"] == 3 * CHUNK and stats["remote_loaded_bytes"] == 6 * CHUNK


def test_remote_lookup_and_load_stop_at_the_first_missing_chunk(store_factory, client_factory):
    store = remote_store(store_factory)
    client = client_factory(store.remote_url, token=TOKEN, timeout_s=5.0)
    keys = make_keys(5, "gap")
    stored = [k for i, k in enumerate(keys) if i != 2]
    assert client.save(stored, [make_chunk(k) for k in stored]).result(10) == 4
    assert client.lookup_prefix(keys) == 2
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    assert client.load(keys, dsts) == 2
    assert chunks_equal(dsts[:2], keys[:2])
    assert not dsts[2].any()  # nothing written past the run
    with client.read_views(keys) as views:
        assert len(views) == 2 and np.array_equal(views[1], make_chunk(keys[1]))
    with client.write_views(keys, [CHUNK] * 5) as slots:  # only the missing chunk is offered
        assert [s is not None for s in slots] == [False, False, True, False, False]
        slots[2][:] = make_chunk(keys[2])
    assert client.lookup_prefix(keys) == 5
    assert store.stats()["num_leases"] == 0


def test_store_killed_remote_client_gets_misses_then_recovers(store_factory, client_factory):
    port = free_port()
    store = remote_store(store_factory, port=port)
    client = client_factory(store.remote_url, token=TOKEN, timeout_s=TIMEOUT_S, retry_s=0.2)
    keys = make_keys(4, "kill")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 4

    store.kill()
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    for _ in range(3):
        start = time.monotonic()
        assert client.load(keys, dsts) == 0
        assert client.lookup_prefix(keys) == 0
        assert time.monotonic() - start < 2 * BOUND_S
    assert client.save(keys, [make_chunk(k) for k in keys]).result(timeout=BOUND_S) == 0
    assert client.stats().num_errors >= 1

    again = remote_store(store_factory, port=port, socket_path=store.socket)  # a new store, same port
    assert eventually(lambda: client.save(keys, [make_chunk(k) for k in keys]).result(10) == 4)
    assert client.load(keys, dsts) == 4 and chunks_equal(dsts, keys)
    assert again.stats()["num_leases"] == 0


def test_store_lost_between_lease_and_transfer_gives_misses(store_factory, client_factory):
    """The store dies after it leased the slots and before the bytes move: the transfer
    fails, the load is a miss and the save is dropped, within the bound, never raised."""
    port = free_port()
    store = remote_store(store_factory, port=port)
    client = client_factory(store.remote_url, token=TOKEN, timeout_s=TIMEOUT_S, retry_s=0.2)
    keys = make_keys(3, "mid")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 3
    call = client._call

    def kill_after(op: str):
        def call_then_kill(channel, msg, **kwargs):
            reply = call(channel, msg, **kwargs)
            if msg.op == op:
                store.kill()
            return reply
        return call_then_kill

    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    client._call = kill_after("acquire")
    start = time.monotonic()
    assert client.load(keys, dsts) == 0
    assert time.monotonic() - start < BOUND_S
    assert not any(d.any() for d in dsts)

    store = remote_store(store_factory, port=port)
    client._call = kill_after("reserve")
    new = make_keys(2, "mid-new")
    assert eventually(lambda: client.lookup_prefix(keys) == 0 and store.stats()["remote_clients"] == 1)
    dropped = client.stats().num_save_dropped
    start = time.monotonic()
    with client.write_views(new, [CHUNK] * 2) as slots:
        for slot, key in zip(slots, new, strict=True):
            if slot is not None:
                slot[:] = make_chunk(key)
    assert time.monotonic() - start < BOUND_S
    assert all(s is not None for s in slots)  # the slots were handed out before the store died
    assert client.stats().num_save_dropped == dropped + 2

    client._call = call
    again = remote_store(store_factory, port=port)
    assert eventually(lambda: client.save(new, [make_chunk(k) for k in new]).result(10) == 2)
    assert client.load(new, dsts[:2]) == 2 and chunks_equal(dsts[:2], new)
    assert again.stats()["num_leases"] == 0


def test_frozen_store_costs_a_remote_client_a_bounded_wait(store_factory, client_factory):
    store = remote_store(store_factory)
    client = client_factory(store.remote_url, token=TOKEN, timeout_s=TIMEOUT_S, retry_s=0.2)
    keys = make_keys(2, "frozen")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 2
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    os.kill(store.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert client.load(keys, dsts) == 0
        assert client.save(make_keys(1, "f2"), [make_chunk(keys[0])]).result(BOUND_S) == 0
        assert time.monotonic() - start < 2 * BOUND_S
    finally:
        os.kill(store.proc.pid, signal.SIGCONT)
    assert eventually(lambda: client.load(keys, dsts) == 2)
    assert chunks_equal(dsts, keys)


def test_bad_token_and_malformed_requests_get_clear_errors(store_factory, client_factory, caplog):
    store = remote_store(store_factory)
    host, port = parse_address(store.remote_url)

    def talk(*frames: bytes) -> list[dict]:
        with socket.create_connection((host, port), timeout=5) as sock:
            replies = []
            for frame in frames:
                sock.sendall(frame)
                try:
                    replies.append(recv_frame(sock))
                except ConnectionError:
                    replies.append({"closed": True})
            return replies

    hello = encode_frame({"op": "hello", "version": VERSION, "token": TOKEN})
    bad = talk(encode_frame({"op": "hello", "version": VERSION, "token": "wrong"}), hello)
    assert bad[0]["ok"] is False and "auth token" in bad[0]["error"]
    assert bad[1] == {"closed": True}  # the store closed the connection
    first = talk(encode_frame({"op": "lookup", "keys": []}))
    assert first[0]["ok"] is False and "hello" in first[0]["error"]

    junk = b"\x00\x00\x00\x05nope!"
    ok, lookup, unknown, clear, junk_reply = talk(
        hello,
        encode_frame({"op": "lookup", "keys": ["zz"]}),
        encode_frame({"op": "explode"}),
        encode_frame({"op": "clear"}),
        junk,
    )
    assert ok["ok"] and ok["transport"] == "tcp" and ok["descriptor"]
    assert lookup["ok"] is False and "'keys' must be hex" in lookup["error"]
    assert unknown["ok"] is False and "'explode'" in unknown["error"]
    assert clear["ok"] is False and "not served to remote clients" in clear["error"]
    assert junk_reply["ok"] is False and "malformed frame" in junk_reply["error"]

    client = client_factory(store.remote_url, token="wrong", timeout_s=TIMEOUT_S)
    with caplog.at_level("WARNING", logger="pdx.storage.client"):
        assert client.lookup_prefix(make_keys(1, "t")) == 0  # never an exception into the engine
    assert client.stats().num_errors == 1
    assert any("bad auth token" in r.getMessage() for r in caplog.records)
    assert store.stats()["remote_refused"] == 4
    with pytest.raises(ValueError, match="pdx-store://HOST:PORT"):
        client_factory("pdx-store://nohostport", token=TOKEN)


def test_remote_client_death_and_close_leave_nothing(store_factory, client_factory):
    store = remote_store(store_factory)
    keys = make_keys(3, "hold")
    local = client_factory(store.socket, timeout_s=5.0)
    assert local.save(keys, [make_chunk(k) for k in keys]).result(10) == 3

    env = {**os.environ, "PDX_STORE_REMOTE_TOKEN": TOKEN}
    worker = subprocess.Popen([sys.executable, WORKER, "hold", store.remote_url, "hold", "3"],
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert json.loads(worker.stdout.readline()) == {"holding": 3, "reserved": 3}
        stats = store.stats()
        assert stats["num_leases"] == 1 and stats["remote_clients"] == 1  # reads end once copied
    finally:
        worker.kill()
        worker.wait(10)
        worker.stdout.close()
    assert eventually(lambda: store.stats()["num_leases"] == 0 and store.stats()["remote_clients"] == 0)
    assert local.lookup_prefix(make_keys(3, "hold-new")) == 0  # reserved, never committed: freed

    def store_fds() -> int:
        return len(os.listdir(f"/proc/{store.proc.pid}/fd"))

    threads, fds, num_store_fds = set(threading.enumerate()), set(os.listdir("/proc/self/fd")), store_fds()
    client = client_factory(store.remote_url, token=TOKEN, timeout_s=5.0)
    new = make_keys(3, "hold-new")
    assert client.save(new, [make_chunk(k) for k in new]).result(10) == 3
    dsts = [np.zeros(CHUNK, np.uint8) for _ in new]
    assert client.load(new, dsts) == 3 and chunks_equal(dsts, new)
    client.close()
    client.close()  # idempotent
    assert eventually(lambda: set(threading.enumerate()) <= threads, 5.0), threading.enumerate()
    assert set(os.listdir("/proc/self/fd")) <= fds
    assert eventually(lambda: store.stats()["remote_clients"] == 0, 5.0)
    assert eventually(lambda: store_fds() <= num_store_fds, 5.0)  # control and data sockets closed
    assert store.stats()["num_leases"] == 0
    assert client.lookup_prefix(new) == 0 and client.save(new, [make_chunk(k) for k in new]).result(1) == 0


def test_bad_remote_listen_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pdx.cli", "store", "--socket", str(tmp_path / "s.sock"),
         "--remote-listen", "127.0.0.1", "--http-port", "-1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--remote-listen must be HOST:PORT" in out.stderr


def test_torn_writes_are_not_stored_and_damaged_chunks_are_not_loaded(store_factory, client_factory):
    """The store checks each remotely written chunk against its checksum before publishing it;
    a remote client checks each chunk it reads. Neither ever hands out a wrong chunk."""
    import asyncio

    from pdx.transports import create_transport
    from pdx.transports.segments import SegmentPairs

    from pdx.storage.arena import SharedArena
    from pdx.storage.checksum import checksum

    store = remote_store(store_factory)
    host, port = parse_address(store.remote_url)
    key = make_keys(1, "torn")[0]
    good = checksum(make_chunk(key))  # what every commit below claims

    async def write(ctl: socket.socket, transport, peer, region_id: int, payload: np.ndarray) -> dict:
        ctl.sendall(encode_frame({"op": "reserve", "keys": [key.hex()], "sizes": [CHUNK]}))
        reserved = recv_frame(ctl)
        local = transport.allocate(CHUNK)
        local.buffer[:] = payload
        pairs = SegmentPairs.from_tuples([(local.region_id, 0, region_id, reserved["offsets"][0], CHUNK)])
        await (await transport.post_write(peer, pairs)).wait(10)
        local.release()
        ctl.sendall(encode_frame({"op": "commit", "lease": reserved["lease"], "checksums": [good]}))
        return recv_frame(ctl)

    async def main() -> None:
        with socket.create_connection((host, port), timeout=10) as ctl:
            ctl.sendall(encode_frame({"op": "hello", "version": VERSION, "token": TOKEN}))
            hello = recv_frame(ctl)
            transport = create_transport("tcp")
            try:
                peer = await transport.connect(base64.b64decode(hello["descriptor"]))
                torn = make_chunk(key).copy()
                torn[CHUNK // 2 :] = 0  # half of it never arrived
                assert (await write(ctl, transport, peer, hello["region"], torn))["num_committed"] == 0
                assert (await write(ctl, transport, peer, hello["region"], make_chunk(key)))["num_committed"] == 1
            finally:
                await transport.aclose()

    asyncio.run(main())
    stats = store.stats()
    assert stats["remote_save_corrupt"] == 1 and stats["remote_saved_chunks"] == 1

    remote = client_factory(store.remote_url, token=TOKEN, timeout_s=5.0)
    dst = np.zeros(CHUNK, np.uint8)
    assert remote.load([key], [dst]) == 1 and np.array_equal(dst, make_chunk(key))
    with socket.socket(socket.AF_UNIX) as node:  # find the chunk's slot and damage it in the arena
        node.connect(store.socket)
        node.sendall(encode_frame({"op": "acquire", "keys": [key.hex()]}))
        (offset, nbytes, _), = recv_frame(node)["chunks"]
    arena = SharedArena.attach(store.arena, offset + nbytes)
    arena.array[offset] ^= 0xFF
    arena.close()
    assert remote.load([key], [np.zeros(CHUNK, np.uint8)]) == 0
    assert remote.stats().num_corrupt == 1
