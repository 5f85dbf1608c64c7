"""Failure contract: a store that is killed, frozen or restarted costs engines a bounded
wait and misses, never an error; nothing leaks (shm segments, sockets, fds, leases)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.storage.helpers import CHUNK, StoreProc, make_chunk, make_keys, pdx_arenas

TIMEOUT_S = 0.5
BOUND_S = 10 * TIMEOUT_S  # generous bound on one call when the store is away (not a speed test)


def eventually(check, timeout_s: float = 15.0) -> bool:
    """Poll ``check`` until it holds (the client's reconnect back-off has passed)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def test_store_killed_mid_run_clients_get_misses_then_recover(
    tmp_path, store_factory, client_factory
):
    store = store_factory()
    client = client_factory(store.socket, timeout_s=TIMEOUT_S, retry_s=0.2)
    keys = make_keys(4, "kill")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 4

    store.kill()
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    for _ in range(3):
        num, took = timed(client.load, keys, dsts)
        assert num == 0 and took < BOUND_S
        hits, took = timed(client.lookup_prefix, keys)
        assert hits == 0 and took < BOUND_S
    fut = client.save(keys, [make_chunk(k) for k in keys])
    assert fut.result(timeout=BOUND_S) == 0
    assert client.stats().num_errors >= 1 and client.stats().num_save_dropped >= 4
    assert store.arena in pdx_arenas()  # SIGKILL leaves the segment behind...

    again = store_factory(socket_path=store.socket)  # ...a new store on the node sweeps it
    assert store.arena not in pdx_arenas()
    # after its back-off the client reconnects by itself and maps the new arena
    assert eventually(lambda: client.save(keys, [make_chunk(k) for k in keys]).result(10) == 4)
    assert client.load(keys, dsts) == 4
    assert all(np.array_equal(d, make_chunk(k)) for d, k in zip(dsts, keys, strict=False))
    assert again.stats()["num_leases"] == 0


def test_frozen_store_costs_a_bounded_wait(store_factory, client_factory):
    store = store_factory()
    client = client_factory(store.socket, timeout_s=TIMEOUT_S, retry_s=0.2)
    keys = make_keys(2, "frozen")
    assert client.save(keys, [make_chunk(k) for k in keys]).result(10) == 2
    dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
    os.kill(store.proc.pid, signal.SIGSTOP)
    try:
        num, took = timed(client.load, keys, dsts)
        assert num == 0 and took < BOUND_S
        assert client.save(make_keys(1, "f2"), [np.zeros(CHUNK, np.uint8)]).result(BOUND_S) == 0
    finally:
        os.kill(store.proc.pid, signal.SIGCONT)
    assert eventually(lambda: client.load(keys, dsts) == 2)


def test_clean_shutdown_leaves_no_segment_or_socket(tmp_path):
    before = pdx_arenas()
    store = StoreProc(tmp_path)
    assert store.arena in pdx_arenas()
    assert store.stop() == 0
    assert pdx_arenas() - before == set()
    assert not os.path.exists(store.socket)


