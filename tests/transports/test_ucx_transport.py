"""ucx specifics: the shared ucxx runtime stops with the last transport and starts again."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import transports
from transports.base import SegmentPairs

os.environ.setdefault("UCX_NET_DEVICES", "lo")
pytestmark = [pytest.mark.ucx, pytest.mark.skipif("ucx" not in transports.available_transports(),
                                                  reason="ucxx not installed")]


async def _round_trip(payload: bytes) -> None:
    a, b = transports.create_transport("ucx"), transports.create_transport("ucx")
    src, dst = a.allocate(1 << 16), b.allocate(1 << 16)
    src.buffer[:] = 3
    peer = await a.connect(b.descriptor())
    rows = SegmentPairs.strided(src.region_id, dst.region_id, 4096, 16)
    report = await (await a.post_write(peer, rows, payload)).wait(30)
    note = await b.wait_notification(30)
    assert report.ok and note.payload == payload and (dst.buffer == 3).all()
    await a.aclose()
    await b.aclose()


def test_runtime_thread_stops_after_last_close_and_restarts():
    asyncio.run(_round_trip(b"first"))
    assert not [t.name for t in threading.enumerate() if t.name == "pdx-ucxx"]
    asyncio.run(_round_trip(b"second"))
    assert not [t.name for t in threading.enumerate() if t.name == "pdx-ucxx"]
