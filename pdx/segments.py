"""Turn "these blocks of this request, this layer" into memory segments on both sides of a copy.

Offsets here are relative to one layer's KV buffer (the per-layer tensor an engine
registers; SGLang MHA has two per layer, buffer 0 = K pool, 1 = V pool). Every layer
of a layout has the same relative plan, so plan once per request and map it onto
each layer's registered regions::

    plan = plan_copy(p_layout, p_block_ids, d_layout, d_block_ids)      # raises LayoutError up front
    for layer in range(p_layout.num_layers):
        pairs = plan.segment_pairs(src_buffers=[(p_region_id, p_layer_offset[layer])],
                                   dst_buffers=[(d_region_id, d_layer_offset[layer])])
        await transport.post_write(peer, pairs, notif)

Between host arrays (the store connector's chunks), ``copy_host(plan, src_buffers,
dst_buffers)`` runs a plan for one layer without a transport.

A direct copy needs the same layout kind, dtype, head_dim and model head count on both
sides; it may change the head range (tensor-parallel resharding: only the overlapping
heads are copied) and, where the block interior is token-addressable and not vllm_cpu,
the block size. Anything else raises ``LayoutError``: convert with ``kernels.gather`` /
``kernels.scatter`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdx.errors import LayoutError
from pdx.layout import LayoutKind, PagedKVLayout
from pdx.transports.segments import (
    LOCAL_OFFSET,
    LOCAL_REGION,
    NBYTES,
    REMOTE_OFFSET,
    REMOTE_REGION,
    SegmentPairs,
)

BufferRef = tuple[int, int]  # (region_id, byte offset of the layer's buffer inside that region)


def _as_block_ids(block_ids: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if len(ids) and ids.min() < 0:
        raise LayoutError(f"{what} block ids must be >= 0, got {int(ids.min())}")
    return ids


def _merge(table: np.ndarray) -> np.ndarray:
    """Merge adjacent rows whose runs continue on both sides (columns as in SegmentPairs)."""
    if len(table) < 2:
        return table
    return SegmentPairs(table).merged().table


def layer_block_segments(
    layout: PagedKVLayout, layer: int, block_ids: Sequence[int] | np.ndarray, buffer: int = 0
) -> np.ndarray:
    """int64 ``[n, 2]`` (offset, nbytes) runs holding ``block_ids`` of one layer, adjacent ones merged.

    Offsets are relative to that layer's buffer (``buffer`` 1 is SGLang's V pool).
    """
    if not 0 <= layer < layout.num_layers:
        raise LayoutError(f"layer {layer} is outside the layout's {layout.num_layers} layers")
    if not 0 <= buffer < layout.num_buffers:
        raise LayoutError(
            f"buffer {buffer} is outside the layout's {layout.num_buffers} per-layer buffers"
        )
    ids = _as_block_ids(block_ids, "layer")
    t = np.zeros((len(ids), 5), dtype=np.int64)
    t[:, LOCAL_OFFSET] = ids * layout.block_stride_nbytes
    t[:, REMOTE_OFFSET] = t[:, LOCAL_OFFSET]
    t[:, NBYTES] = layout.page_nbytes
    t = _merge(t)
    return np.ascontiguousarray(t[:, [LOCAL_OFFSET, NBYTES]])


@dataclass(frozen=True)
class CopyPlan:
    """Matching (src run, dst run) pairs for one layer, relative to the layers' buffers.

    ``table`` is int64 ``[n, 5]``: (src_buffer, src_offset, dst_buffer, dst_offset, nbytes),
    the same columns as ``transports.base.SegmentPairs`` with buffer indices in place of
    region ids.
    """

    table: np.ndarray
    num_tokens: int  # tokens covered (whole blocks are copied when the block sizes match)
    head_range: tuple[int, int]  # global KV heads the plan copies

    @property
    def nbytes(self) -> int:
        return int(self.table[:, NBYTES].sum())

    def __len__(self) -> int:
        return len(self.table)

    def segment_pairs(
        self,
        src_buffers: Sequence[BufferRef],
        dst_buffers: Sequence[BufferRef],
        for_read: bool = False,
    ) -> SegmentPairs:
        """The plan for one layer as a transport table.

        For ``post_write`` (run where src lives) local = src, remote = dst; with
        ``for_read`` (``post_read``, run where dst lives) local = dst, remote = src.
        """
        src = np.asarray(src_buffers, dtype=np.int64).reshape(-1, 2)
        dst = np.asarray(dst_buffers, dtype=np.int64).reshape(-1, 2)
        t = self.table.copy()
        for col_r, col_o, refs, side in (
            (LOCAL_REGION, LOCAL_OFFSET, src, "src"),
            (REMOTE_REGION, REMOTE_OFFSET, dst, "dst"),
        ):
            if len(t) and int(t[:, col_r].max()) >= len(refs):
                raise LayoutError(
                    f"the plan uses {int(t[:, col_r].max()) + 1} {side} buffers per layer, got {len(refs)}"
                )
            buf = t[:, col_r]
            t[:, col_o] += refs[buf, 1]
            t[:, col_r] = refs[buf, 0]
        if for_read:
            t = t[:, [REMOTE_REGION, REMOTE_OFFSET, LOCAL_REGION, LOCAL_OFFSET, NBYTES]]
        return SegmentPairs(t)

    def segment_pairs_layers(
        self, src_buffers: Sequence[Sequence[BufferRef]], dst_buffers: Sequence[Sequence[BufferRef]]
    ) -> SegmentPairs:
        """Every layer at once: ``src_buffers[layer]`` lists that layer's buffers."""
        if len(src_buffers) != len(dst_buffers):
            raise LayoutError(f"{len(src_buffers)} src layers but {len(dst_buffers)} dst layers")
        tables = [
            self.segment_pairs(s, d).table for s, d in zip(src_buffers, dst_buffers, strict=True)
        ]
        return SegmentPairs(np.concatenate(tables) if tables else np.zeros((0, 5), np.int64))