def test_second_store_on_a_live_socket_refuses_to_start(store, tmp_path, client_factory):
    with pytest.raises(RuntimeError, match="already serving"):
        StoreProc(tmp_path, socket_path=store.socket)
    client = client_factory(store.socket)  # the first store is untouched
    keys = make_keys(1, "first")
    assert client.save(keys, [make_chunk(keys[0])]).result(10) == 1
    assert client.lookup_prefix(keys) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--l2", "s3://bucket"], "unknown L2 URL scheme"),
        (["--l2", "file://relative/path"], "file:///abs/path"),
        (["--capacity-gb", "-1"], "must be positive"),
    ],
)
def test_bad_flags_fail_clearly_and_leave_nothing(tmp_path, args, message):
    before = pdx_arenas()
    sock = str(tmp_path / "s.sock")
    out = subprocess.run([sys.executable, "-m", "pdx.cli", "store", "--socket", sock, "--http-port", "-1", *args],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr
    assert pdx_arenas() == before and not os.path.exists(sock)


def test_dead_client_leases_are_released(store, client_factory):
    keys = make_keys(2, "dead")
    client = client_factory(store.socket)
    assert client.save(keys[:1], [make_chunk(keys[0])]).result(10) == 1
    code = (
        "import sys, time\n"
        "from pdx.storage.channel import StoreChannel\n"
        "from pdx.storage.arena import SharedArena\n"
        "from pdx.storage.messages import Acquire, Reserve\n"
        f"ch = StoreChannel({store.socket!r}, 5.0, 1.0, SharedArena.attach)\n"
        f"ch.call(Acquire(keys=[{keys[0].hex()!r}]))\n"
        f"ch.call(Reserve(keys=[{keys[1].hex()!r}], sizes=[{CHUNK}]))\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.stats()["num_leases"] == 2
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    deadline = time.monotonic() + 10
    while store.stats()["num_leases"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = store.stats()
    assert stats["num_leases"] == 0 and stats["used_bytes"] == CHUNK  # the reserved slot is back
    assert client.save(keys[1:], [make_chunk(keys[1])]).result(10) == 1  # no longer "busy"


def test_clients_leak_no_fds_or_mappings(store):
    from pdx.storage.client import create_client

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def mappings() -> int:
        with open("/proc/self/maps") as f:
            return sum("pdx-store-" in line for line in f)

    keys = make_keys(2, "leak")
    with create_client(store.socket) as warm:  # first use imports and starts what it needs
        warm.save(keys, [make_chunk(k) for k in keys]).result(10)
    before_fds, before_maps = fds(), mappings()
    for _ in range(5):
        with create_client(store.socket) as c:
            dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
            assert c.load(keys, dsts) == 2
            c.save(make_keys(1, f"x{_}"), [np.zeros(CHUNK, np.uint8)]).result(10)
    assert fds() == before_fds
    assert mappings() == before_maps == 0
    assert store.stats()["num_leases"] == 0


def test_leases_held_past_the_ttl_are_ended_by_the_store(store_factory):
    from pdx.errors import StorageError
    from pdx.storage.arena import SharedArena
    from pdx.storage.channel import StoreChannel
    from pdx.storage.messages import Commit, Reserve

    store = store_factory(extra=["--lease-ttl-s", "1"])
    keys = make_keys(2, "ttl")
    ch = StoreChannel(store.socket, 5.0, 1.0, SharedArena.attach)
    try:
        reserved = ch.call(Reserve(keys=[keys[0].hex()], sizes=[CHUNK]))
        assert reserved.offsets[0] is not None
        assert store.wait_stat("leases_expired", 1)["leases_expired"] == 1
        with pytest.raises(StorageError, match="no open lease"):
            ch.call(Commit(lease=reserved.lease, checksums=[0]))
        stats = store.stats()
        assert stats["num_leases"] == 0 and stats["used_bytes"] == 0  # the slot came back
    finally:
        ch.detach()


def test_a_connection_cannot_end_another_connections_lease(store, client_factory):
    from pdx.errors import StorageError
    from pdx.storage.arena import SharedArena
    from pdx.storage.channel import StoreChannel
    from pdx.storage.messages import Acquire, Release

    keys = make_keys(1, "owner")
    client_factory(store.socket).save(keys, [make_chunk(keys[0])]).result(10)
    owner = StoreChannel(store.socket, 5.0, 1.0, SharedArena.attach)
    other = StoreChannel(store.socket, 5.0, 1.0, SharedArena.attach)
    try:
        lease = owner.call(Acquire(keys=[keys[0].hex()])).lease
        with pytest.raises(StorageError, match="no open lease"):
            other.call(Release(lease=lease))
        assert store.stats()["num_leases"] == 1
        owner.call(Release(lease=lease))
        assert store.stats()["num_leases"] == 0
    finally:
        owner.detach()
        other.detach()
