"""Bytes written (and read) by every transport arrive intact, for a sampled matrix of
segment sizes (1 byte .. 64 MiB), counts (1 .. 4096) and unaligned offsets."""

from __future__ import annotations

import numpy as np
import pytest
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs

KiB, MiB = 1 << 10, 1 << 20

# (segment bytes, number of segments, unaligned offsets): a sample, not a cross-product.
CASES = [
    (1, 1, False),
    (1, 4096, True),
    (7, 333, True),
    (4 * KiB, 4096, False),
    (64 * KiB, 64, False),
    (64 * KiB + 3, 17, True),
    (1 * MiB, 16, False),
    (3 * MiB + 5, 3, True),
    (64 * MiB, 1, False),
]


def _layout(seg: int, count: int, unaligned: bool, seed: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Source and destination offsets: destinations shuffled, gaps between them when unaligned."""
    rng = np.random.default_rng(seed)
    gap = 3 if unaligned else 0
    base = 1 if unaligned else 0
    src = base + np.arange(count, dtype=np.int64) * (seg + gap)
    slots = rng.permutation(count).astype(np.int64)
    dst = base + 5 * int(unaligned) + slots * (seg + gap)
    return src, dst, int(src[-1] + seg + 1), int(dst.max() + seg + 1)


@pytest.mark.parametrize("foreign", [False, True], ids=["allocated", "foreign"])
@pytest.mark.parametrize("seg,count,unaligned", CASES, ids=[f"{c[0]}x{c[1]}" for c in CASES])
def test_write_lands_every_byte(kind, aio, initiator, target, seg, count, unaligned, foreign):
    if foreign and seg * count < MiB:
        pytest.skip("foreign-memory targets are sampled on the larger cases only")
    src_off, dst_off, src_size, dst_size = _layout(seg, count, unaligned, seed=seg + count)
    rid = target.call("register_foreign" if foreign else "allocate", dst_size)
    src = initiator.allocate(src_size)
    src.buffer[:] = pattern(11, src_size)

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        t = np.zeros((count, 5), dtype=np.int64)
        t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4] = src.region_id, src_off, rid, dst_off, seg
        transfer = await initiator.post_write(peer, SegmentPairs(t), b"done")
        return await transfer.wait(60)

    report = aio.run(go(), 120)
    assert report.ok and report.num_segments == count and report.nbytes == seg * count
    assert target.call("wait_notification", 10) == (initiator.name, b"done")
    expected = np.zeros(dst_size, dtype=np.uint8)
    for s, d in zip(src_off.tolist(), dst_off.tolist(), strict=True):
        expected[d : d + seg] = src.buffer[s : s + seg]
    assert target.call("digest", rid) == digest(expected), "target bytes differ from what was written"


def test_mixed_sizes_in_one_post(kind, aio, initiator, target):
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 256 * KiB, 200)
    sizes[::50] = 2 * MiB + 1
    src_off = np.concatenate(([0], np.cumsum(sizes)[:-1])) + 1
    dst_off = np.concatenate(([0], np.cumsum(sizes[::-1])[:-1]))[::-1] + 7
    total = int(sizes.sum()) + 16
    rid = target.call("allocate", total)
    src = initiator.allocate(total)
    src.buffer[:] = pattern(5, total)

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        t = np.stack([np.full(len(sizes), src.region_id), src_off, np.full(len(sizes), rid), dst_off, sizes], 1)
        transfer = await initiator.post_write(peer, SegmentPairs(t))
        return await transfer.wait(60)

    assert aio.run(go()).ok
    expected = np.zeros(total, dtype=np.uint8)
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), sizes.tolist(), strict=True):
        expected[d : d + n] = src.buffer[s : s + n]
    assert target.call("digest", rid) == digest(expected)


@pytest.mark.parametrize("seg,count", [(1, 1), (13, 1000), (64 * KiB, 64), (8 * MiB + 1, 2)])
def test_read_fetches_every_byte(kind, aio, initiator, target, seg, count):
    if not initiator.supports_read:
        pytest.skip(f"{kind} does not support reads")
    size = seg * count + 3
    rid = target.call("register_foreign", size)
    target.call("fill", rid, 21)
    dst = initiator.allocate(size + 5)

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        pairs = SegmentPairs.strided(dst.region_id, rid, seg, count, local_offset=5, remote_offset=3)
        transfer = await initiator.post_read(peer, pairs, b"read-done")
        return await transfer.wait(60)

    assert aio.run(go()).ok
    remote = pattern(21, size)
    assert digest(dst.buffer[5 : 5 + seg * count]) == digest(remote[3 : 3 + seg * count])
    assert not dst.buffer[:5].any(), "read wrote outside the requested local range"


def test_many_posts_in_flight_keep_their_bytes(kind, aio, initiator, target):
    seg, num_posts = 256 * KiB, 32
    rid = target.call("allocate", seg * num_posts)
    src = initiator.allocate(seg * num_posts)
    src.buffer[:] = pattern(9, seg * num_posts)

    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        posted = [
            await initiator.post_write(
                peer, SegmentPairs.strided(src.region_id, rid, seg, 1, i * seg, i * seg), f"p{i}".encode()
            )
            for i in range(num_posts)
        ]
        return [await t.wait(60) for t in posted]

    assert all(r.ok for r in aio.run(go()))
    assert target.call("digest", rid) == digest(src.buffer)
    notes = target.call("pop_notifications")
    assert sorted(p for _, p in notes) == sorted(f"p{i}".encode() for i in range(num_posts))
