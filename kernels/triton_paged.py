"""Triton gather/scatter for every paged layout, tested against ``kernels.reference``.

Every layout is a strided ``[num_blocks, block_size, H, D]`` view per component
(``kernels.views``), so one kernel pair serves them all: a program copies one token's
selected heads (``[BLOCK_H, BLOCK_D]`` tile) between the view and a chunk row. Elements
are moved as same-width integers, so copies are bit-exact for any dtype.

The launchers check device, dtype, shapes and strides before launch. With
``TRITON_INTERPRET=1`` Triton runs the kernels on CPU tensors (how the tests check them
on machines without a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from .reference import _slots, local_heads
from .views import kv_views

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _paged_copy_kernel(
    paged_ptr,  # strided [B, N, H, D] view of one component
    chunk_ptr,  # [T, H_sel * D] rows
    slot_ptr,  # [T] int64 slots
    block_size,
    stride_b,
    stride_n,
    stride_h,
    stride_d,
    chunk_stride_t,
    head_lo,
    num_heads,  # H_sel
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TO_CHUNK: tl.constexpr,  # True: gather (paged -> chunk); False: scatter
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < HEAD_DIM)
    paged = (
        paged_ptr + block * stride_b + offset * stride_n + (head_lo + h) * stride_h + d * stride_d
    )
    row = chunk_ptr + t.to(tl.int64) * chunk_stride_t + h * HEAD_DIM + d
    if TO_CHUNK:
        tl.store(row, tl.load(paged, mask=mask), mask=mask)
    else:
        tl.store(paged, tl.load(row, mask=mask), mask=mask)


def _check_device(*tensors: torch.Tensor) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {device}")
        if not (t.is_cuda or interpret):
            raise ValueError("the Triton kernels need CUDA tensors; use kernels.reference on CPU")


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()])


def _launch(
    view: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    layout: Any,
    lo: int,
    hi: int,
    to_chunk: bool,
) -> None:
    # view: [B, N, H, D] strided; rows: [T, H_sel * D] with unit stride inside a row.
    if view.dtype != rows.dtype:
        raise ValueError(f"chunk dtype {rows.dtype} differs from the cache's {view.dtype}")
    if rows.dim() != 2 or rows.stride(1) != 1 or rows.shape[1] != (hi - lo) * layout.head_dim:
        raise ValueError(
            f"chunk rows must be [T, {(hi - lo) * layout.head_dim}] with unit inner stride"
        )
    if rows.shape[0] != slots.numel() or not slots.is_contiguous():
        raise ValueError("slot_mapping must be contiguous with one slot per chunk row")
    if min(view.stride()) < 0:
        raise ValueError(f"negative cache strides {view.stride()} are not supported")
    if slots.numel() == 0:
        return
    _check_device(view, rows, slots)
    sb, sn, sh, sd = view.stride()
    _paged_copy_kernel[(slots.numel(),)](
        _as_int(view), _as_int(rows), slots, layout.block_size,
        sb, sn, sh, sd, rows.stride(0), lo, hi - lo,
        HEAD_DIM=layout.head_dim,
        BLOCK_H=triton.next_power_of_2(hi - lo),
        BLOCK_D=triton.next_power_of_2(layout.head_dim),
        TO_CHUNK=to_chunk,
    )  # fmt: skip


def gather_layer(
    layout: Any,
    layer_cache: Any,
    slot_mapping: Any,
    head_range: Any = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    views = kv_views(layout, layer_cache)
    lo, hi = local_heads(layout, head_range)
    slots = _slots(slot_mapping, views[0].device).contiguous()
    if out is None:
        out = torch.empty(
            len(views),
            slots.numel(),
            (hi - lo) * layout.head_dim,
            dtype=views[0].dtype,
            device=views[0].device,
        )
    for c, view in enumerate(views):
        _launch(view, out[c], slots, layout, lo, hi, to_chunk=True)
    return out


def scatter_layer(
    layout: Any, layer_cache: Any, chunk: torch.Tensor, slot_mapping: Any, head_range: Any = None
) -> None:
    views = kv_views(layout, layer_cache)
    lo, hi = local_heads(layout, head_range)
    slots = _slots(slot_mapping, views[0].device).contiguous()
    expected = (len(views), slots.numel(), (hi - lo) * layout.head_dim)
    if tuple(chunk.shape) != expected:
        raise ValueError(f"chunk must be {list(expected)} for this layer, got {list(chunk.shape)}")
    for c, view in enumerate(views):
        _launch(view, chunk[c], slots, layout, lo, hi, to_chunk=False)


def gather(
    layout: Any,
    caches: Sequence[Any],
    slot_mapping: Any,
    head_range: Any = None,
    layers: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    layers = range(len(caches)) if layers is None else layers
    lo, hi = local_heads(layout, head_range)
    first = kv_views(layout, caches[layers[0]])[0]
    slots = _slots(slot_mapping, first.device).contiguous()
    shape = (layout.num_components, len(layers), slots.numel(), (hi - lo) * layout.head_dim)
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != shape or out.dtype != first.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {first.dtype} tensor of shape {list(shape)}")
    for i, layer in enumerate(layers):
        gather_layer(layout, caches[layer], slots, head_range, out=out[:, i])
    return out


def scatter(
    layout: Any,
    caches: Sequence[Any],
    chunk: torch.Tensor,
    slot_mapping: Any,
    head_range: Any = None,
    layers: Sequence[int] | None = None,
) -> None:
    layers = range(len(caches)) if layers is None else layers
    if chunk.dim() != 4 or chunk.shape[1] != len(layers):
        raise ValueError(
            f"chunk must be [C, {len(layers)}, num_tokens, hidden], got {list(chunk.shape)}"
        )
    for i, layer in enumerate(layers):
        scatter_layer(layout, caches[layer], chunk[:, i], slot_mapping, head_range)
