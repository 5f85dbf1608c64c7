"""Owned resources: close and release are idempotent, a closed transport refuses work,
and closing with transfers in flight settles them (nothing hangs, nothing leaks)."""

from __future__ import annotations

import pdx.transports as transports
import pytest
from pdx.transports.errors import PeerLost, SegmentError, TransferAborted, TransportClosed
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs
from pdx.transports.transfer import TransferStatus

MiB = 1 << 20


def test_close_and_release_are_idempotent(kind, aio):
    async def go():
        t = transports.create_transport(kind)
        a = t.allocate(4096)
        b = t.register(bytearray(100))
        a.release()
        a.release()
        assert a.is_released and list(t.regions) == [b.region_id]
        descriptor = t.descriptor()
        await t.aclose()
        await t.aclose()
        assert b.is_released and not t.regions and t.is_closed
        b.release()
        with pytest.raises(TransportClosed):
            t.allocate(10)
        with pytest.raises(TransportClosed):
            t.descriptor()
        with pytest.raises(TransportClosed):
            await t.connect(descriptor)

    aio.run(go())


def test_close_with_transfers_in_flight_settles_them(kind, aio, target):
    rid = target.call("allocate", 64 * MiB)
    descriptor = target.call("descriptor")

    async def go():
        t = transports.create_transport(kind)
        src = t.allocate(64 * MiB)
        peer = await t.connect(descriptor)
        pairs = SegmentPairs.strided(src.region_id, rid, MiB, 64)
        posted = [await t.post_write(peer, pairs) for _ in range(8)]
        await t.aclose()
        outcomes = []
        for p in posted:
            try:
                outcomes.append((await p.wait(30)).status)
            except (TransferAborted, PeerLost) as exc:
                outcomes.append(exc.report.status)
        return outcomes

    outcomes = aio.run(go(), 60)
    assert set(outcomes) <= {TransferStatus.DONE, TransferStatus.ABORTED, TransferStatus.FAILED}
    # the target is still usable by a new initiator
    fresh_rid = target.call("allocate", MiB)
    fresh_descriptor = target.call("descriptor")

    async def again():
        t = transports.create_transport(kind)
        src = t.allocate(MiB)
        src.buffer[:] = pattern(2, MiB)
        peer = await t.connect(fresh_descriptor)
        report = await (await t.post_write(peer, SegmentPairs.strided(src.region_id, fresh_rid, MiB, 1))).wait(30)
        await t.aclose()
        return report

    assert aio.run(again(), 60).ok
    assert target.call("digest", fresh_rid) == digest(pattern(2, MiB))


def test_aborted_transfer_reports_aborted(kind, aio, initiator, target):
    rid = target.call("allocate", 64 * MiB)
    src = initiator.allocate(64 * MiB)
    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        t = await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, MiB, 64))
        t.abort()
        t.abort()
        try:
            report = await t.wait(30)
        except TransferAborted as exc:
            report = exc.report
        assert t.poll() in (TransferStatus.DONE, TransferStatus.ABORTED)
        return report.status

    assert aio.run(go()) in (TransferStatus.DONE, TransferStatus.ABORTED)


def test_connect_again_refreshes_the_peer_regions(kind, aio, initiator, target):
    first = target.call("allocate", 4096)
    old_descriptor = target.call("descriptor")
    later = target.call("allocate", 4096)  # registered after the first descriptor was taken
    new_descriptor = target.call("descriptor")
    src = initiator.allocate(4096)
    src.buffer[:] = pattern(13, 4096)

    async def go():
        peer = await initiator.connect(old_descriptor)
        with pytest.raises(SegmentError, match="not registered"):
            await initiator.post_write(peer, SegmentPairs.strided(src.region_id, later, 4096, 1))
        peer = await initiator.connect(new_descriptor)
        for rid in (first, later):
            assert (await (await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 4096, 1))).wait(20)).ok

    aio.run(go())
    assert target.call("digest", later) == target.call("digest", first) == digest(src.buffer)
