"""``shm`` without cross-memory attach (forbidden by the kernel's ptrace policy) still moves
every byte, through its unix socket."""

from __future__ import annotations

import pytest
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs
from pdx.transports.wire import MODE_INLINE

MiB = 1 << 20


@pytest.fixture
def inline_target(start_target):
    return start_target('shm', allow_cma=False)


@pytest.fixture
def initiator(open_initiator):
    return open_initiator('shm')


def test_shm_inline_write_and_read(aio, initiator, inline_target):
    rid = inline_target.call("register_foreign", 8 * MiB + 3)
    src = initiator.allocate(8 * MiB)
    src.buffer[:] = pattern(31, 8 * MiB)
    back = initiator.allocate(8 * MiB)
    descriptor = inline_target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        assert peer.state.mode == MODE_INLINE
        w = await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 64 << 10, 128, 0, 3), b"w")
        assert (await w.wait(30)).ok
        r = await initiator.post_read(peer, SegmentPairs.strided(back.region_id, rid, MiB, 8, 0, 3))
        assert (await r.wait(30)).ok

    aio.run(go())
    assert inline_target.call("wait_notification", 10) == (initiator.name, b"w")
    assert digest(back.buffer) == digest(src.buffer)
