"""Reference gather/scatter: exact memory order per layout, bit-exact round trips."""

from __future__ import annotations

import numpy as np
import pdx.kernels as kernels
import pytest
import torch
from pdx.kernels.views import layer_tensors

from tests.kernels.helpers import (
    DTYPES,
    bits_equal,
    element_offsets,
    fill_random_bits,
    flat,
    int_view,
    new_caches,
    tiny_layouts,
)

NUM_BLOCKS = 9
BLOCK_IDS = [7, 2, 5]  # out of order, not adjacent


def _layout_ids(layouts):
    return [lay.kind.value for lay in layouts]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(5), ids=_layout_ids(tiny_layouts()))
def test_gather_then_scatter_reproduces_blocks_bit_for_bit(index, dtype, block_size):
    layout = tiny_layouts(dtype, block_size)[index]
    src = new_caches(layout, NUM_BLOCKS)
    for i, cache in enumerate(src):
        fill_random_bits(layout, cache, seed=i)
    slots = kernels.slot_mapping_from_blocks(BLOCK_IDS, block_size)
    chunk = kernels.gather(layout, src, slots)
    assert chunk.shape == (
        layout.num_components,
        layout.num_layers,
        len(BLOCK_IDS) * block_size,
        layout.hidden_size,
    )

    dst = new_caches(layout, NUM_BLOCKS)
    kernels.scatter(layout, dst, chunk, slots)
    for s_cache, d_cache in zip(src, dst, strict=True):
        for s, d in zip(
            layer_tensors(layout, s_cache), layer_tensors(layout, d_cache), strict=True
        ):
            s_blocks = flat(s).view(NUM_BLOCKS, -1)[BLOCK_IDS]
            d_blocks = flat(d).view(NUM_BLOCKS, -1)
            assert bits_equal(d_blocks[BLOCK_IDS], s_blocks)
            others = [b for b in range(NUM_BLOCKS) if b not in BLOCK_IDS]
            assert not int_view(d_blocks[others]).any(), (
                "scatter wrote outside the request's blocks"
            )


@pytest.mark.parametrize("slot_order", ["blocks", "shuffled"])  # page path, element-wise path
@pytest.mark.parametrize("index", range(5), ids=_layout_ids(tiny_layouts()))
def test_gather_reads_each_engines_memory_order(index, slot_order):
    """Values placed by the documented per-engine formula come back as K/V [token, head, dim]."""
    layout = tiny_layouts("float32", 16)[index]
    caches = new_caches(layout, NUM_BLOCKS)
    num_tokens = 2 * layout.block_size + 5  # a partial last block
    if slot_order == "blocks":
        slots = kernels.slot_mapping_from_blocks(BLOCK_IDS, layout.block_size, num_tokens)
    else:
        slots = torch.randperm(
            NUM_BLOCKS * layout.block_size, generator=torch.Generator().manual_seed(1)
        )[:num_tokens]
    b = (slots // layout.block_size).numpy()
    n = (slots % layout.block_size).numpy()
    H, D = layout.num_kv_heads, layout.head_dim
    expected = torch.randn(layout.num_components, layout.num_layers, num_tokens, H, D)
    tt, hh, dd = np.meshgrid(np.arange(num_tokens), np.arange(H), np.arange(D), indexing="ij")
    for layer, cache in enumerate(caches):
        buffers = [flat(x) for x in layer_tensors(layout, cache)]
        for c in range(layout.num_components):
            buf, off = element_offsets(layout, c, b[tt], n[tt], hh, dd)
            buffers[buf][torch.from_numpy(off.reshape(-1))] = expected[c, layer].reshape(-1)

    got = kernels.gather(layout, caches, slots)
    assert torch.equal(got, expected.flatten(-2))

    per_layer = kernels.gather_layer(layout, caches[1], slots)
    assert torch.equal(per_layer, expected[:, 1].flatten(-2))

    # scatter writes exactly the same places
    dst = new_caches(layout, NUM_BLOCKS)
    kernels.scatter(layout, dst, got, slots)
    for s_cache, d_cache in zip(caches, dst, strict=True):
        for s, d in zip(
            layer_tensors(layout, s_cache), layer_tensors(layout, d_cache), strict=True
        ):
            assert torch.equal(flat(s), flat(d))


def test_slot_mapping_from_blocks():
    slots = kernels.slot_mapping_from_blocks([3, 0], 4, num_tokens=6)
    assert slots.tolist() == [12, 13, 14, 15, 0, 1]
    with pytest.raises(ValueError, match="do not fit"):
        kernels.slot_mapping_from_blocks([3, 0], 4, num_tokens=9)


def test_bad_inputs_raise_clear_errors():
    layout = tiny_layouts("float16", 16)[0]
    caches = new_caches(layout, 4)
    slots = kernels.slot_mapping_from_blocks([1], 16)
    chunk = kernels.gather(layout, caches, slots)
    with pytest.raises(ValueError, match="dtype"):
        kernels.scatter(layout, caches, chunk.float(), slots)
    with pytest.raises(ValueError, match="chunk must be"):
        kernels.scatter_layer(layout, caches[0], chunk[:, 0, :8], slots)
    with pytest.raises(ValueError, match=">= 0"):
        kernels.gather_layer(layout, caches[0], torch.tensor([-1]))
    with pytest.raises(ValueError, match="not all held"):
        kernels.gather_layer(layout, caches[0], slots, head_range=(2, 6))
    with pytest.raises(ValueError, match="must be"):
        kernels.gather_layer(layout, torch.zeros(4, 3, 16, 16, dtype=torch.float16), slots)


@pytest.mark.parametrize("slot_order", ["blocks", "shuffled"])
@pytest.mark.parametrize("index", range(4), ids=_layout_ids(tiny_layouts())[:4])
def test_scatter_leaves_other_tokens_and_heads_alone(index, slot_order):
    """A partial last block and a head subset: everything else in the blocks keeps its bytes."""
    layout = tiny_layouts("float16", 16)[index]
    (cache,) = new_caches(layout, NUM_BLOCKS)[:1]
    fill_random_bits(layout, cache, seed=3)
    before = [flat(x).clone() for x in layer_tensors(layout, cache)]
    num_tokens = layout.block_size + 3
    if slot_order == "blocks":
        slots = kernels.slot_mapping_from_blocks([4, 8], layout.block_size, num_tokens)
    else:
        slots = torch.randperm(
            NUM_BLOCKS * layout.block_size, generator=torch.Generator().manual_seed(2)
        )[:num_tokens]
    heads = (1, 3)
    chunk = torch.randn(2, num_tokens, 2 * layout.head_dim).to(torch.float16)
    kernels.scatter_layer(layout, cache, chunk, slots, head_range=heads)

    D = layout.head_dim
    tt, hh, dd = np.meshgrid(np.arange(num_tokens), np.arange(*heads), np.arange(D), indexing="ij")
    b, n = (slots // layout.block_size).numpy(), (slots % layout.block_size).numpy()
    for c in range(2):
        buf, off = element_offsets(layout, c, b[tt], n[tt], hh, dd)
        before[buf][torch.from_numpy(off.reshape(-1))] = chunk[c].unflatten(-1, (2, D)).reshape(-1)
    for want, x in zip(before, layer_tensors(layout, cache), strict=True):
        assert bits_equal(flat(x), want)
