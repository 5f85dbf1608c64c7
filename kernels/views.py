"""Strided views that give every paged layout one shape: ``[num_blocks, block_size, H, D]`` per component.

The views alias the engine's memory (no copies), so writing through them writes the
cache. Imports torch; only kernel modules import this file.

``layout`` is duck-typed (``pdx.layout.PagedKVLayout`` fits): ``kind``, ``block_size``,
``num_kv_heads``, ``head_dim``, ``is_token_addressable``. What one layer's cache is, per kind:

    vllm_hnd, vllm_nhd   the tensor vLLM hands out: logical [B, H, N, 2D], strides per layout
    vllm_cpu             [B, H, N, 2D], contiguous; page = K^T [D, N] then V [N, D] per head
    sglang_mha           (k_pool, v_pool), each [num_slots, H, D]
    sglang_mla           [num_slots, 1, D]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _kind(layout: Any) -> str:
    return str(getattr(layout.kind, "value", layout.kind))


def kv_views(layout: Any, layer_cache: Any) -> list[torch.Tensor]:
    """One ``[num_blocks, block_size, H, D]`` view per component (K, V; or the MLA latent)."""
    kind = _kind(layout)
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim
    if kind in ("vllm_hnd", "vllm_nhd", "vllm_cpu"):
        t = layer_cache
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[1:]) != (h, n, 2 * d):
            shape = tuple(getattr(t, "shape", ()))
            raise ValueError(
                f"{kind} layer cache must be [num_blocks, {h}, {n}, {2 * d}], got {shape}"
            )
        if kind != "vllm_cpu":
            bnhc = t.transpose(1, 2)  # [B, N, H, 2D]
            return [bnhc[..., :d], bnhc[..., d:]]
        if not layout.is_token_addressable:
            raise ValueError(
                f"vllm_cpu pages of ISA {layout.cpu_isa!r} have an unknown interior; "
                "copy whole blocks (pdx.segments) instead of gathering tokens"
            )
        if not t.is_contiguous():
            raise ValueError("a vllm_cpu layer cache must be contiguous")
        page = t.view(t.shape[0], h, 2 * n * d)
        k = page[:, :, : n * d].unflatten(-1, (d, n)).permute(0, 3, 1, 2)  # [B, N, H, D]
        v = page[:, :, n * d :].unflatten(-1, (n, d)).permute(0, 2, 1, 3)
        return [k, v]
    if kind == "sglang_mha":
        if not isinstance(layer_cache, Sequence) or len(layer_cache) != 2:
            raise ValueError("an sglang_mha layer cache is a (k_pool, v_pool) pair")
        return [_pool_view(p, n, h, d, kind) for p in layer_cache]
    if kind == "sglang_mla":
        return [_pool_view(layer_cache, n, 1, d, kind)]
    raise ValueError(f"unknown KV layout kind {kind!r}")


def _pool_view(pool: Any, n: int, h: int, d: int, kind: str) -> torch.Tensor:
    if not isinstance(pool, torch.Tensor) or pool.dim() != 3 or tuple(pool.shape[1:]) != (h, d):
        raise ValueError(
            f"{kind} pool must be [num_slots, {h}, {d}], got {tuple(getattr(pool, 'shape', ()))}"
        )
    num_pages = pool.shape[0] // n
    return pool[: num_pages * n].unflatten(0, (num_pages, n))


def alloc_layer_cache(
    layout: Any, num_blocks: int, device: Any = "cpu", fill: str = "zeros"
) -> Any:
    """One layer's cache as the engine allocates it (``fill``: "zeros", "randn" or "empty")."""
    kind = _kind(layout)
    dtype = getattr(torch, layout.dtype)
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim

    def make(*shape: int) -> torch.Tensor:
        if fill == "randn":
            return torch.randn(*shape, device=device).to(dtype)
        return getattr(torch, fill)(*shape, dtype=dtype, device=device)

    if kind == "vllm_nhd":
        return make(num_blocks, n, h, 2 * d).transpose(
            1, 2
        )  # memory [B, N, H, 2D], logical [B, H, N, 2D]
    if kind in ("vllm_hnd", "vllm_cpu"):
        return make(num_blocks, h, n, 2 * d)
    if kind == "sglang_mha":
        return (make(num_blocks * n, h, d), make(num_blocks * n, h, d))
    if kind == "sglang_mla":
        return make(num_blocks * n, 1, d)
    raise ValueError(f"unknown KV layout kind {kind!r}")


def layer_tensors(layout: Any, layer_cache: Any) -> list[torch.Tensor]:
    """The tensors backing one layer's cache (for byte-level checks)."""
    return list(layer_cache) if _kind(layout) == "sglang_mha" else [layer_cache]
