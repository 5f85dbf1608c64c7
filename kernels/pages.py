"""Whole-page moves: the fast CPU path when a request's tokens fill its blocks in order.

Gathering token by token through strided views is an element-wise index (slow on
CPU). When ``slot_mapping`` is ``block_ids[t // N] * N + t % N`` (the normal case),
the reference instead copies whole pages with ``index_select`` (contiguous runs) and
then reorders one compact buffer densely. Imports torch; only kernel modules import it.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.views import _kind


def block_ids_of(slots: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """The block ids when ``slots`` fill whole blocks in order (the last one maybe partly), else None."""
    num_tokens = slots.numel()
    if num_tokens == 0:
        return None
    first = slots[::block_size]
    if bool((first % block_size).any()):
        return None
    blocks = first // block_size
    t = torch.arange(num_tokens, device=slots.device)
    expected = blocks.repeat_interleave(block_size)[:num_tokens] * block_size + t % block_size
    return blocks if torch.equal(expected, slots) else None


def page_tables(layout: Any, layer_cache: Any) -> list[torch.Tensor] | None:
    """Per backing tensor, a ``[num_blocks, page_elems]`` view in memory order; None if pages are not dense."""
    kind = _kind(layout)
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim
    if kind in ("vllm_hnd", "vllm_cpu", "vllm_nhd"):
        phys = layer_cache.transpose(1, 2) if kind == "vllm_nhd" else layer_cache  # memory order
        if not phys[0].is_contiguous():
            return None
        return [
            torch.as_strided(
                phys, (phys.shape[0], phys[0].numel()), (phys.stride(0), 1), phys.storage_offset()
            )
        ]
    pools = list(layer_cache) if kind == "sglang_mha" else [layer_cache]
    if not all(p.is_contiguous() for p in pools):
        return None
    width = n * (h if kind == "sglang_mha" else 1) * d
    return [p[: (p.shape[0] // n) * n].view(-1, width) for p in pools]


def compact_cache(layout: Any, pages: list[torch.Tensor]) -> Any:
    """A layer cache of the same kind over ``[num_pages, page_elems]`` tables."""
    kind = _kind(layout)
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim
    num_pages = pages[0].shape[0]
    if kind in ("vllm_hnd", "vllm_cpu"):
        return pages[0].view(num_pages, h, n, 2 * d)
    if kind == "vllm_nhd":
        return pages[0].view(num_pages, n, h, 2 * d).transpose(1, 2)
    if kind == "sglang_mha":
        return tuple(p.view(num_pages * n, h, d) for p in pages)
    return pages[0].view(num_pages * n, 1, d)


def copy_tokens(dst: torch.Tensor, src: torch.Tensor, num_tokens: int, to_pages: bool) -> None:
    """Between a dense ``[T, h, D]`` token tensor and a ``[num_pages, N, h, D]`` page view."""
    tokens, pages = (src, dst) if to_pages else (dst, src)
    n = pages.shape[1]
    full, rem = divmod(num_tokens, n)
    pairs = []
    if full:
        pairs.append((tokens[: full * n].unflatten(0, (full, n)), pages[:full]))
    if rem:
        pairs.append((tokens[full * n : num_tokens], pages[full, :rem]))
    for tok, page in pairs:
        if to_pages:
            page.copy_(tok)
        else:
            tok.copy_(page)
