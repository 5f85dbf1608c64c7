"""Torch reference gather/scatter: the ground truth for every layout, and the CPU path.

Chunk formats (LMCache's ``KV_2LTD`` / ``KV_2TD``; ``C`` = 2 for K/V, 1 for MLA)::

    per layer      [C, num_tokens, H * D]
    whole request  [C, num_layers, num_tokens, H * D]

Tokens are addressed by ``slot_mapping`` (``slot = block_id * block_size + offset``);
``slot_mapping_from_blocks`` builds it from a request's block ids. ``head_range`` (global
head ids, default: every head this rank holds) selects the heads to move, which is how a
decode rank takes its share from a prefill rank with another tensor-parallel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .pages import block_ids_of, gather_blocks, scatter_blocks
from .views import kv_views


def slot_mapping_from_blocks(
    block_ids: Sequence[int] | torch.Tensor,
    block_size: int,
    num_tokens: int | None = None,
    device: Any = None,
) -> torch.Tensor:
    """int64 ``[num_tokens]`` slots of a request whose tokens fill ``block_ids`` in order."""
    ids = torch.as_tensor(block_ids, dtype=torch.int64, device=device).reshape(-1)
    capacity = ids.numel() * block_size
    num_tokens = capacity if num_tokens is None else num_tokens
    if not 0 <= num_tokens <= capacity:
        raise ValueError(f"{num_tokens} tokens do not fit {ids.numel()} blocks of {block_size}")
    t = torch.arange(num_tokens, dtype=torch.int64, device=ids.device)
    return ids[t // block_size] * block_size + t % block_size


def local_heads(layout: Any, head_range: tuple[int, int] | None) -> tuple[int, int]:
    """Global ``head_range`` -> local head indices in this rank's cache."""
    start = getattr(layout, "head_start", 0)
    if head_range is None:
        return 0, layout.num_kv_heads
    lo, hi = head_range[0] - start, head_range[1] - start
    if not 0 <= lo < hi <= layout.num_kv_heads:
        raise ValueError(
            f"heads {tuple(head_range)} are not all held by this rank "
            f"(it holds [{start}, {start + layout.num_kv_heads}))"
        )
    return lo, hi


def _slots(slot_mapping: Any, device: torch.device) -> torch.Tensor:
    if isinstance(slot_mapping, _Slots):
        return slot_mapping.slots
    slots = torch.as_tensor(slot_mapping, device=device).reshape(-1).long()
    if slots.numel() and int(slots.min()) < 0:
        raise ValueError("slot_mapping entries must be >= 0")
    return slots


class _Slots(NamedTuple):
    """Slots checked once per request, shared by its layers."""

    slots: torch.Tensor
    blocks: torch.Tensor | None  # set when the slots fill whole blocks in order


def _prepare(slot_mapping: Any, device: torch.device, block_size: int) -> _Slots:
    if isinstance(slot_mapping, _Slots):
        return slot_mapping
    slots = _slots(slot_mapping, device)
    return _Slots(slots, block_ids_of(slots, block_size))