def check_compatible(src: PagedKVLayout, dst: PagedKVLayout) -> tuple[int, int]:
    """Raise ``LayoutError`` unless blocks of ``src`` can be copied byte-wise into ``dst``.

    Returns the global head range both hold.
    """
    mismatches = [
        f"{name} {getattr(src, name)!r} != {getattr(dst, name)!r}"
        for name in ("kind", "dtype", "num_layers", "head_dim", "total_kv_heads", "cpu_isa")
        if getattr(src, name) != getattr(dst, name)
    ]
    if mismatches:
        raise LayoutError(
            "KV layouts cannot be copied directly (" + "; ".join(mismatches) + "); "
            "convert through a contiguous chunk with kernels.gather and kernels.scatter"
        )
    lo, hi = max(src.head_start, dst.head_start), min(src.head_end, dst.head_end)
    if lo >= hi:
        raise LayoutError(
            f"source heads {src.head_range} and destination heads {dst.head_range} do not overlap; "
            "pick the prefill rank that holds the decode rank's heads"
        )
    if src.block_size != dst.block_size:
        if src.kind is LayoutKind.VLLM_CPU:
            raise LayoutError(
                f"vllm_cpu block sizes differ ({src.block_size} vs {dst.block_size}): a CPU page stores K "
                "transposed per block, so it cannot be re-blocked by a byte copy; use the same block size "
                "or convert with kernels.gather and kernels.scatter"
            )
    return lo, hi


def _token_atoms(layout: PagedKVLayout) -> tuple[int, int, int]:
    """(token stride, head stride, run bytes) of the contiguous run one (token, head) owns."""
    ds, d, n, h = layout.dtype_size, layout.head_dim, layout.block_size, layout.num_kv_heads
    if layout.kind is LayoutKind.VLLM_HND:
        return 2 * d * ds, n * 2 * d * ds, 2 * d * ds
    if layout.kind is LayoutKind.VLLM_NHD:
        return h * 2 * d * ds, 2 * d * ds, 2 * d * ds
    if layout.kind in (LayoutKind.SGLANG_MHA, LayoutKind.SGLANG_MLA):
        return h * d * ds, d * ds, d * ds
    raise LayoutError(f"{layout.kind.value} blocks are not token-addressable")


