"""Segment planning: a planned byte copy moves exactly a request's KV between two layouts."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pdx.kernels as kernels  # noqa: E402
from pdx.kernels.views import layer_tensors  # noqa: E402
from pdx.transports.segments import NBYTES  # noqa: E402

from pdx import layout as L  # noqa: E402
from pdx.errors import LayoutError  # noqa: E402
from pdx.segments import copy_host, layer_block_segments, pair_segments, plan_copy  # noqa: E402
from tests.kernels.helpers import as_bytes, fill_random_bits, new_caches  # noqa: E402

NUM_BLOCKS = 12


def _make(kind, block_size, tp_size=1, tp_rank=0, dtype="bfloat16"):
    if kind == "sglang_mla":
        return L.sglang_mla(2, 12, 4, block_size, dtype)
    if kind == "sglang_mha":
        return L.sglang_mha(2, 4, 8, block_size, dtype, tp_size=tp_size, tp_rank=tp_rank)
    if kind == "vllm_cpu":
        return L.vllm_cpu(2, 4, 8, block_size, dtype, tp_size=tp_size, tp_rank=tp_rank)
    order = "HND" if kind == "vllm_hnd" else "NHD"
    return L.vllm_flash(2, 4, 8, block_size, dtype, order=order, tp_size=tp_size, tp_rank=tp_rank)


def _apply(plan, src_layout, src_cache, dst_layout, dst_cache):
    """Copy one layer's bytes exactly as a transport would execute the plan."""
    src = [as_bytes(t) for t in layer_tensors(src_layout, src_cache)]
    dst = [as_bytes(t) for t in layer_tensors(dst_layout, dst_cache)]
    for sb, so, db, do, n in plan.table.tolist():
        dst[db][do : do + n] = src[sb][so : so + n]


def _copy_and_check(
    src_layout, src_ids, dst_layout, dst_ids, num_tokens=None, num_blocks=NUM_BLOCKS
):
    src = new_caches(src_layout, num_blocks)
    for i, c in enumerate(src):
        fill_random_bits(src_layout, c, seed=i)
    dst = new_caches(dst_layout, num_blocks)
    plan = plan_copy(src_layout, src_ids, dst_layout, dst_ids, num_tokens)
    for s, d in zip(src, dst, strict=True):
        _apply(plan, src_layout, s, dst_layout, d)
    t = plan.num_tokens
    s_slots = kernels.slot_mapping_from_blocks(src_ids, src_layout.block_size, t)
    d_slots = kernels.slot_mapping_from_blocks(dst_ids, dst_layout.block_size, t)
    want = kernels.gather(src_layout, src, s_slots, head_range=plan.head_range)
    got = kernels.gather(dst_layout, dst, d_slots, head_range=plan.head_range)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    return plan


KINDS = ["vllm_hnd", "vllm_nhd", "vllm_cpu", "sglang_mha", "sglang_mla"]


@pytest.mark.parametrize("kind", KINDS)
def test_same_layout_copies_whole_blocks_and_merges_runs(kind):
    layout = _make(kind, 16)
    plan = _copy_and_check(layout, [3, 4, 5, 9], layout, [0, 1, 7, 8])
    assert len(plan) == 3 * layout.num_buffers  # 3,4 -> 0,1 merge; 5 -> 7; 9 -> 8
    assert plan.nbytes == 4 * layout.page_nbytes * layout.num_buffers


@pytest.mark.parametrize("kind", KINDS)
def test_partial_last_block_is_copied_whole(kind):
    layout = _make(kind, 16)
    plan = _copy_and_check(layout, [2, 6], layout, [5, 1], num_tokens=20)
    assert plan.nbytes == 2 * layout.page_nbytes * layout.num_buffers


