"""Where each layer's KV blocks live in memory, for registration and segment planning.

vLLM (0.32, CPU and GPU) allocates the KV cache of all layers in one backing
buffer and hands the connector one view per layer whose first dimension is the
block: ``[num_blocks, ...]`` with every block one contiguous byte run
(CPU: ``[num_blocks, num_kv_heads, block_size, 2*head_dim]``). pdx registers each
distinct backing buffer once and addresses a block of a layer as
``offset + block_id * block_stride`` within it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdx.errors import LayoutError

if TYPE_CHECKING:
    import torch

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LayerKV:
    name: str
    buffer_index: int  # index into KVRegions.buffers
    offset: int  # bytes from the buffer's start to the layer's block 0
    block_stride: int  # bytes
    num_blocks: int


@dataclass(frozen=True)
class KVRegions:
    buffers: tuple[tuple[int, int], ...]  # (address, nbytes) of each backing buffer
    layers: tuple[LayerKV, ...]  # in model order
    block_nbytes: int  # one block of one layer

    @property
    def layer_index(self) -> dict[str, int]:
        return {layer.name: i for i, layer in enumerate(self.layers)}


def layer_sort_key(name: str) -> tuple[int, str]:
    match = _LAYER_RE.search(name)
    return (int(match.group(1)) if match else 1 << 30, name)


def describe_kv_caches(kv_caches: dict[str, torch.Tensor] | dict[str, Any]) -> KVRegions:
    """Raises ``LayoutError`` unless every layer is block-major with contiguous blocks."""
    buffers: list[tuple[int, int]] = []
    layers = []
    block_nbytes = None
    for name in sorted(kv_caches, key=layer_sort_key):
        t = kv_caches[name]
        if isinstance(t, (list, tuple)):
            raise LayoutError(f"layer {name}: separate K/V tensors are not supported; one tensor per layer")
        esize = t.element_size()
        if t.dim() < 2 or not t[0].is_contiguous() or t.stride(0) < t[0].numel():
            raise LayoutError(
                f"layer {name}: KV shape {tuple(t.shape)} strides {t.stride()} is not block-major "
                "with contiguous blocks; pdx needs one contiguous byte run per block"
            )
        nbytes = t[0].numel() * esize
        if block_nbytes is None:
            block_nbytes = nbytes
        elif nbytes != block_nbytes:
            raise LayoutError(f"layer {name}: block of {nbytes} bytes, other layers {block_nbytes}")
        storage = t.untyped_storage()
        base, size = storage.data_ptr(), storage.nbytes()
        if (base, size) not in buffers:
            buffers.append((base, size))
        layers.append(LayerKV(name, buffers.index((base, size)), t.data_ptr() - base,
                              t.stride(0) * esize, t.shape[0]))
    if not layers or block_nbytes is None:
        raise LayoutError("no KV cache layers to register")
    return KVRegions(tuple(buffers), tuple(layers), block_nbytes)
