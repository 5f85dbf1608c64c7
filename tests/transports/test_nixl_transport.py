"""nixl specifics beyond the contract suite: empty notifications, self-connect, read-back."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pdx.transports as transports
import pytest
from pdx.transports.segments import SegmentPairs

os.environ.setdefault("UCX_NET_DEVICES", "lo")
pytestmark = [pytest.mark.nixl, pytest.mark.skipif("nixl" not in transports.available_transports(),
                                                   reason="nixl not installed")]


def test_empty_notification_payload_is_delivered():
    # NIXL itself drops an empty notif message; pdx's framing must not.
    async def go():
        a, b = transports.create_transport("nixl"), transports.create_transport("nixl")
        src, dst = a.allocate(4096), b.allocate(4096)
        src.buffer[:] = 7
        peer = await a.connect(b.descriptor())
        await (await a.post_write(peer, SegmentPairs.strided(src.region_id, dst.region_id, 4096, 1), b"")).wait(10)
        note = await b.wait_notification(10)
        assert (note.peer, note.payload) == (a.name, b"")
        assert (dst.buffer == 7).all()
        await a.aclose()
        await b.aclose()

    asyncio.run(go())


def test_self_connect_writes_and_reads_within_one_agent():
    async def go():
        t = transports.create_transport("nixl")
        x, y, z = t.allocate(1 << 20), t.allocate(1 << 20), t.allocate(1 << 20)
        x.buffer[:] = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
        peer = await t.connect(t.descriptor())
        rows = SegmentPairs.from_tuples([(x.region_id, 1, y.region_id, 4099, 65_536 + 3)])
        await (await t.post_write(peer, rows, None)).wait(10)
        assert np.array_equal(y.buffer[4099 : 4099 + 65_539], x.buffer[1 : 1 + 65_539])
        back = SegmentPairs.from_tuples([(z.region_id, 0, y.region_id, 4099, 65_539)])
        await (await t.post_read(peer, back, None)).wait(10)
        assert np.array_equal(z.buffer[:65_539], x.buffer[1 : 1 + 65_539])
        await t.aclose()
        assert not t.regions

    asyncio.run(go())