@pytest.mark.parametrize("kind", ["vllm_hnd", "vllm_nhd", "vllm_cpu", "sglang_mha"])
def test_prefill_tp2_to_decode_tp1_by_direct_copy(kind):
    d_layout = _make(kind, 16)
    src = [_make(kind, 16, 2, r) for r in range(2)]
    dst = new_caches(d_layout, NUM_BLOCKS)
    src_caches = []
    for rank, p_layout in enumerate(src):
        caches = new_caches(p_layout, NUM_BLOCKS)
        for i, c in enumerate(caches):
            fill_random_bits(p_layout, c, seed=10 * rank + i)
        plan = plan_copy(p_layout, [4, 1], d_layout, [2, 3])
        assert plan.head_range == p_layout.head_range
        for s, d in zip(caches, dst, strict=True):
            _apply(plan, p_layout, s, d_layout, d)
        src_caches.append(caches)
    p_slots = kernels.slot_mapping_from_blocks([4, 1], 16)
    parts = [
        (kernels.gather(p, c, p_slots), p.head_range) for p, c in zip(src, src_caches, strict=True)
    ]
    want = kernels.reshard(parts, (0, 4), 8)
    got = kernels.gather(d_layout, dst, kernels.slot_mapping_from_blocks([2, 3], 16))
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("kind", ["vllm_hnd", "vllm_nhd", "vllm_cpu", "sglang_mha"])
def test_prefill_tp1_to_decode_tp2_by_direct_copy(kind):
    p_layout = _make(kind, 16)
    for rank in range(2):
        plan = _copy_and_check(p_layout, [0, 5, 6], _make(kind, 16, 2, rank), [9, 2, 3])
        assert plan.head_range == (2 * rank, 2 * rank + 2)
    if p_layout.is_head_major:  # one run per block, not one per token
        assert len(plan_copy(p_layout, [0, 5, 6], _make(kind, 16, 2, 1), [9, 2, 3])) == 3


