"""cuda_ipc: only where CUDA exists; elsewhere it must say so clearly and stay out of the registry."""

from __future__ import annotations

import pdx.transports as transports
import pytest
from pdx.transports.errors import TransportUnavailable


def _has_cuda() -> bool:
    from pdx.transports.cuda_ipc import CudaIpcTransport

    return CudaIpcTransport.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA")
def test_cuda_ipc_is_unavailable_without_cuda():
    assert "cuda_ipc" not in transports.available_transports()
    with pytest.raises(TransportUnavailable, match="CUDA"):
        transports.create_transport("cuda_ipc")


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs CUDA")
def test_cuda_ipc_write_in_process_lands_and_notifies():
    import asyncio

    import torch
    from pdx.transports.segments import SegmentPairs

    async def go():
        a, b = transports.create_transport("cuda_ipc"), transports.create_transport("cuda_ipc")
        src, dst = a.allocate(1 << 20), b.allocate(1 << 20)
        src.buffer.copy_(torch.arange(1 << 20, device=src.buffer.device, dtype=torch.int64).to(torch.uint8))
        peer = await a.connect(b.descriptor())
        report = await (await a.post_write(peer, SegmentPairs.strided(src.region_id, dst.region_id, 4096, 256),
                                           b"done")).wait(30)
        note = await b.wait_notification(10)
        assert report.ok and note.payload == b"done"
        assert torch.equal(src.buffer, dst.buffer)
        await a.aclose()
        await b.aclose()

    asyncio.run(go())
