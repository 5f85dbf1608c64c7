"""Paged-KV gather/scatter kernels: a torch reference (ground truth, CPU path) and Triton (GPU).

Importing this package imports neither torch nor triton. The functions below pick the
Triton kernels for CUDA tensors (when triton is installed) and the torch reference
otherwise; ``backend="reference"`` or ``"triton"`` forces one. Shapes and arguments are
documented in ``pdx.kernels.reference``; the layout is any object shaped like
``pdx.layout.PagedKVLayout``.

    gather_layer(layout, layer_cache, slot_mapping, head_range=None)  -> [C, T, H*D]
    scatter_layer(layout, layer_cache, chunk, slot_mapping, head_range=None)
    gather(layout, caches, slot_mapping, head_range=None, layers=None, out=None) -> [C, L, T, H*D]
    scatter(layout, caches, chunk, slot_mapping, head_range=None, layers=None)
    slot_mapping_from_blocks(block_ids, block_size, num_tokens=None)
    reshard(parts, head_range, head_dim)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

__all__ = [
    "gather",
    "gather_layer",
    "reshard",
    "scatter",
    "scatter_layer",
    "select_backend",
    "slot_mapping_from_blocks",
]


def _is_cuda(layer_cache: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    t = layer_cache[0] if isinstance(layer_cache, (tuple, list)) else layer_cache
    return isinstance(t, torch.Tensor) and t.is_cuda


def select_backend(layer_cache: Any, backend: str | None = None) -> Any:
    """The module that implements gather/scatter for ``layer_cache``'s device."""
    if backend is None:
        backend = (
            "triton"
            if _is_cuda(layer_cache) and importlib.util.find_spec("triton")
            else "reference"
        )
    if backend not in ("reference", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; use 'reference' or 'triton'")
    return importlib.import_module(
        f".{'triton_paged' if backend == 'triton' else 'reference'}", __name__
    )


def gather_layer(
    layout: Any,
    layer_cache: Any,
    slot_mapping: Any,
    head_range: Any = None,
    backend: str | None = None,
) -> Any:
    return select_backend(layer_cache, backend).gather_layer(
        layout, layer_cache, slot_mapping, head_range
    )


def scatter_layer(
    layout: Any,
    layer_cache: Any,
    chunk: Any,
    slot_mapping: Any,
    head_range: Any = None,
    backend: str | None = None,
) -> None:
    select_backend(layer_cache, backend).scatter_layer(
        layout, layer_cache, chunk, slot_mapping, head_range
    )


def gather(
    layout: Any,
    caches: Any,
    slot_mapping: Any,
    head_range: Any = None,
    layers: Any = None,
    backend: str | None = None,
    out: Any = None,
) -> Any:
    return select_backend(caches[0], backend).gather(
        layout, caches, slot_mapping, head_range, layers, out
    )


def scatter(
    layout: Any,
    caches: Any,
    chunk: Any,
    slot_mapping: Any,
    head_range: Any = None,
    layers: Any = None,
    backend: str | None = None,
) -> None:
    select_backend(caches[0], backend).scatter(
        layout, caches, chunk, slot_mapping, head_range, layers
    )


def slot_mapping_from_blocks(
    block_ids: Any, block_size: int, num_tokens: int | None = None, device: Any = None
) -> Any:
    from .reference import slot_mapping_from_blocks as impl

    return impl(block_ids, block_size, num_tokens, device)


def reshard(parts: Any, head_range: tuple[int, int], head_dim: int) -> Any:
    from .reference import reshard as impl

    return impl(parts, head_range, head_dim)
