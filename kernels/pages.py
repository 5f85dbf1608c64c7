"""Whole-block moves: the fast CPU path when a request's tokens fill its blocks in order.

Gathering token by token through strided views is an element-wise index with two
index tensors (slow on CPU). When ``slot_mapping`` is ``block_ids[t // N] * N + t % N``
(the normal case), ``index_select`` / ``index_copy_`` along the block dimension of the
same strided views move whole blocks at once (several times faster). Imports torch;
only kernel modules import it.
"""

from __future__ import annotations

import torch


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


def gather_blocks(view: torch.Tensor, blocks: torch.Tensor, tokens: torch.Tensor) -> None:
    """``tokens[T, h, D]`` <- the first T tokens of ``view[blocks]`` (``view``: ``[B, N, h, D]``, strided)."""
    n, num_tokens = view.shape[1], tokens.shape[0]
    full, rem = divmod(num_tokens, n)
    if full:
        torch.index_select(
            view, 0, blocks[:full], out=tokens[: full * n].view(full, n, *tokens.shape[1:])
        )
    if rem:
        tokens[full * n :].copy_(view[int(blocks[full]), :rem])


def scatter_blocks(view: torch.Tensor, blocks: torch.Tensor, tokens: torch.Tensor) -> None:
    """The first T tokens of ``view[blocks]`` <- ``tokens[T, h, D]``, in place."""
    n, num_tokens = view.shape[1], tokens.shape[0]
    full, rem = divmod(num_tokens, n)
    if full:
        view.index_copy_(0, blocks[:full], tokens[: full * n].unflatten(0, (full, n)))
    if rem:
        view[int(blocks[full]), :rem].copy_(tokens[full * n :])