def gather_layer(
    layout: Any,
    layer_cache: Any,
    slot_mapping: Any,
    head_range: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged blocks of one layer -> ``[C, num_tokens, H_sel * D]`` (written into ``out`` if given)."""
    views = kv_views(layout, layer_cache)
    lo, hi = local_heads(layout, head_range)
    slots, blocks = _prepare(slot_mapping, views[0].device, layout.block_size)
    n = layout.block_size
    if out is None:
        out = torch.empty(
            len(views),
            slots.numel(),
            (hi - lo) * layout.head_dim,
            dtype=views[0].dtype,
            device=views[0].device,
        )
    if blocks is not None:  # whole blocks at a time
        for c, view in enumerate(views):
            gather_blocks(
                view[:, :, lo:hi], blocks, out[c].unflatten(-1, (hi - lo, layout.head_dim))
            )
        return out
    b, off = slots // n, slots % n
    for c, view in enumerate(views):
        out[c].copy_(view[b, off, lo:hi].flatten(1))  # [T, H_sel, D] -> [T, H_sel * D]
    return out


def scatter_layer(
    layout: Any,
    layer_cache: Any,
    chunk: torch.Tensor,
    slot_mapping: Any,
    head_range: tuple[int, int] | None = None,
) -> None:
    """``[C, num_tokens, H_sel * D]`` -> paged blocks of one layer (in place)."""
    views = kv_views(layout, layer_cache)
    lo, hi = local_heads(layout, head_range)
    slots, blocks = _prepare(slot_mapping, views[0].device, layout.block_size)
    expected = (len(views), slots.numel(), (hi - lo) * layout.head_dim)
    if tuple(chunk.shape) != expected:
        raise ValueError(f"chunk must be {list(expected)} for this layer, got {list(chunk.shape)}")
    if chunk.dtype != views[0].dtype:
        raise ValueError(f"chunk dtype {chunk.dtype} differs from the cache's {views[0].dtype}")
    n = layout.block_size
    if blocks is not None:  # whole blocks at a time
        for c, view in enumerate(views):
            scatter_blocks(
                view[:, :, lo:hi], blocks, chunk[c].unflatten(-1, (hi - lo, layout.head_dim))
            )
        return
    b, off = slots // n, slots % n
    for c, view in enumerate(views):
        view[b, off, lo:hi] = chunk[c].unflatten(-1, (hi - lo, layout.head_dim))


def gather(
    layout: Any,
    caches: Sequence[Any],
    slot_mapping: Any,
    head_range: tuple[int, int] | None = None,
    layers: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every (or the listed) layer -> ``[C, num_layers, num_tokens, H_sel * D]``."""
    layers = range(len(caches)) if layers is None else layers
    lo, hi = local_heads(layout, head_range)
    first = kv_views(layout, caches[layers[0]])[0]
    prepared = _prepare(slot_mapping, first.device, layout.block_size)
    shape = (
        layout.num_components,
        len(layers),
        prepared.slots.numel(),
        (hi - lo) * layout.head_dim,
    )
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != shape or out.dtype != first.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {first.dtype} tensor of shape {list(shape)}")
    for i, layer in enumerate(layers):
        gather_layer(layout, caches[layer], prepared, head_range, out=out[:, i])
    return out


def scatter(
    layout: Any,
    caches: Sequence[Any],
    chunk: torch.Tensor,
    slot_mapping: Any,
    head_range: tuple[int, int] | None = None,
    layers: Sequence[int] | None = None,
) -> None:
    """``[C, num_layers, num_tokens, H_sel * D]`` -> every (or the listed) layer's blocks."""
    layers = range(len(caches)) if layers is None else layers
    if chunk.dim() != 4 or chunk.shape[1] != len(layers):
        raise ValueError(
            f"chunk must be [C, {len(layers)}, num_tokens, hidden], got {list(chunk.shape)}"
        )
    prepared = _prepare(slot_mapping, chunk.device, layout.block_size)
    for i, layer in enumerate(layers):
        scatter_layer(layout, caches[layer], chunk[:, i], prepared, head_range)


def reshard(
    parts: Sequence[tuple[torch.Tensor, tuple[int, int]]],
    head_range: tuple[int, int],
    head_dim: int,
) -> torch.Tensor:
    """Assemble the chunk for global heads ``head_range`` from chunks of other head ranges.

    ``parts`` are ``(chunk, (head_start, head_end))`` with chunks ``[..., T, H_part * D]``
    (for example, one per prefill rank); every head in ``head_range`` must be in some part.
    """
    lo, hi = head_range
    first = parts[0][0]
    out = torch.empty(
        *first.shape[:-1], (hi - lo) * head_dim, dtype=first.dtype, device=first.device
    )
    covered = torch.zeros(hi - lo, dtype=torch.bool)
    for chunk, (p_lo, p_hi) in parts:
        if chunk.shape[-1] != (p_hi - p_lo) * head_dim:
            raise ValueError(
                f"a part for heads [{p_lo}, {p_hi}) must be {(p_hi - p_lo) * head_dim} wide"
            )
        a, b = max(lo, p_lo), min(hi, p_hi)
        if a >= b:
            continue
        out[..., (a - lo) * head_dim : (b - lo) * head_dim] = chunk[
            ..., (a - p_lo) * head_dim : (b - p_lo) * head_dim
        ]
        covered[a - lo : b - lo] = True
    if not bool(covered.all()):
        missing = [lo + i for i in torch.nonzero(~covered).flatten().tolist()]
        raise ValueError(f"heads {missing} of [{lo}, {hi}) are in none of the parts")
    return out