def plan_copy(
    src_layout: PagedKVLayout,
    src_block_ids: Sequence[int] | np.ndarray,
    dst_layout: PagedKVLayout,
    dst_block_ids: Sequence[int] | np.ndarray,
    num_tokens: int | None = None,
) -> CopyPlan:
    """Plan a byte copy of a request's KV from ``src_block_ids`` into ``dst_block_ids`` (one layer).

    ``num_tokens`` defaults to the blocks' capacity, which must then be equal on both sides.
    Copies the heads both layouts hold. Raises ``LayoutError`` before anything moves when
    the layouts are incompatible or the blocks cannot hold the tokens.
    """
    lo, hi = check_compatible(src_layout, dst_layout)
    src_ids = _as_block_ids(src_block_ids, "source")
    dst_ids = _as_block_ids(dst_block_ids, "destination")
    cap_s, cap_d = len(src_ids) * src_layout.block_size, len(dst_ids) * dst_layout.block_size
    if num_tokens is None:
        if cap_s != cap_d:
            raise LayoutError(
                f"{len(src_ids)} source blocks hold {cap_s} tokens but {len(dst_ids)} destination blocks "
                f"hold {cap_d}; pass num_tokens"
            )
        num_tokens = cap_s
    if not 0 <= num_tokens <= min(cap_s, cap_d):
        raise LayoutError(
            f"num_tokens {num_tokens} does not fit {cap_s} source / {cap_d} destination token slots"
        )
    same_blocks = src_layout.block_size == dst_layout.block_size
    same_heads = src_layout.head_range == dst_layout.head_range
    if same_blocks and (same_heads or src_layout.is_head_major):
        table = _plan_pages(src_layout, src_ids, dst_layout, dst_ids, num_tokens, lo, hi)
    else:
        table = _plan_tokens(src_layout, src_ids, dst_layout, dst_ids, num_tokens, lo, hi)
    return CopyPlan(_merge(table), num_tokens, (lo, hi))


