"""Shared test helpers: an independent statement of each layout's memory order, and byte views."""

from __future__ import annotations

import numpy as np
import torch
from pdx.kernels.views import alloc_layer_cache, layer_tensors

from pdx import layout as L

DTYPES = ["float32", "bfloat16", "float16"]


def tiny_layouts(
    dtype: str = "bfloat16", block_size: int = 16, tp_size: int = 1, tp_rank: int = 0
) -> list[L.PagedKVLayout]:
    """One small layout of every kind (vllm_cpu needs block sizes that are multiples of 32 in vLLM,
    but its memory order does not depend on it)."""
    kw = dict(tp_size=tp_size, tp_rank=tp_rank)
    return [
        L.vllm_flash(2, 4, 8, block_size, dtype, order="HND", **kw),
        L.vllm_flash(2, 4, 8, block_size, dtype, order="NHD", **kw),
        L.vllm_cpu(2, 4, 8, block_size, dtype, **kw),
        L.sglang_mha(2, 4, 8, block_size, dtype, **kw),
        L.sglang_mla(2, 12, 4, block_size, dtype),
    ]


def flat(t: torch.Tensor) -> torch.Tensor:
    """The memory behind a (possibly permuted) dense tensor, in address order."""
    return torch.as_strided(t, (t.numel(),), (1,), t.storage_offset())


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a CPU tensor's memory."""
    f = flat(t)
    return (
        f.view(torch.uint8).numpy()
        if f.element_size() == 1
        else f.view(torch.int8).view(torch.uint8).numpy()
    )


def fill_random_bits(layout: L.PagedKVLayout, cache, seed: int = 0) -> None:
    """Random bit patterns (NaNs and all), so equality checks are bit-exact."""
    gen = torch.Generator().manual_seed(seed)
    for t in layer_tensors(layout, cache):
        b = as_bytes(t)
        b[:] = torch.randint(0, 256, (b.size,), generator=gen, dtype=torch.uint8).numpy()


def element_offsets(layout: L.PagedKVLayout, c: int, b, n, h, d):
    """(buffer, element offset) of component c, block b, token n, local head h, dim d.

    Written independently of kernels/views.py from the engines' documented memory order.
    """
    H, N, D = layout.num_kv_heads, layout.block_size, layout.head_dim
    kind = layout.kind.value
    if kind == "vllm_hnd":
        return 0, ((b * H + h) * N + n) * 2 * D + c * D + d
    if kind == "vllm_nhd":
        return 0, ((b * N + n) * H + h) * 2 * D + c * D + d
    if kind == "vllm_cpu":
        page = (b * H + h) * N * 2 * D
        return 0, (page + d * N + n) if c == 0 else (page + N * D + n * D + d)
    if kind == "sglang_mha":
        return c, ((b * N + n) * H + h) * D + d
    if kind == "sglang_mla":
        return 0, (b * N + n) * D + d
    raise AssertionError(kind)


def int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(int_view(a), int_view(b))


def new_caches(layout: L.PagedKVLayout, num_blocks: int, fill: str = "zeros") -> list:
    return [alloc_layer_cache(layout, num_blocks, fill=fill) for _ in range(layout.num_layers)]
