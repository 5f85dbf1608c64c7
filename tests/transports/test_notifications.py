"""Notifications: delivered exactly once, after the bytes, and a receiver can wait on them."""

from __future__ import annotations

import threading
import time

import pytest
from pdx.transports.remote import RemoteError, digest, pattern
from pdx.transports.segments import SegmentPairs

MiB = 1 << 20


def test_each_notification_arrives_once_after_its_bytes(kind, aio, initiator, target):
    num_posts, seg = 20, MiB
    rid = target.call("allocate", num_posts * seg)
    src = initiator.allocate(num_posts * seg)
    src.buffer[:] = pattern(1, num_posts * seg)

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        posted = []
        for i in range(num_posts):
            pairs = SegmentPairs.strided(src.region_id, rid, seg, 1, i * seg, i * seg)
            posted.append(await initiator.post_write(peer, pairs, f"layer-{i}".encode()))
        for t in posted:
            await t.wait(30)

    aio.run(go())
    # waitable by payload, in any order, each exactly once; bytes in place when it is seen
    for i in reversed(range(num_posts)):
        peer, payload = target.call("wait_notification", 10, None, f"layer-{i}".encode())
        assert (peer, payload) == (initiator.name, f"layer-{i}".encode())
        assert target.call("digest", rid, i * seg, seg) == digest(src.buffer[i * seg : (i + 1) * seg])
    assert target.call("pop_notifications") == [], "a notification was delivered twice"
    with pytest.raises(RemoteError) as err:
        target.call("wait_notification", 0.2)
    assert err.value.kind == "TimeoutError"


def test_waiter_is_woken_by_a_later_transfer(kind, aio, initiator, target):
    if kind == "loopback":
        pytest.skip("the loopback target shares this process's loop; covered by the first test")
    rid = target.call("allocate", 4096)
    src = initiator.allocate(4096)
    descriptor = target.call("descriptor")
    got: list[tuple] = []
    waiter = threading.Thread(target=lambda: got.append(target.call("wait_notification", 20, initiator.name)))
    waiter.start()
    time.sleep(0.3)  # the target is now blocked waiting

    async def go():
        peer = await initiator.connect(descriptor)
        t = await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 4096, 1), b"wake")
        await t.wait(10)

    aio.run(go())
    waiter.join(30)
    assert got == [(initiator.name, b"wake")]


def test_transfer_without_notification_delivers_none(kind, aio, initiator, target):
    rid = target.call("allocate", 1024)
    src = initiator.allocate(1024)

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        t = await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 1024, 1))
        return await t.wait(10)

    assert aio.run(go()).ok
    assert target.call("pop_notifications") == []
