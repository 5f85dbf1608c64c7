"""ucx specifics: the ucxx runtime is once per process, transports come and go over it cleanly,
a ucxx request keeps its buffer until UCX ends it, and a descriptor must name the liveness port."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import weakref

import numpy as np
import pdx.transports as transports
import pytest
from pdx.transports._fds import open_fds
from pdx.transports.errors import DescriptorError
from pdx.transports.segments import SegmentPairs

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


def test_runtime_is_shared_and_transports_leave_only_it_behind():
    asyncio.run(_round_trip(b"first"))
    cls = transports.transport_class("ucx")
    runtime_fds = cls.process_fds()
    assert runtime_fds, "the ucxx runtime reports no fds of its own"
    threads = {t.name for t in threading.enumerate()}
    fds = open_fds()
    asyncio.run(_round_trip(b"second"))  # the same runtime serves new transports on a new event loop
    assert cls.process_fds() == runtime_fds
    assert [t.name for t in threading.enumerate()].count("pdx-ucxx") == 1
    assert {t.name for t in threading.enumerate()} <= threads | set(cls.process_threads)
    assert not (open_fds() - fds - runtime_fds), "closed ucx transports left fds open"


def test_a_cancelled_wait_leaves_the_request_holding_its_buffer_until_the_endpoint_is_aborted():
    # UCX writes into a receive buffer until the request ends; a cancelled caller must not free it
    from pdx.transports._ucx_runtime import run_op, settle_ops

    async def on_runtime(conn) -> tuple[bool, bool]:
        ops: set[asyncio.Task] = set()
        buf = np.zeros(1 << 20, dtype=np.uint8)
        ref = weakref.ref(buf)
        caller = asyncio.ensure_future(run_op(ops, conn.ep.recv(buf)))  # nothing is ever sent to it
        await asyncio.sleep(0.05)
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        del buf
        held = ref() is not None and len(ops) == 1
        conn.drop()  # aborts the endpoint: UCX cancels the receive
        return held, await settle_ops(ops, 10)

    async def go() -> tuple[bool, bool]:
        a, b = transports.create_transport("ucx"), transports.create_transport("ucx")
        try:
            peer = await a.connect(b.descriptor())
            return await asyncio.wrap_future(a._runtime.submit(on_runtime(peer.state)))
        finally:
            await a.aclose()
            await b.aclose()

    held, settled = asyncio.run(go())
    assert held, "the request's buffer was dropped while UCX could still write into it"
    assert settled, "aborting the endpoint did not end its pending request"


def test_descriptor_without_a_liveness_port_is_rejected_and_both_sides_stay_usable():
    async def go() -> None:
        a, b = transports.create_transport("ucx"), transports.create_transport("ucx")
        try:
            doc = json.loads(b.descriptor())
            del doc["address"]["alive_port"]
            with pytest.raises(DescriptorError, match="listener address"):
                await a.connect(json.dumps(doc).encode())
            src, dst = a.allocate(4096), b.allocate(4096)
            src.buffer[:] = 7
            peer = await a.connect(b.descriptor())
            report = await (await a.post_write(peer, SegmentPairs.strided(src.region_id, dst.region_id, 4096, 1))).wait(30)
            assert report.ok and (dst.buffer == 7).all()
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(go())

