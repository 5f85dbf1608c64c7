"""``tcp`` with several streams: a post cut into parts lands whole, notifies once after the
last part, and reports a rejected row by its index in the whole post."""

from __future__ import annotations

import numpy as np
import pdx.transports as transports
import pytest
from pdx.transports.errors import TransferError
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs

MiB = 1 << 20


@pytest.fixture
def target(start_target):
    return start_target('tcp')


@pytest.fixture
def initiator(open_initiator):
    return open_initiator('tcp', num_streams=3, split_bytes=MiB)


def test_parts_land_whole_and_notify_once(aio, initiator, target):
    sizes = np.array([5 * MiB + 7, 3, MiB, 2 * MiB - 1, 17], dtype=np.int64)
    total = int(sizes.sum())
    rid = target.call("register_foreign", total + 11)
    src = initiator.allocate(total)
    src.buffer[:] = pattern(41, total)
    back = initiator.allocate(total)
    offs = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rows = np.stack([np.full(5, src.region_id), offs, np.full(5, rid), offs + 11, sizes], 1)
    read_rows = rows.copy()
    read_rows[:, 0] = back.region_id
    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        assert len(peer.state.streams) == 3
        w = await initiator.post_write(peer, SegmentPairs(rows), b"whole")
        assert (await w.wait(30)).ok
        r = await initiator.post_read(peer, SegmentPairs(read_rows), b"read")
        assert (await r.wait(30)).ok

    aio.run(go())
    assert target.call("digest", rid, 11, total) == digest(src.buffer)
    assert digest(back.buffer) == digest(src.buffer)
    assert sorted(p for _, p in target.call("pop_notifications")) == [b"read", b"whole"]


def test_rejected_row_is_reported_by_its_index_in_the_post(aio, initiator, target):
    keep = target.call("allocate", 8 * MiB)
    gone = target.call("register_foreign", 8 * MiB)
    descriptor = target.call("descriptor")
    target.call("release", gone)
    src = initiator.allocate(16 * MiB)
    rows = [(src.region_id, 0, keep, 0, 4 * MiB), (src.region_id, 0, gone, 0, 8 * MiB), (src.region_id, 0, keep, 4 * MiB, 4 * MiB)]

    async def go():
        peer = await initiator.connect(descriptor)
        t = await initiator.post_write(peer, SegmentPairs.from_tuples(rows), b"never")
        with pytest.raises(TransferError) as err:
            await t.wait(30)
        return err.value.report

    assert aio.run(go()).failed_segments == (1,)
    assert target.call("pop_notifications") == []


@pytest.mark.parametrize(
    "junk",
    [b"GET / HTTP/1.1\r\n\r\n", b"\x10\x00\x00\x00{\"session\": 1}xxxx", b"\xff\xff\xff\xff"],
    ids=["http", "bad-hello", "huge-length"],
)
def test_junk_on_the_port_leaves_the_target_usable(aio, target, junk):
    import json
    import socket

    descriptor = target.call("descriptor")
    address = json.loads(descriptor)["address"]
    with socket.create_connection((address["host"], address["port"]), timeout=10) as sock:
        try:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            reply = sock.recv(100)
        except OSError:  # reset or already closed by the target
            reply = b""
        assert reply == b"", "the target must drop a peer that does not speak pdx"

    async def go():
        t = transports.create_transport("tcp")
        try:
            src = t.allocate(4096)
            src.buffer[:] = 5
            peer = await t.connect(descriptor)
            rid = json.loads(descriptor)["regions"][0]["region_id"]
            return (await (await t.post_write(peer, SegmentPairs.strided(src.region_id, rid, 4096, 1))).wait(20)).ok
        finally:
            await t.aclose()

    target.call("allocate", 4096)
    descriptor = target.call("descriptor")
    assert aio.run(go())
