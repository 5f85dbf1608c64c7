"""Head-range resharding between prefill and decode ranks of different tensor-parallel sizes."""

from __future__ import annotations

import pdx.kernels as kernels
import pytest
import torch

from pdx import layout as L
from tests.kernels.helpers import new_caches

NUM_LAYERS, TOTAL_HEADS, HEAD_DIM, BLOCK = 2, 4, 8, 16
NUM_TOKENS = 40  # 3 blocks, the last one partial


def _factory(kind):
    if kind == "sglang_mha":
        return lambda tp, rank: L.sglang_mha(
            NUM_LAYERS, TOTAL_HEADS, HEAD_DIM, BLOCK, "bfloat16", tp_size=tp, tp_rank=rank
        )
    if kind == "vllm_cpu":
        return lambda tp, rank: L.vllm_cpu(
            NUM_LAYERS, TOTAL_HEADS, HEAD_DIM, BLOCK, "bfloat16", tp_size=tp, tp_rank=rank
        )
    order = "HND" if kind == "vllm_hnd" else "NHD"
    return lambda tp, rank: L.vllm_flash(
        NUM_LAYERS, TOTAL_HEADS, HEAD_DIM, BLOCK, "bfloat16", order=order, tp_size=tp, tp_rank=rank
    )


def _prefill_ranks(make, tp, kv_global, block_ids):
    """Each P rank's caches hold its slice of the global K/V [C, L, T, H_total, D]."""
    ranks = []
    slots = kernels.slot_mapping_from_blocks(block_ids, BLOCK, NUM_TOKENS)
    for rank in range(tp):
        layout = make(tp, rank)
        caches = new_caches(layout, 8)
        lo, hi = layout.head_range
        kernels.scatter(layout, caches, kv_global[:, :, :, lo:hi].flatten(-2).contiguous(), slots)
        ranks.append((layout, caches))
    return ranks


@pytest.mark.parametrize("kind", ["vllm_hnd", "vllm_nhd", "vllm_cpu", "sglang_mha"])
@pytest.mark.parametrize(("p_tp", "d_tp"), [(2, 1), (1, 2)])
def test_reshard_matches_slicing(kind, p_tp, d_tp):
    make = _factory(kind)
    kv_global = torch.randn(2, NUM_LAYERS, NUM_TOKENS, TOTAL_HEADS, HEAD_DIM).to(torch.bfloat16)
    p_blocks, d_blocks = [5, 1, 6], [0, 3, 7]
    p_slots = kernels.slot_mapping_from_blocks(p_blocks, BLOCK, NUM_TOKENS)
    d_slots = kernels.slot_mapping_from_blocks(d_blocks, BLOCK, NUM_TOKENS)
    prefill = _prefill_ranks(make, p_tp, kv_global, p_blocks)

    for d_rank in range(d_tp):
        d_layout = make(d_tp, d_rank)
        d_caches = new_caches(d_layout, 8)
        lo, hi = d_layout.head_range
        parts = []
        for p_layout, p_caches in prefill:
            a, b = max(lo, p_layout.head_start), min(hi, p_layout.head_end)
            if a < b:  # gather only the heads this decode rank needs
                parts.append(
                    (kernels.gather(p_layout, p_caches, p_slots, head_range=(a, b)), (a, b))
                )
        chunk = kernels.reshard(parts, (lo, hi), HEAD_DIM)
        kernels.scatter(d_layout, d_caches, chunk, d_slots)

        got = kernels.gather(d_layout, d_caches, d_slots)
        expected = kv_global[:, :, :, lo:hi].flatten(-2)
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_reshard_names_missing_heads():
    part = torch.zeros(2, 3, 2 * HEAD_DIM)
    with pytest.raises(ValueError, match=r"heads \[2, 3\]"):
        kernels.reshard([(part, (0, 2))], (0, 4), HEAD_DIM)
