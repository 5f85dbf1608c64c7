"""P's sender and D's receiver end to end in one process, over the loopback transport.

Real bytes move from a fake paged KV cache on P into reserved blocks on D; the
tests assert the bytes, the completion rule, leases, releases and failures.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pdx.transports import create_transport
from pdx.transports.base import Notification

from pdx.connector.control import LayerDst
from pdx.connector.decode_side import DecodeSide
from pdx.connector.messages import LayerLanded
from pdx.connector.prefill_side import PrefillSide
from pdx.connector.protocol import PeerAddress
from pdx.connector.send_book import SendBook, WriteItem
from pdx.layout import vllm_cpu, vllm_flash

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, BLOCK_NBYTES = 2, 16, 4, 64
LAYOUT = vllm_cpu(NUM_LAYERS, 1, 2, BLOCK_SIZE, "float32")  # one head of head_dim 2: 64-byte blocks
TOKEN = "secret"


class Fleet:
    """One P side and one D side sharing a loop, each with its own 'KV cache' array."""

    def __init__(self, lease_s: float = 5.0, recv_timeout_s: float = 5.0, d_layout=LAYOUT) -> None:
        self.lease_s, self.recv_timeout_s, self.d_layout = lease_s, recv_timeout_s, d_layout

    async def __aenter__(self) -> Fleet:
        self.p_kv = np.random.default_rng(0).integers(
            0, 256, (NUM_LAYERS, NUM_BLOCKS, BLOCK_NBYTES), dtype=np.uint8)
        self.d_kv = np.zeros_like(self.p_kv)
        self.pt = create_transport("loopback")
        self.dt = create_transport("loopback")
        pr = self.pt.register(self.p_kv.reshape(-1))
        dr = self.dt.register(self.d_kv.reshape(-1))
        layer_bytes = NUM_BLOCKS * BLOCK_NBYTES
        src = [(pr.region_id, i * layer_bytes) for i in range(NUM_LAYERS)]
        dst = [LayerDst(region_id=dr.region_id, offset=i * layer_bytes) for i in range(NUM_LAYERS)]
        book = SendBook(self.lease_s, LAYOUT)
        self.p = PrefillSide(self.pt, book, src, "127.0.0.1", 0, TOKEN, 5.0)
        await self.p.start()
        self.d = DecodeSide(self.dt, self.d_layout, dst, TOKEN, "d0", self.recv_timeout_s)
        await self.d.start()
        self.peer = PeerAddress("127.0.0.1", self.p.server.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.d.aclose()
        await self.p.aclose()
        await self.pt.aclose()
        await self.dt.aclose()

    def save_all(self, rid: str, tid: str, p_blocks: list[int], num_tokens: int, start: int = 0) -> None:
        for layer in range(NUM_LAYERS):
            self.p.save(rid, tid, p_blocks, num_tokens, WriteItem(layer, start, num_tokens, time.time()))

    async def outcomes(self, n: int = 1, timeout: float = 5.0) -> list:
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += self.d.pop_outcomes()
            await asyncio.sleep(0.01)
        return out

    async def released(self, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.p.pop_released()
            if got:
                return got
            await asyncio.sleep(0.01)
        return []


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_blocks_land_in_the_reserved_blocks_and_both_sides_release():
    async def main():
        async with Fleet() as f:
            p_blocks, d_blocks, n = [3, 7, 1], [10, 2, 5], 10  # 10 tokens = 3 blocks
            f.save_all("p-req", "ab" * 8, p_blocks, n)  # P computes before D registers
            f.d.recv("d-req", "ab" * 8, f.peer, d_blocks, 0, n)
            (out,) = await f.outcomes()
            assert out.is_ok and out.req_id == "d-req" and not out.failed_block_ids
            for layer in range(NUM_LAYERS):
                for pb, db in zip(p_blocks, d_blocks, strict=True):
                    assert (f.d_kv[layer, db] == f.p_kv[layer, pb]).all()
            untouched = [b for b in range(NUM_BLOCKS) if b not in d_blocks]
            assert not f.d_kv[:, untouched].any(), "P wrote outside the reserved blocks"
            assert out.figures.nbytes == NUM_LAYERS * 3 * BLOCK_NBYTES
            assert f.p.pop_released() == []  # P's request not finished yet: blocks stay held
            f.p.finish("p-req", "ab" * 8, is_aborted=False)
            assert await f.released() == ["p-req"]
            assert f.p.book.num_held == 0 and f.d.book.num_reserved == 0
    run(main())


def test_figures_split_exposed_time_into_p_posting_and_the_last_write():
    async def main():
        async with Fleet() as f:
            f.d.recv("d", "fe" * 8, f.peer, [0, 1], 0, 8)
            await asyncio.sleep(0.05)
            computed = time.time() - 0.2  # P computed the layers 200 ms before it got to post them
            for layer in range(NUM_LAYERS):
                f.p.save("p", "fe" * 8, [2, 3], 8, WriteItem(layer, 0, 8, computed))
            (out,) = await f.outcomes()
            fig = out.figures
            assert out.is_ok and fig.last_post_ms >= 200.0 and fig.last_write_ms >= 0.0
            assert fig.exposed_ms == pytest.approx(fig.last_post_ms + fig.last_write_ms, abs=0.01)
            assert fig.to_dict()["exposed_ms"] == pytest.approx(
                fig.to_dict()["last_post_ms"] + fig.to_dict()["last_write_ms"], abs=0.01)
    run(main())


def test_malformed_notifications_are_dropped_and_counted_and_the_transfer_still_lands():
    async def main():
        async with Fleet() as f:
            f.d.recv("d", "0f" * 8, f.peer, [0, 1], 0, 8)
            await asyncio.sleep(0.05)
            good = LayerLanded("0f" * 8, 0, 0, 8, 1, time.time(), time.time()).encode()
            for payload in (b"", b"garbage", b'{"t":"0f0f0f0f","l":0}', good[:-1], b"\x02" + good[1:]):
                f.dt.notifications.push(Notification("intruder", payload))
            f.save_all("p", "0f" * 8, [2, 3], 8)
            (out,) = await f.outcomes()
            assert out.is_ok and out.figures.num_writes == NUM_LAYERS
            assert f.d.num_malformed == 5
    run(main())


def test_local_prefix_hit_on_d_is_not_overwritten():
    async def main():
        async with Fleet() as f:
            d_blocks = [4, 5, 6]
            f.d_kv[:, 4] = 77  # D's own cached block 0
            f.d.recv("d", "cd" * 8, f.peer, d_blocks, 1, 12)
            await asyncio.sleep(0.05)
            f.save_all("p", "cd" * 8, [0, 1, 2], 12)
            (out,) = await f.outcomes()
            assert out.is_ok
            assert (f.d_kv[:, 4] == 77).all()
            assert (f.d_kv[:, 5] == f.p_kv[:, 1]).all() and (f.d_kv[:, 6] == f.p_kv[:, 2]).all()
    run(main())


def test_chunked_prefill_completes_only_when_every_token_landed():
    async def main():
        async with Fleet() as f:
            f.d.recv("d", "ef" * 8, f.peer, [0, 1, 2], 0, 10)
            await asyncio.sleep(0.05)
            for layer in range(NUM_LAYERS):  # first chunk: tokens 0..6 (block 1 half full)
                f.p.save("p", "ef" * 8, [8, 9], 10, WriteItem(layer, 0, 6, time.time()))
            assert await f.outcomes(timeout=0.3) == []
            for layer in range(NUM_LAYERS):  # second chunk: tokens 6..10
                f.p.save("p", "ef" * 8, [8, 9, 10], 10, WriteItem(layer, 6, 10, time.time()))
            (out,) = await f.outcomes()
            assert out.is_ok and (f.d_kv[:, 2] == f.p_kv[:, 10]).all()
    run(main())


@pytest.mark.parametrize("d_layout", [
    vllm_cpu(NUM_LAYERS, 1, 4, BLOCK_SIZE, "bfloat16"),  # same block bytes, other dtype and head_dim
    vllm_flash(NUM_LAYERS, 1, 2, BLOCK_SIZE, "float32", order="NHD"),  # same bytes, other order
    vllm_cpu(NUM_LAYERS, 1, 2, 2 * BLOCK_SIZE, "float32"),  # other block size
], ids=["dtype", "order", "block_size"])
def test_a_decoder_with_another_kv_layout_is_refused_naming_both_and_nothing_is_held(d_layout):
    """P compares D's layout fingerprint before any byte moves: D fails the transfer at once
    (vLLM recomputes or fails it), P frees its blocks without waiting for its lease."""
    assert d_layout.fingerprint() != LAYOUT.fingerprint()

    async def main():
        async with Fleet(lease_s=60.0, recv_timeout_s=60.0, d_layout=d_layout) as f:
            f.save_all("p", "bc" * 8, [0, 1, 2], 10)
            f.d.recv("d", "bc" * 8, f.peer, [3, 4, 5], 0, 10)
            (out,) = await f.outcomes()
            d_blocks = -(-10 // d_layout.block_size)  # D's blocks for 10 tokens, all to recompute
            assert not out.is_ok and out.failed_block_ids == set([3, 4, 5][:d_blocks])
            error = out.figures.error
            assert "KV layout mismatch" in error
            assert f"decoder {d_layout.summary()}" in error and f"prefill {LAYOUT.summary()}" in error
            f.p.finish("p", "bc" * 8, is_aborted=False)
            assert await f.released() == ["p"]
            assert f.p.book.num_held == 0 and f.d.book.num_reserved == 0
            assert not f.d_kv.any()
    run(main())


def test_lease_expiry_frees_p_when_d_never_registers():
    async def main():
        async with Fleet(lease_s=0.3) as f:
            f.save_all("p", "12" * 8, [0, 1], 8)
            f.p.finish("p", "12" * 8, is_aborted=False)
            assert f.p.book.num_held == 1
            assert await f.released() == ["p"]
            assert f.p.book.num_held == 0
            # A decoder that shows up after the lease is refused, and recomputes everything.
            f.d.recv("d", "12" * 8, f.peer, [0, 1], 0, 8)
            (out,) = await f.outcomes()
            assert not out.is_ok and out.failed_block_ids == {0, 1}
            assert "over on the prefill side" in out.figures.error
            assert not f.d_kv.any()
    run(main())


def test_decoder_timeout_reports_unlanded_blocks_and_releases_p():
    async def main():
        async with Fleet(recv_timeout_s=0.4) as f:
            f.d.recv("d", "34" * 8, f.peer, [0, 1, 2], 0, 12)
            await asyncio.sleep(0.05)
            f.p.save("p", "34" * 8, [5, 6, 7], 12, WriteItem(0, 0, 12, time.time()))  # layer 1 never comes
            (out,) = await f.outcomes()
            assert not out.is_ok and out.failed_block_ids == {0, 1, 2}
            f.p.finish("p", "34" * 8, is_aborted=False)
            assert await f.released() == ["p"]  # D released it: P does not wait for its lease
            assert f.d.book.num_reserved == 0 and f.p.book.num_held == 0
    run(main())


def test_prefill_abort_fails_the_decoder_at_once():
    async def main():
        async with Fleet() as f:
            f.d.recv("d", "56" * 8, f.peer, [0, 1], 0, 8)
            await asyncio.sleep(0.05)
            f.p.save("p", "56" * 8, [2, 3], 8, WriteItem(0, 0, 8, time.time()))
            f.p.finish("p", "56" * 8, is_aborted=True)
            (out,) = await f.outcomes()
            assert not out.is_ok and "aborted" in out.figures.error
            assert await f.released() == ["p"]
    run(main())


def test_decoder_abort_releases_both_sides():
    async def main():
        async with Fleet() as f:
            f.d.recv("d", "78" * 8, f.peer, [0, 1], 0, 8)
            await asyncio.sleep(0.05)
            f.d.release("d", "78" * 8, f.peer)
            (out,) = await f.outcomes()
            assert out.req_id == "d" and not out.is_ok and not out.failed_block_ids
            f.save_all("p", "78" * 8, [2, 3], 8)  # P computes after D gave up: nothing is written
            f.p.finish("p", "78" * 8, is_aborted=False)
            assert await f.released() == ["p"]
            assert not f.d_kv.any()
    run(main())


def test_bad_token_is_refused():
    async def main():
        async with Fleet() as f:
            f.d.token = "wrong"
            f.d.recv("d", "9a" * 8, f.peer, [0], 0, 4)
            (out,) = await f.outcomes()
            assert not out.is_ok and "auth_token" in out.figures.error
    run(main())


def test_prefill_death_fails_the_decoder_without_waiting_for_the_timeout():
    async def main():
        async with Fleet(recv_timeout_s=30) as f:
            f.d.recv("d", "bc" * 8, f.peer, [0, 1], 0, 8)
            await asyncio.sleep(0.05)
            await f.p.server.aclose()  # P's control connections drop, as when P is killed
            (out,) = await f.outcomes(timeout=3)
            assert not out.is_ok and out.failed_block_ids == {0, 1}
    run(main())


def test_prefill_request_that_never_ran_fails_a_waiting_decoder_and_holds_nothing():
    async def main():
        async with Fleet() as f:
            f.d.recv("d", "de" * 8, f.peer, [0, 1], 0, 8)
            await asyncio.sleep(0.05)
            f.p.close("de" * 8, "the prefill request ended before its KV was computed")
            (out,) = await f.outcomes()
            assert not out.is_ok and out.failed_block_ids == {0, 1}
            await asyncio.sleep(0.1)
            assert f.p.pop_released() == []  # nothing was held, so nothing is reported sent
            assert f.p.book.num_held == 0 and f.d.book.num_reserved == 0
    run(main())


class SlowEvent:
    """Stands in for a CUDA event: the layer's KV is written only after a few polls."""

    def __init__(self, kv, block: int, value: int) -> None:
        self.kv, self.block, self.value, self.polls = kv, block, value, 0

    def query(self) -> bool:
        self.polls += 1
        if self.polls < 5:
            return False
        self.kv[:, self.block] = self.value  # the "kernel" finishes writing
        return True


def test_sender_waits_for_the_layer_ready_event_before_reading():
    async def main():
        async with Fleet() as f:
            f.d.recv("d", "fa" * 8, f.peer, [0], 0, 4)
            await asyncio.sleep(0.05)
            event = SlowEvent(f.p_kv, 9, 42)
            for layer in range(NUM_LAYERS):
                f.p.save("p", "fa" * 8, [9], 4, WriteItem(layer, 0, 4, time.time(), event))
            (out,) = await f.outcomes()
            assert out.is_ok and (f.d_kv[:, 0] == 42).all()
    run(main())