@pytest.mark.parametrize(
    ("kind", "src_bs", "dst_bs"),
    [("vllm_hnd", 16, 32), ("vllm_nhd", 32, 16), ("sglang_mha", 16, 1), ("sglang_mla", 64, 16)],
)
def test_block_size_change_by_direct_copy(kind, src_bs, dst_bs):
    src, dst = _make(kind, src_bs), _make(kind, dst_bs)
    num_tokens = 50
    num_blocks = 64  # enough blocks of size 1 for 50 tokens
    src_ids = [7, 2, 4, 0][: -(-num_tokens // src_bs)]
    dst_ids = list(range(num_blocks))[::-1][: -(-num_tokens // dst_bs)]  # descending: no merging
    plan = _copy_and_check(src, src_ids, dst, dst_ids, num_tokens=num_tokens, num_blocks=num_blocks)
    assert plan.num_tokens == num_tokens


def test_incompatible_layouts_fail_up_front():
    hnd = _make("vllm_hnd", 16)
    cases = [
        (hnd, _make("vllm_nhd", 16), "kind"),
        (hnd, _make("vllm_hnd", 16, dtype="float16"), "dtype"),
        (hnd, replace(hnd, head_dim=16), "head_dim"),
        (hnd, replace(hnd, num_layers=3), "num_layers"),
        (_make("vllm_cpu", 32), _make("vllm_cpu", 64), "transposed"),
        (_make("vllm_hnd", 16, 2, 0), _make("vllm_hnd", 16, 2, 1), "do not overlap"),
    ]
    for src, dst, match in cases:
        with pytest.raises(LayoutError, match=match):
            plan_copy(src, [0, 1], dst, [0, 1])
    with pytest.raises(LayoutError, match="pass num_tokens"):
        plan_copy(hnd, [0, 1], hnd, [0, 1, 2])
    with pytest.raises(LayoutError, match="does not fit"):
        plan_copy(hnd, [0, 1], hnd, [0, 1], num_tokens=33)
    with pytest.raises(LayoutError, match=">= 0"):
        plan_copy(hnd, [0, -1], hnd, [0, 1])


def test_layer_block_segments_merge_adjacent_blocks():
    layout = _make("vllm_cpu", 32)
    page = layout.page_nbytes
    segs = layer_block_segments(layout, 1, np.array([5, 6, 7, 2, 9, 10]))
    assert segs.tolist() == [[5 * page, 3 * page], [2 * page, page], [9 * page, 2 * page]]
    padded = replace(layout, block_stride=2 * page)  # no merging across padding
    assert layer_block_segments(padded, 0, [1, 2]).tolist() == [[2 * page, page], [4 * page, page]]
    with pytest.raises(LayoutError, match="layer 2"):
        layer_block_segments(layout, 2, [0])


def test_segment_pairs_map_buffers_to_regions_and_offsets():
    layout = _make("sglang_mha", 16)
    pairs = pair_segments(
        layout, [1], layout, [3], src_buffers=[(11, 0), (12, 100)], dst_buffers=[(21, 7), (22, 0)]
    )
    page = layout.page_nbytes
    assert pairs.table.tolist() == [
        [11, page, 21, 7 + 3 * page, page],
        [12, 100 + page, 22, 3 * page, page],
    ]
    plan = plan_copy(layout, [1], layout, [3])
    read = plan.segment_pairs([(11, 0), (12, 100)], [(21, 7), (22, 0)], for_read=True)
    assert read.table.tolist() == [
        [21, 7 + 3 * page, 11, page, page],
        [22, 3 * page, 12, 100 + page, page],
    ]
    with pytest.raises(LayoutError, match="2 src buffers"):
        pair_segments(
            layout, [1], layout, [3], src_buffers=[(11, 0)], dst_buffers=[(21, 0), (22, 0)]
        )


def test_many_blocks_plan_without_python_loops_over_blocks():
    layout = L.vllm_flash(32, 8, 128, 16, "bfloat16", order="NHD")
    src_ids = np.random.default_rng(0).permutation(4096)[:256]  # a 4K-token prompt
    plan = plan_copy(layout, src_ids, layout.with_heads(0, 8), np.arange(256))
    assert plan.nbytes == 256 * layout.page_nbytes and len(plan) <= 256
    reshard = plan_copy(
        layout,
        src_ids,
        L.vllm_flash(32, 8, 128, 16, "bfloat16", order="NHD", tp_size=2, tp_rank=1),
        np.arange(256),
    )
    assert int(reshard.table[:, NBYTES].sum()) == 256 * layout.page_nbytes // 2


def test_plan_runs_over_a_real_transport():
    from pdx.transports import create_transport

    layout = _make("vllm_hnd", 16)
    src, dst = new_caches(layout, NUM_BLOCKS), new_caches(layout, NUM_BLOCKS)
    for i, c in enumerate(src):
        fill_random_bits(layout, c, seed=i)
    plan = plan_copy(layout, [8, 9, 1], layout, [0, 4, 5])

    async def run():
        p, d = create_transport("loopback"), create_transport("loopback")
        try:
            p_regions = [p.register(c) for c in src]
            d_regions = [d.register(c) for c in dst]
            peer = await p.connect(d.descriptor())
            pairs = plan.segment_pairs_layers(
                [[(r.region_id, 0)] for r in p_regions], [[(r.region_id, 0)] for r in d_regions]
            )
            report = await (await p.post_write(peer, pairs, b"done")).wait(5)
            assert report.ok and (await d.wait_notification(5)).payload == b"done"
        finally:
            await p.aclose()
            await d.aclose()

    asyncio.run(run())
    want = kernels.gather(layout, src, kernels.slot_mapping_from_blocks([8, 9, 1], 16))
    got = kernels.gather(layout, dst, kernels.slot_mapping_from_blocks([0, 4, 5], 16))
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize(
    "src, dst, src_ids, dst_ids",
    [
        (replace(L.vllm_cpu(2, 2, 8, 16, "float32"), block_stride=2 * 4096 + 64),  # padded engine blocks
         L.vllm_cpu(2, 2, 8, 16, "float32"), [5, 1, 2, 3], [0, 1, 2, 3]),  # -> a dense chunk
        (L.vllm_cpu(2, 2, 8, 16, "float32"), L.vllm_cpu(2, 2, 8, 16, "float32"), [0, 1], [7, 3]),
        (L.vllm_flash(2, 4, 8, 16, "bfloat16", order="HND", tp_size=1),  # head slices of each block
         L.vllm_flash(2, 4, 8, 16, "bfloat16", order="HND", tp_size=2, tp_rank=1), [4, 0], [1, 2]),
        (L.vllm_flash(2, 4, 8, 16, "bfloat16", order="NHD"),  # re-blocked, token by token
         L.vllm_flash(2, 4, 8, 8, "bfloat16", order="NHD"), [2, 0], [5, 1, 3, 0]),
    ],
    ids=["gather-padded", "scatter", "head-slices", "reblock"],
)
def test_copy_host_moves_exactly_the_planned_bytes(src, dst, src_ids, dst_ids):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, src.buffer_nbytes(8), dtype=np.uint8)
    b = rng.integers(0, 256, dst.buffer_nbytes(8), dtype=np.uint8)
    plan = plan_copy(src, src_ids, dst, dst_ids)
    want = b.copy()
    for _, s_off, _, d_off, n in plan.table.tolist():  # the reference: one slice per row
        want[d_off:d_off + n] = a[s_off:s_off + n]
    copy_host(plan, [a], [b])
    assert np.array_equal(b, want) and plan.nbytes > 0