def _plan_pages(
    src: PagedKVLayout,
    src_ids: np.ndarray,
    dst: PagedKVLayout,
    dst_ids: np.ndarray,
    num_tokens: int,
    lo: int,
    hi: int,
) -> np.ndarray:
    # Whole blocks, or one head-slice run per block for head-major pages.
    num_blocks = -(-num_tokens // src.block_size)
    per_head = src.page_nbytes // src.num_kv_heads
    s_off = src_ids[:num_blocks] * src.block_stride_nbytes + (lo - src.head_start) * per_head
    d_off = dst_ids[:num_blocks] * dst.block_stride_nbytes + (lo - dst.head_start) * per_head
    return _rows(src.num_buffers, s_off, d_off, (hi - lo) * per_head, src, dst)


def _plan_tokens(
    src: PagedKVLayout,
    src_ids: np.ndarray,
    dst: PagedKVLayout,
    dst_ids: np.ndarray,
    num_tokens: int,
    lo: int,
    hi: int,
) -> np.ndarray:
    s_tok, s_head, run = _token_atoms(src)
    d_tok, d_head, _ = _token_atoms(dst)
    if s_head == run and d_head == run:  # token-major: a token's head slice is one run
        t = np.arange(num_tokens, dtype=np.int64)
        h = np.full(num_tokens, lo, dtype=np.int64)
        nbytes = (hi - lo) * run
    else:  # head-major: atoms in source memory order (block, head, token) so runs merge
        n = src.block_size
        grid = (-(-num_tokens // n), hi - lo, n)
        t = np.broadcast_to(
            np.arange(grid[0] * n, dtype=np.int64).reshape(grid[0], 1, n), grid
        ).reshape(-1)
        h = np.broadcast_to(np.arange(lo, hi, dtype=np.int64).reshape(1, -1, 1), grid).reshape(-1)
        keep = t < num_tokens
        t, h = t[keep], h[keep]
        nbytes = run
    s_off = src_ids[t // src.block_size] * src.block_stride_nbytes + (t % src.block_size) * s_tok
    s_off += (h - src.head_start) * s_head
    d_off = dst_ids[t // dst.block_size] * dst.block_stride_nbytes + (t % dst.block_size) * d_tok
    d_off += (h - dst.head_start) * d_head
    return _rows(src.num_buffers, s_off, d_off, nbytes, src, dst)


def _rows(
    num_buffers: int,
    s_off: np.ndarray,
    d_off: np.ndarray,
    nbytes: int,
    src: PagedKVLayout,
    dst: PagedKVLayout,
) -> np.ndarray:
    n = len(s_off)
    out = np.empty((n * num_buffers, 5), dtype=np.int64)
    for b in range(num_buffers):
        rows = out[b * n : (b + 1) * n]
        rows[:, LOCAL_REGION] = b
        rows[:, LOCAL_OFFSET] = s_off
        rows[:, REMOTE_REGION] = b
        rows[:, REMOTE_OFFSET] = d_off
        rows[:, NBYTES] = nbytes
    return out


def pair_segments(
    src_layout: PagedKVLayout,
    src_block_ids: Sequence[int] | np.ndarray,
    dst_layout: PagedKVLayout,
    dst_block_ids: Sequence[int] | np.ndarray,
    *,
    src_buffers: Sequence[BufferRef],
    dst_buffers: Sequence[BufferRef],
    num_tokens: int | None = None,
) -> SegmentPairs:
    """One layer's copy as a transport table; ``*_buffers`` are that layer's (region_id, offset)."""
    plan = plan_copy(src_layout, src_block_ids, dst_layout, dst_block_ids, num_tokens)
    return plan.segment_pairs(src_buffers, dst_buffers)


def copy_host(plan: CopyPlan, src_buffers: Sequence[np.ndarray], dst_buffers: Sequence[np.ndarray]) -> None:
    """Run ``plan`` for one layer between host memory: ``*_buffers[b]`` is that layer's buffer ``b``
    as a 1-D uint8 array. One vectorized copy per buffer pair, no loop over blocks.
    """
    t = plan.table
    for sb, db in {(int(r[0]), int(r[1])) for r in t[:, [LOCAL_REGION, REMOTE_REGION]]}:
        rows = t[(t[:, LOCAL_REGION] == sb) & (t[:, REMOTE_REGION] == db)]
        _copy_runs(src_buffers[sb], rows[:, LOCAL_OFFSET], dst_buffers[db], rows[:, REMOTE_OFFSET], rows[:, NBYTES])


def _copy_runs(src: np.ndarray, s_off: np.ndarray, dst: np.ndarray, d_off: np.ndarray, nbytes: np.ndarray) -> None:
    # Split every run into units of the largest size dividing all offsets and lengths, then
    # copy the units with one fancy-indexing operation over [-1, unit] views of both buffers.
    unit = int(np.gcd.reduce(np.concatenate([s_off, d_off, nbytes])))
    counts = nbytes // unit
    total = int(counts.sum())
    first = np.repeat(np.cumsum(counts) - counts, counts)
    s_units = np.repeat(s_off // unit, counts) + np.arange(total) - first
    d_units = np.repeat(d_off // unit, counts) + np.arange(total) - first
    src2 = src[: len(src) // unit * unit].reshape(-1, unit)
    dst2 = dst[: len(dst) // unit * unit].reshape(-1, unit)
    if s_units.max() >= len(src2) or d_units.max() >= len(dst2):
        raise LayoutError(
            f"the copy reaches byte {max(int((s_units.max() + 1) * unit), int((d_units.max() + 1) * unit))} "
            f"of a {len(src)}-byte source / {len(dst)}-byte destination buffer"
        )
    d0, s0 = int(d_units[0]), int(s_units[0])
    if np.array_equal(d_units, np.arange(d0, d0 + total)):  # gather into one contiguous run
        np.take(src2, s_units, axis=0, out=dst2[d0 : d0 + total], mode="clip")
    elif np.array_equal(s_units, np.arange(s0, s0 + total)):  # scatter from one contiguous run
        dst2[d_units] = src2[s0 : s0 + total]
    else:
        dst2[d_units] = src2[s_units]
