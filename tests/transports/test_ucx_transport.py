"""ucx specifics: the ucxx runtime is once per process, and transports come and go over it cleanly."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import transports
from transports.base import SegmentPairs

os.environ.setdefault("UCX_NET_DEVICES", "lo")
TRANSPORT_KIND = "ucx"  # the leak check accepts the ucxx runtime's threads and fds
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


def _fds() -> set[str]:
    from transports._ucx_runtime import open_fds

    return open_fds()


def test_runtime_is_shared_and_transports_leave_only_it_behind():
    asyncio.run(_round_trip(b"first"))
    cls = transports.transport_class("ucx")
    runtime_fds = cls.process_fds()
    assert runtime_fds, "the ucxx runtime reports no fds of its own"
    threads = {t.name for t in threading.enumerate()}
    fds = _fds()
    asyncio.run(_round_trip(b"second"))  # the same runtime serves new transports on a new event loop
    assert cls.process_fds() == runtime_fds
    assert [t.name for t in threading.enumerate()].count("pdx-ucxx") == 1
    assert {t.name for t in threading.enumerate()} <= threads | set(cls.process_threads)
    assert not (_fds() - fds - runtime_fds), "closed ucx transports left fds open"
