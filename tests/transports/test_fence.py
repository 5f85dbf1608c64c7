"""Fence: after a timeout, destination memory is reused only once nothing more can land in it.

Here this process is the target (the decode side) and a child process the initiator. The
initiator freezes (SIGSTOP) in the middle of a write and has a second write queued for when it
runs again; the target's wait times out, it fences the initiator, reuses the destination (a
sentinel), lets the initiator run, and checks that no byte of either write arrived after the
fence. A medium that cannot confirm a fence (``fence`` returns False) must keep the blocks out
of use: then the test only checks that it does not claim a fence it cannot give.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from pdx.transports.segments import SegmentPairs

MiB = 1 << 20
SENTINEL = 0xA5

# Media whose target cannot confirm a fence on its own (docs/transports.md, "Fence").
CANNOT_FENCE = {"nixl", "cuda_ipc"}


def test_no_byte_lands_after_the_fence(kind, aio, initiator, endpoints):
    if kind == "loopback":
        pytest.skip("loopback copies every byte when the post is made: nothing is ever in flight")
    target = initiator  # this process is the target here
    dst = target.allocate(32 * MiB)
    sender = endpoints.start()
    src = sender.call("allocate", 32 * MiB)
    sender.call("fill", src, 21)
    sender.call("connect", target.descriptor())
    sender_name = sender.call("name")
    table = SegmentPairs.strided(src, dst.region_id, 4 * MiB, 8).table
    assert sender.call("post_write", target.name, table, b"warm-up", 30) == ("done", ())
    aio.run(target.wait_notification(10, payload=b"warm-up"))
    dst.buffer[:] = 0

    sender.call("post_write_nowait", target.name, table, b"in-flight")
    sender.pause()  # frozen mid-write (or just after); its second write runs when it resumes
    sender.send("post_write", target.name, table, b"late", 10.0)
    try:
        with pytest.raises(TimeoutError):
            aio.run(target.wait_notification(0.5, payload=b"late"))  # the decode side gives up
        is_fenced = aio.run(target.fence(sender_name, 10.0))
        if is_fenced:
            dst.buffer[:] = SENTINEL  # the blocks go back to the engine and are reused
    finally:
        sender.resume()
    sender.answer(30)  # the late write ends (it fails when the fence dropped its connection)
    time.sleep(0.3)  # anything still on its way would land by now

    if not is_fenced:
        assert kind in CANNOT_FENCE, f"{kind} could not confirm a fence of a resumable peer"
        return
    changed = np.flatnonzero(dst.buffer != SENTINEL)
    assert len(changed) == 0, f"{len(changed)} bytes landed after the fence (first at offset {changed[0]})"
    late = [n for n in target.pop_notifications() if n.payload in (b"late", b"in-flight") and n.peer == sender_name]
    assert all(n.payload != b"late" for n in late), "a notification of a fenced write was delivered"


def test_fence_leaves_other_peers_and_later_connections_working(kind, aio, initiator, endpoints):
    if kind == "loopback":
        pytest.skip("loopback has no second process")
    target = initiator
    dst = target.allocate(2 * MiB)
    fenced, other = endpoints.start(), endpoints.start()
    tables = {}
    for ep, seed, offset in ((fenced, 3, 0), (other, 4, MiB)):
        src = ep.call("allocate", MiB)
        ep.call("fill", src, seed)
        ep.call("connect", target.descriptor())
        tables[ep.pid] = np.array([[src, 0, dst.region_id, offset, MiB]], dtype=np.int64)
    assert aio.run(target.fence(fenced.call("name"), 10.0)) == (kind not in CANNOT_FENCE)
    assert other.call("post_write", target.name, tables[other.pid], b"other", 30) == ("done", ())
    aio.run(target.wait_notification(10, payload=b"other"))
    if kind in CANNOT_FENCE:
        return
    with pytest.raises(Exception, match="PeerLost"):  # its connection was dropped: no silent reconnect
        fenced.call("post_write", target.name, tables[fenced.pid], b"fenced", 10)
    fenced.call("connect", target.descriptor())  # connecting again is a new start
    assert fenced.call("post_write", target.name, tables[fenced.pid], b"again", 30) == ("done", ())
    aio.run(target.wait_notification(10, payload=b"again"))
    assert [n.payload for n in target.pop_notifications()] == []
