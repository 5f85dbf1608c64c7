"""vLLM's KV cache as pdx sees it: one ``PagedKVLayout`` plus where each layer's buffer lives.

vLLM (0.32, CPU and GPU) allocates the KV cache of all layers in one backing buffer and
hands the connector one view per layer (CPU: ``[num_blocks, num_kv_heads, block_size,
2*head_dim]``). pdx registers each distinct backing buffer once; layer ``l`` is the
layout's buffer at ``layer_buffers[l] = (backing buffer index, byte offset of block 0)``,
which is what ``pdx.segments`` plans against. The scheduler process has no tensors, so
``layout_from_config`` derives the same layout from the engine config (store chunk keys);
the worker checks both agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdx.errors import ConfigError, LayoutError
from pdx.layout import PagedKVLayout, dtype_name, from_vllm_tensor, vllm_cpu, vllm_flash
from pdx.segments import BufferRef

if TYPE_CHECKING:
    import numpy as np
    import torch
    from vllm.config import VllmConfig

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class KVMemory:
    layout: PagedKVLayout  # every layer's; block_stride says any padding between blocks
    buffers: tuple[tuple[int, int], ...]  # (address, nbytes) of each backing buffer, to register
    layer_names: tuple[str, ...]  # in model order
    layer_buffers: tuple[BufferRef, ...]  # per layer: (index into buffers, byte offset of block 0)
    num_blocks: int

    @property
    def layer_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.layer_names)}


def layer_sort_key(name: str) -> tuple[int, str]:
    match = _LAYER_RE.search(name)
    return (int(match.group(1)) if match else 1 << 30, name)


def cpu_attention_isa(dtype: Any, block_size: int, head_dim: int, cache_dtype: str = "auto") -> str:
    """The ISA vLLM's CPU attention picks for this cache (it decides the page interior)."""
    try:
        import torch
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return "vec"
    torch_dtype = getattr(torch, dtype_name(dtype))
    return str(_get_attn_isa(torch_dtype, block_size, head_dim, cache_dtype))


def describe_kv_caches(kv_caches: dict[str, torch.Tensor] | dict[str, Any], isa: str = "") -> KVMemory:
    """Raises ``LayoutError`` unless every layer has one tensor of the same paged layout."""
    names = sorted(kv_caches, key=layer_sort_key)
    if not names:
        raise LayoutError("no KV cache layers to register")
    buffers: list[tuple[int, int]] = []
    refs: list[BufferRef] = []
    layout = None
    for name in names:
        t = kv_caches[name]
        if isinstance(t, (list, tuple)):
            raise LayoutError(f"layer {name}: separate K/V tensors are not supported; one tensor per layer")
        is_cpu = t.device.type == "cpu"
        shape = t.shape
        this = from_vllm_tensor(t, len(names), is_cpu=is_cpu,
                                isa=(isa or cpu_attention_isa(t.dtype, int(shape[2]), int(shape[3]) // 2))
                                if is_cpu else "vec")  # fmt: skip
        if layout is None:
            layout = this
        elif this != layout:
            raise LayoutError(f"layer {name} is {this.summary()}, other layers {layout.summary()}")
        storage = t.untyped_storage()
        base, size = storage.data_ptr(), storage.nbytes()
        if (base, size) not in buffers:
            buffers.append((base, size))
        refs.append((buffers.index((base, size)), t.data_ptr() - base))
    assert layout is not None
    return KVMemory(layout, tuple(buffers), tuple(names), tuple(refs), int(kv_caches[names[0]].shape[0]))


def host_layer_views(kv_caches: dict[str, torch.Tensor], memory: KVMemory) -> list[np.ndarray]:
    """Per layer, a 1-D uint8 numpy view of its buffer (block 0 onwards); host memory only."""
    import torch

    views = []
    for name in memory.layer_names:
        t = kv_caches[name]
        if t.device.type != "cpu":
            raise ConfigError("the store connector needs the KV cache in host memory (vLLM CPU)")
        whole = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        start = t.data_ptr() - t.untyped_storage().data_ptr()
        views.append(whole[start:start + memory.layout.buffer_nbytes(memory.num_blocks)].numpy())
    return views


def layout_from_config(vllm_config: VllmConfig) -> PagedKVLayout:
    """The layout ``describe_kv_caches`` will find, from the engine config (scheduler side)."""
    mc, cc, par = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    dtype = mc.dtype if cc.cache_dtype in (None, "auto") else _cache_dtype(cc.cache_dtype)
    args = (mc.get_num_layers(par), mc.get_total_num_kv_heads(), mc.get_head_size(), cc.block_size, dtype)
    tp = {"tp_size": par.tensor_parallel_size, "tp_rank": par.rank % par.tensor_parallel_size}
    if vllm_config.device_config.device_type == "cpu":
        isa = cpu_attention_isa(dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype or "auto")
        return vllm_cpu(*args, isa=isa, **tp)
    # Resolved by the engine core before the scheduler's connector is built; the worker
    # checks its tensors agree, so a wrong guess fails at start-up, never in the keys.
    order = getattr(cc, "kv_cache_layout", None) or "LBNHC"
    return vllm_flash(*args, order=order, **tp)


def _cache_dtype(cache_dtype: str) -> str:
    return {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}.get(
        cache_dtype, cache_dtype
    )
