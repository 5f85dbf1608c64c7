"""Bad input gives a clear error and leaves both sides usable (proved by a transfer after it)."""

from __future__ import annotations

import json

import numpy as np
import pdx.transports as transports
import pytest
from pdx.transports.errors import ConnectError, DescriptorError, SegmentError, TransferError
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs


def _transfer_works(aio, initiator, target, peer_descriptor=None) -> None:
    """A fresh write lands intact: the proof that both sides are still usable."""
    rid = target.call("allocate", 10_000)
    src = initiator.allocate(10_000)
    src.buffer[:] = pattern(77, 10_000)

    descriptor = peer_descriptor or target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        t = await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 10_000, 1), b"ok")
        return await t.wait(20)

    assert aio.run(go()).ok
    assert target.call("digest", rid) == digest(src.buffer)
    target.call("wait_notification", 10, None, b"ok")
    src.release()
    target.call("release", rid)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: b"\x00garbage",
        lambda d: d[: len(d) // 2],
        lambda d: json.dumps({**json.loads(d), "kind": "no-such-transport"}).encode(),
        lambda d: json.dumps({**json.loads(d), "regions": [{"region_id": -1, "nbytes": 0}]}).encode(),
        lambda d: json.dumps({**json.loads(d), ("pdx" if b'"pdx"' in d else "version"): 99}).encode(),
        lambda d: d + b" " * (16 << 20),  # valid JSON, but more than a peer may send
    ],
    ids=["garbage", "truncated", "wrong-kind", "bad-region", "wrong-version", "oversized"],
)
def test_malformed_descriptor_is_rejected(kind, aio, initiator, target, mangle):
    bad = mangle(target.call("descriptor"))
    with pytest.raises(DescriptorError):
        aio.run(initiator.connect(bad))
    _transfer_works(aio, initiator, target)


def test_descriptor_of_another_transport_is_rejected(kind, aio, initiator, target):
    other_kind = "tcp" if kind != "tcp" else "loopback"

    async def other_descriptor():
        other = transports.create_transport(other_kind)
        try:
            return other.descriptor()
        finally:
            await other.aclose()

    with pytest.raises(DescriptorError, match=other_kind):
        aio.run(initiator.connect(aio.run(other_descriptor())))
    _transfer_works(aio, initiator, target)


def test_descriptor_of_a_restarted_peer_is_stale(kind, aio, initiator, endpoints):
    old = endpoints.start()
    stale = old.call("descriptor")
    old.close()
    old.stop()
    fresh = endpoints.start()
    with pytest.raises((DescriptorError, ConnectError)) as err:
        aio.run(initiator.connect(stale))
    assert "stale" in str(err.value) or "reach" in str(err.value) or "exist" in str(err.value)
    _transfer_works(aio, initiator, fresh)


def test_out_of_range_segment_raises_before_posting(kind, aio, initiator, target):
    rid = target.call("allocate", 4096)
    src = initiator.allocate(8192)

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        with pytest.raises(SegmentError, match="outside remote region"):
            await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 4096, 1, 0, 1))
        with pytest.raises(SegmentError, match="outside local region"):
            await initiator.post_write(peer, SegmentPairs.strided(src.region_id, rid, 4096, 1, 8000, 0))
        with pytest.raises(SegmentError, match="remote region 999999 is not registered"):
            await initiator.post_write(peer, SegmentPairs.strided(src.region_id, 999999, 16, 1))

    aio.run(go())
    assert target.call("pop_notifications") == []
    _transfer_works(aio, initiator, target)


def test_write_from_unregistered_local_memory_raises(kind, aio, initiator, target):
    rid = target.call("allocate", 4096)
    src = initiator.allocate(4096)
    released_id = src.region_id
    src.release()

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        with pytest.raises(SegmentError, match="local region .* is not registered"):
            await initiator.post_write(peer, SegmentPairs.strided(released_id, rid, 16, 1))

    aio.run(go())
    _transfer_works(aio, initiator, target)


def test_write_to_region_released_at_target_fails_only_those_segments(kind, aio, initiator, target):
    keep = target.call("allocate", 4096)
    gone = target.call("register_foreign", 4096)
    descriptor = target.call("descriptor")  # still lists `gone`
    target.call("release", gone)
    src = initiator.allocate(3 * 4096)
    src.buffer[:] = pattern(4, 3 * 4096)
    rows = [(src.region_id, 0, keep, 0, 2048), (src.region_id, 4096, gone, 0, 4096), (src.region_id, 8192, keep, 2048, 2048)]

    async def go():
        peer = await initiator.connect(descriptor)
        t = await initiator.post_write(peer, SegmentPairs.from_tuples(rows), b"partial")
        with pytest.raises(TransferError) as err:
            await t.wait(20)
        return err.value

    err = aio.run(go())
    assert err.report is not None and err.report.failed_segments == (1,), err.report
    assert "segments failed" in str(err) or "released" in str(err)
    expected = np.concatenate([src.buffer[0:2048], src.buffer[8192 : 8192 + 2048]])
    assert target.call("digest", keep) == digest(expected), "valid segments of a partly failed post must land"
    assert target.call("pop_notifications") == [], "a failed transfer must not notify"
    _transfer_works(aio, initiator, target)
