"""A peer killed mid-transfer gives PeerLost (never a hang); the survivor stays usable."""

from __future__ import annotations

import numpy as np
import pytest
from pdx.transports.errors import PeerLost, TransferTimeout
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs
from pdx.transports.transfer import TransferStatus

MiB = 1 << 20


def test_killed_target_fails_in_flight_transfers_with_peer_lost(kind, aio, initiator, endpoints):
    target = endpoints.start()
    rid = target.call("allocate", 64 * MiB)
    src = initiator.allocate(64 * MiB)
    descriptor = target.call("descriptor")
    peer = aio.run(initiator.connect(descriptor))
    target.pause()  # nothing it receives is acked from here on

    async def post():
        pairs = SegmentPairs.strided(src.region_id, rid, 4 * MiB, 16)
        return [await initiator.post_write(peer, pairs, f"t{i}".encode()) for i in range(8)]

    posted = aio.run(post())
    target.kill()

    async def outcomes():
        out = []
        for t in posted:
            try:
                out.append((await t.wait(30)).status.value)
            except PeerLost as exc:
                assert exc.report is not None and exc.report.failed_segments
                out.append("lost")
        return out

    results = aio.run(outcomes(), 60)  # a hang would fail here (TransferTimeout or the 60 s guard)
    if kind != "loopback":
        assert "lost" in results, results
    assert set(results) <= {"done", "lost"}, results
    with pytest.raises(PeerLost):  # the dead peer is refused (at post or at wait), not hung on

        async def again():
            t = await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 1024, 1))
            await t.wait(30)

        aio.run(again(), 60)
    # the initiator is still usable with a new target
    fresh = endpoints.start()
    rid2 = fresh.call("allocate", MiB)
    src.buffer[:MiB] = pattern(8, MiB)
    descriptor2 = fresh.call("descriptor")

    async def works():
        peer2 = await initiator.connect(descriptor2)
        t = await initiator.post_write(peer2, SegmentPairs.strided(src.region_id, rid2, MiB, 1))
        return await t.wait(30)

    assert aio.run(works()).ok
    assert fresh.call("digest", rid2) == digest(src.buffer[:MiB])


def test_killed_initiator_leaves_target_usable(kind, aio, initiator, endpoints):
    if kind == "loopback":
        pytest.skip("loopback has no second process to kill")
    # here this process is the target and the child processes are the initiators
    dst = initiator.allocate(64 * MiB)
    descriptor = initiator.descriptor()
    doomed = endpoints.start()
    src = doomed.call("allocate", 64 * MiB)
    doomed.call("connect", descriptor)
    table = SegmentPairs.strided(src, dst.region_id, 4 * MiB, 16).table
    for _i in range(8):
        doomed.call("post_write_nowait", initiator.name, table, b"x")
    doomed.kill()

    sender = endpoints.start()
    src2 = sender.call("allocate", MiB)
    sender.call("fill", src2, 12)
    sender.call("connect", descriptor)
    rows = np.array([[src2, 0, dst.region_id, 5, MiB]], dtype=np.int64)
    status, failed = sender.call("post_write", initiator.name, rows, b"after", 30)
    assert (status, failed) == ("done", ())
    assert digest(dst.buffer[5 : 5 + MiB]) == digest(pattern(12, MiB))
    assert aio.run(initiator.wait_notification(10, payload=b"after")).payload == b"after"
    initiator.pop_notifications()


def test_frozen_target_gives_transfer_timeout_not_a_hang(kind, aio, initiator, endpoints):
    if kind == "loopback":
        pytest.skip("loopback transfers complete when posted")
    target = endpoints.start()
    rid = target.call("allocate", 64 * MiB)
    src = initiator.allocate(64 * MiB)
    peer = aio.run(initiator.connect(target.call("descriptor")))
    target.pause()

    async def go():
        posted = [await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, MiB, 64)) for _ in range(4)]
        with pytest.raises(TransferTimeout) as err:
            await posted[-1].wait(0.5)
        assert err.value.report.status is TransferStatus.ABORTED
        return posted

    posted = aio.run(go(), 60)
    target.kill()

    async def settle():
        for t in posted:
            try:
                await t.wait(30)
            except (PeerLost, TransferTimeout):
                pass

    aio.run(settle(), 60)
