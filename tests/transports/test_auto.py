"""``auto`` picks the fastest medium both endpoints share and says when there is none."""

from __future__ import annotations

import pdx.transports as transports
import pytest
from pdx.transports.errors import ConnectError
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs


@pytest.mark.parametrize(
    "mine,theirs,expected",
    [(("shm", "tcp"), ("shm", "tcp"), "shm"), (("shm", "tcp"), ("tcp",), "tcp"), (("tcp", "shm"), ("shm", "tcp"), "tcp")],
)
def test_auto_picks_the_first_shared_medium(aio, mine, theirs, expected):
    async def go():
        a = transports.create_transport("auto", media=mine)
        b = transports.create_transport("auto", media=theirs)
        try:
            src, dst = a.allocate(1 << 20), b.allocate(1 << 20)
            src.buffer[:] = pattern(6, 1 << 20)
            peer = await a.connect(b.descriptor())
            t = await a.post_write(peer, SegmentPairs.strided(src.region_id, dst.region_id, 4096, 256), b"n")
            assert (await t.wait(20)).ok
            assert (await b.wait_notification(10)).peer == a.name
            return a.medium(peer), digest(dst.buffer)
        finally:
            await a.aclose()
            await b.aclose()

    medium, got = aio.run(go())
    assert medium == expected
    assert got == digest(pattern(6, 1 << 20))


def test_auto_without_a_shared_medium_raises_connect_error(aio):
    async def go():
        a = transports.create_transport("auto", media=("shm",))
        b = transports.create_transport("auto", media=("tcp",))
        try:
            with pytest.raises(ConnectError, match="none in common"):
                await a.connect(b.descriptor())
        finally:
            await a.aclose()
            await b.aclose()

    aio.run(go())
