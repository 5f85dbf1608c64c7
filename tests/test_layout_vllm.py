"""The vLLM layouts checked against the installed vLLM: its own cache views and CPU cache-write op."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # importing vLLM takes seconds

import pdx.kernels as kernels  # noqa: E402

from pdx import layout as L  # noqa: E402
from pdx.errors import LayoutError  # noqa: E402
from pdx.segments import layer_block_segments  # noqa: E402

NUM_LAYERS, NUM_BLOCKS, H, N, D = 2, 6, 4, 16, 8
BLOCK_IDS = [4, 1, 2]


def _vllm_views(order: str):
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheLayout,
        KVCacheTensor,
        create_kv_cache_views,
    )

    spec = FullAttentionSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    page = spec.page_size_bytes
    size = page * NUM_BLOCKS * NUM_LAYERS
    raw = torch.zeros(size, dtype=torch.int8)
    tensor = KVCacheTensor(
        size=size, layers=["l0", "l1"], layer_stride=page * NUM_BLOCKS, block_stride=page
    )
    return raw, page, create_kv_cache_views(raw, spec, NUM_BLOCKS, KVCacheLayout[order], tensor)


@pytest.mark.parametrize("order", ["LBHNC", "LBNHC"])
def test_vllm_gpu_layouts_match_vllm_views(order):
    raw, page, views = _vllm_views(order)
    layout = L.vllm_flash(NUM_LAYERS, H, D, N, "bfloat16", order=order)
    assert layout.page_nbytes == page

    num_tokens = len(BLOCK_IDS) * N
    kv = torch.randn(2, NUM_LAYERS, num_tokens, H, D).to(torch.bfloat16)
    slots = kernels.slot_mapping_from_blocks(BLOCK_IDS, N)
    for layer, view in enumerate(views):
        # exactly how vLLM's FlashAttention backend splits a layer: (B, H, N, 2D) -> (B, N, H, D) x 2
        key_cache, value_cache = view.transpose(1, 2).split(D, dim=-1)
        key_cache[slots // N, slots % N] = kv[0, layer]
        value_cache[slots // N, slots % N] = kv[1, layer]
    assert torch.equal(kernels.gather(layout, views, slots), kv.flatten(-2))

    # the segments of the request's blocks carry all of its KV, nothing else needed
    copy = torch.zeros_like(raw)
    src, dst = raw.numpy(), copy.numpy()
    for layer, view in enumerate(views):
        base = view.data_ptr() - raw.data_ptr()
        for offset, nbytes in layer_block_segments(layout, layer, BLOCK_IDS):
            dst[base + offset : base + offset + nbytes] = src[
                base + offset : base + offset + nbytes
            ]
    copy_bf16 = copy.view(torch.bfloat16)
    copy_views = [
        torch.as_strided(copy_bf16, v.shape, v.stride(), v.storage_offset()) for v in views
    ]
    assert torch.equal(kernels.gather(layout, copy_views, slots), kv.flatten(-2))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_cpu_layout_matches_cpu_attention_cache_writes(dtype):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.kv_cache_interface import KVCacheLayout

    assert CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    n, d = 32, 32  # the CPU kernels need multiples of 32
    layout = L.vllm_cpu(1, H, d, n, dtype, isa="vec")
    cache = torch.zeros(NUM_BLOCKS, H, n, 2 * d, dtype=getattr(torch, dtype))
    key_cache, value_cache = cache.view(NUM_BLOCKS, H, 2 * n, d).chunk(
        2, dim=2
    )  # as CPUAttentionBackendImpl
    num_tokens = 2 * n + 7
    key = torch.randn(num_tokens, H, d).to(cache.dtype)
    value = torch.randn(num_tokens, H, d).to(cache.dtype)
    slots = kernels.slot_mapping_from_blocks([3, 0, 5], n, num_tokens)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")  # fmt: skip
    got = kernels.gather_layer(layout, cache, slots)
    assert torch.equal(got[0], key.flatten(1)) and torch.equal(got[1], value.flatten(1))
    assert np.array_equal(
        layer_block_segments(layout, 0, [3, 4, 0]),
        [[3 * layout.page_nbytes, 2 * layout.page_nbytes], [0, layout.page_nbytes]],
    )


@pytest.mark.parametrize("order", ["LBHNC", "LBNHC"])
def test_layout_read_from_vllm_tensor(order):
    _, page, views = _vllm_views(order)
    layout = L.from_vllm_tensor(
        views[0], NUM_LAYERS, is_cpu=False, total_kv_heads=2 * H, tp_size=2, tp_rank=1
    )
    assert layout == L.vllm_flash(
        NUM_LAYERS, 2 * H, D, N, "bfloat16", order=order, tp_size=2, tp_rank=1
    )
    cpu = L.from_vllm_tensor(torch.zeros(3, H, 32, 2 * D, dtype=torch.float32), 2, is_cpu=True)
    assert cpu == L.vllm_cpu(2, H, D, 32, "float32")
    with pytest.raises(LayoutError, match="only uses the HND"):
        L.from_vllm_tensor(torch.zeros(3, N, H, 2 * D).transpose(1, 2), 2, is_cpu=True)
    with pytest.raises(LayoutError, match="neither HND nor NHD"):
        L.from_vllm_tensor(torch.zeros(3, 2 * D, N, H).permute(0, 3, 2, 1), 2, is_cpu=False)
