"""``shm`` large frames: the target pulls them on several threads; every byte lands, failures stay per row."""

from __future__ import annotations

import os
import threading

import numpy as np
import pdx.transports as transports
import pytest
from pdx.transports.cma import PIECE_BYTES, SPLIT_BYTES, CmaCopier, split_pieces
from pdx.transports.remote import digest, pattern
from pdx.transports.segments import SegmentPairs

MiB = 1 << 20


@pytest.fixture
def target(start_target):
    return start_target('shm', copy_threads=3)


@pytest.fixture
def initiator(open_initiator):
    return open_initiator('shm')


@pytest.mark.parametrize("sizes", [
    [3 * MiB + 5, 7, MiB, 2 * MiB - 7, 1],  # rows cut inside
    [4 * MiB] * 3,  # equal rows, whole pieces each
    [64 << 10] * 40 + [5],  # small rows grouped whole
], ids=["mixed", "equal", "small"])
def test_split_pieces_cover_every_byte_once(sizes):
    sizes = np.array(sizes, dtype=np.int64)
    row, offset, length, bounds = split_pieces(sizes, MiB)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    covered = np.zeros(int(sizes.sum()), dtype=np.int8)
    for r, o, n in zip(row.tolist(), offset.tolist(), length.tolist(), strict=True):
        assert 0 <= o and o + n <= sizes[r]
        covered[starts[r] + o : starts[r] + o + n] += 1
    assert (covered == 1).all()
    piece_bytes = [int(length[lo:hi].sum()) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    assert piece_bytes[:-1] == [MiB] * (len(piece_bytes) - 1) and 0 < piece_bytes[-1] <= MiB


def test_large_scattered_write_and_read_are_byte_exact(aio, initiator, target):
    """One 6 MiB segment and 96 scattered 64 KiB segments, written and read back."""
    nbytes = 12 * MiB
    rid = target.call("allocate", nbytes)
    src = initiator.allocate(nbytes)
    src.buffer[:] = pattern(5, nbytes)
    back = initiator.allocate(nbytes)
    seg = 64 << 10
    order = np.random.default_rng(1).permutation(96)
    t = np.empty((97, 5), dtype=np.int64)
    t[0] = (src.region_id, 0, rid, 0, 6 * MiB)
    t[1:, 0], t[1:, 1] = src.region_id, 6 * MiB + np.arange(96) * seg
    t[1:, 2], t[1:, 3], t[1:, 4] = rid, 6 * MiB + order * seg, seg
    descriptor = target.call("descriptor")

    async def go():
        peer = await initiator.connect(descriptor)
        w = await initiator.post_write(peer, SegmentPairs(t), b"big")
        assert (await w.wait(60)).ok
        r = await initiator.post_read(peer, SegmentPairs.strided(back.region_id, rid, nbytes, 1))
        assert (await r.wait(60)).ok

    aio.run(go())
    assert target.call("wait_notification", 10) == (initiator.name, b"big")
    expect = np.empty(nbytes, dtype=np.uint8)
    expect[: 6 * MiB] = src.buffer[: 6 * MiB]
    for i, slot in enumerate(order.tolist()):
        expect[6 * MiB + slot * seg : 6 * MiB + (slot + 1) * seg] = src.buffer[6 * MiB + i * seg : 6 * MiB + (i + 1) * seg]
    assert target.call("digest", rid, 0, nbytes) == digest(expect)
    assert digest(back.buffer) == digest(expect)


def test_split_copy_fails_only_the_bad_rows_and_stops_its_threads():
    """A row whose source is not mapped fails alone; the rest of the frame lands."""
    rows, seg = 6, MiB
    assert rows * seg >= SPLIT_BYTES and seg >= PIECE_BYTES
    src = np.frombuffer(os.urandom(rows * seg), dtype=np.uint8)
    dst = np.zeros(rows * seg, dtype=np.uint8)
    local = dst.ctypes.data + np.arange(rows, dtype=np.int64) * seg
    remote = src.ctypes.data + np.arange(rows, dtype=np.int64) * seg
    remote[3] = 4096  # the zero page: never mapped
    copier = CmaCopier(copy_threads=2, name="test")
    try:
        failed = copier.copy(os.getpid(), local, remote, np.full(rows, seg, dtype=np.int64), is_read=True)
    finally:
        copier.close()
    assert failed.tolist() == [False, False, False, True, False, False]
    good = np.r_[0 : 3 * seg, 4 * seg : rows * seg]
    assert (dst[good] == src[good]).all()
    assert not [t for t in threading.enumerate() if t.name.startswith("pdx-cma-test")]


def test_copy_threads_must_be_positive():
    with pytest.raises(ValueError, match="copy_threads"):
        transports.create_transport("shm", copy_threads=0)
