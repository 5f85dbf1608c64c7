"""``PagedKVLayout``: how one engine rank keeps its paged KV cache in memory.

A layout names the memory order of one layer's KV tensor(s); every layer of an
engine has the same layout. Kinds (``D`` = head_dim, ``N`` = block_size,
``H`` = num_kv_heads held by this rank, ``B`` = num_blocks)::

    vllm_hnd    vLLM GPU, LBHNC / legacy "HND": per layer [B, H, N, 2D], K = C[:D], V = C[D:]
    vllm_nhd    vLLM GPU, LBNHC / legacy "NHD": per layer [B, N, H, 2D] in memory; vLLM hands it
                out as the logical [B, H, N, 2D] view with permuted strides
    vllm_cpu    vLLM CPU backend: per layer [B, H, N, 2D]; inside each (block, head) page K is
                stored transposed [D, N], then V [N, D] (vec/vec16 ISAs, checked against vllm-cpu 0.32)
    sglang_mha  SGLang MHA pools: per layer a K pool and a V pool, each [B*N, H, D] (token-indexed)
    sglang_mla  SGLang MLA pool: per layer [B*N, 1, D] (one latent vector per token, D = lora + rope)

Head ranges: ``head_start`` .. ``head_start + num_kv_heads`` of ``total_kv_heads`` are the
global KV heads this rank holds (tensor parallelism splits heads; MLA is replicated).
Two peers compare ``fingerprint()`` before they move any byte.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pdx.errors import LayoutError

DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

# ISAs whose vllm_cpu page interior is K^T [D, N] then V [N, D] (probed with cpu_attn_reshape_and_cache).
CPU_TOKEN_ADDRESSABLE_ISAS = ("vec", "vec16")


class LayoutKind(str, enum.Enum):
    VLLM_HND = "vllm_hnd"
    VLLM_NHD = "vllm_nhd"
    VLLM_CPU = "vllm_cpu"
    SGLANG_MHA = "sglang_mha"
    SGLANG_MLA = "sglang_mla"


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"torch.bfloat16"`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    aliases = {
        "half": "float16",
        "float": "float32",
        "fp16": "float16",
        "bf16": "bfloat16",
        "fp32": "float32",
    }
    name = aliases.get(name, name)
    if name not in DTYPE_SIZES:
        raise LayoutError(f"unsupported KV dtype {dtype!r}; use one of {sorted(DTYPE_SIZES)}")
    return name


@dataclass(frozen=True)
class PagedKVLayout:
    kind: LayoutKind
    num_layers: int
    num_kv_heads: int  # heads held by this rank
    head_dim: int  # per head; for MLA the latent width (kv_lora_rank + qk_rope_head_dim)
    block_size: int  # tokens per block (SGLang: page_size)
    dtype: str  # "bfloat16", "float16", "float32", ...
    head_start: int = 0  # first global KV head held by this rank
    total_kv_heads: int = 0  # KV heads of the model; 0 means num_kv_heads
    block_stride: int = 0  # bytes between consecutive blocks of one layer; 0 means a dense page
    cpu_isa: str = ""  # vllm_cpu only: "vec", "vec16", "amx", "neon", ...
    extra: tuple[tuple[str, str], ...] = field(default=())  # free-form, part of the fingerprint

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", LayoutKind(self.kind))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if not self.total_kv_heads:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LayoutError(f"layout field {name} must be a positive int, got {value!r}")
        if self.head_start < 0 or self.head_start + self.num_kv_heads > self.total_kv_heads:
            raise LayoutError(
                f"head range [{self.head_start}, {self.head_start + self.num_kv_heads}) is outside "
                f"the model's {self.total_kv_heads} KV heads"
            )
        if self.kind is LayoutKind.SGLANG_MLA and self.num_kv_heads != 1:
            raise LayoutError(
                "an MLA layout holds one latent vector per token: num_kv_heads must be 1"
            )
        if self.block_stride and self.block_stride < self.page_nbytes:
            raise LayoutError(
                f"block_stride {self.block_stride} is smaller than one page ({self.page_nbytes} bytes)"
            )
        if self.kind is not LayoutKind.VLLM_CPU and self.cpu_isa:
            raise LayoutError("cpu_isa applies only to the vllm_cpu layout")

    # -- sizes --------------------------------------------------------------------------
    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def num_components(self) -> int:
        """2 (K and V) or 1 (the MLA latent)."""
        return 1 if self.kind is LayoutKind.SGLANG_MLA else 2

    @property
    def num_buffers(self) -> int:
        """Tensors per layer: 2 for SGLang MHA (K pool, V pool), else 1."""
        return 2 if self.kind is LayoutKind.SGLANG_MHA else 1

    @property
    def components_per_buffer(self) -> int:
        return self.num_components // self.num_buffers

    @property
    def page_nbytes(self) -> int:
        """Bytes of one block of one layer in one buffer (K and V together for vLLM)."""
        return (
            self.block_size
            * self.num_kv_heads
            * self.head_dim
            * self.components_per_buffer
            * self.dtype_size
        )

    @property
    def block_stride_nbytes(self) -> int:
        return self.block_stride or self.page_nbytes

    @property
    def hidden_size(self) -> int:
        """Width of one token of one component in a gathered chunk: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def head_end(self) -> int:
        return self.head_start + self.num_kv_heads

    @property
    def head_range(self) -> tuple[int, int]:
        return (self.head_start, self.head_end)

    @property
    def is_head_major(self) -> bool:
        """Each head's tokens of one block are one contiguous run (so head slices are segments)."""
        return self.kind in (LayoutKind.VLLM_HND, LayoutKind.VLLM_CPU)

    @property
    def is_token_addressable(self) -> bool:
        """Whether the token-level interior of a block is known (needed to change block size)."""
        if self.kind is LayoutKind.VLLM_CPU:
            return self.cpu_isa in CPU_TOKEN_ADDRESSABLE_ISAS
        return True

    def buffer_nbytes(self, num_blocks: int) -> int:
        """Bytes of one per-layer buffer holding ``num_blocks`` blocks."""
        return (num_blocks - 1) * self.block_stride_nbytes + self.page_nbytes

    # -- identity -----------------------------------------------------------------------
    def describe(self, model_id: str = "") -> dict[str, Any]:
        """What two peers must agree on (not local memory details like block_stride)."""
        d = asdict(self)
        d.pop("block_stride")
        d["kind"] = self.kind.value
        d["extra"] = [list(kv) for kv in self.extra]
        d["model_id"] = model_id
        return d

    def summary(self) -> str:
        """One line naming what peers must agree on, for error messages."""
        isa = f" ({self.cpu_isa})" if self.cpu_isa else ""
        return (
            f"{self.kind.value}{isa} {self.dtype}, {self.num_layers} layers, KV heads "
            f"[{self.head_start}, {self.head_end}) of {self.total_kv_heads}, head_dim {self.head_dim}, "
            f"block_size {self.block_size}"
        )

    def fingerprint(self, model_id: str = "") -> str:
        """A short, stable hex digest of model, dtype, layout kind, block size and head range."""
        blob = json.dumps(self.describe(model_id), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_heads(self, head_start: int, num_kv_heads: int) -> PagedKVLayout:
        """The same layout for a rank holding a different head range."""
        from dataclasses import replace

        return replace(self, head_start=head_start, num_kv_heads=num_kv_heads)


def tp_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(head_start, num_kv_heads) a TP rank holds; heads are replicated when tp_size > total."""
    if tp_size <= 0 or not 0 <= tp_rank < tp_size:
        raise LayoutError(f"bad tensor-parallel rank {tp_rank} of {tp_size}")
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise LayoutError(f"{total_kv_heads} KV heads do not split evenly over TP={tp_size}")
        per = total_kv_heads // tp_size
        return tp_rank * per, per
    if tp_size % total_kv_heads:
        raise LayoutError(
            f"TP={tp_size} is not a multiple of the {total_kv_heads} KV heads it replicates"
        )
    return tp_rank // (tp_size // total_kv_heads), 1


def _mha(
    kind: LayoutKind,
    num_layers: int,
    total_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: Any,
    tp_size: int,
    tp_rank: int,
    **kw: Any,
) -> PagedKVLayout:
    head_start, num_kv_heads = tp_head_range(total_kv_heads, tp_size, tp_rank)
    return PagedKVLayout(
        kind, num_layers, num_kv_heads, head_dim, block_size, dtype,
        head_start=head_start, total_kv_heads=total_kv_heads, **kw,
    )  # fmt: skip


def vllm_flash(
    num_layers: int,
    total_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: Any,
    *,
    order: str = "HND",
    tp_size: int = 1,
    tp_rank: int = 0,
    block_stride: int = 0,
) -> PagedKVLayout:
    """vLLM GPU attention (FlashAttention, FlashInfer, Triton): ``order`` HND/LBHNC or NHD/LBNHC."""
    kinds = {"HND": LayoutKind.VLLM_HND, "LBHNC": LayoutKind.VLLM_HND,
             "NHD": LayoutKind.VLLM_NHD, "LBNHC": LayoutKind.VLLM_NHD}  # fmt: skip
    if order.upper() not in kinds:
        raise LayoutError(
            f"unsupported vLLM KV cache layout {order!r}; pdx handles {sorted(kinds)}"
        )
    return _mha(kinds[order.upper()], num_layers, total_kv_heads, head_dim, block_size, dtype,
                tp_size, tp_rank, block_stride=block_stride)  # fmt: skip


def vllm_cpu(
    num_layers: int,
    total_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: Any,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    isa: str = "vec",
    block_stride: int = 0,
) -> PagedKVLayout:
    """vLLM CPU backend (``[num_blocks, num_kv_heads, block_size, 2*head_dim]`` per layer)."""
    return _mha(LayoutKind.VLLM_CPU, num_layers, total_kv_heads, head_dim, block_size, dtype,
                tp_size, tp_rank, cpu_isa=isa, block_stride=block_stride)  # fmt: skip


def sglang_mha(
    num_layers: int,
    total_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: Any,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> PagedKVLayout:
    """SGLang ``MHATokenToKVPool``: separate K and V pools per layer, ``[num_slots, H, D]`` each."""
    return _mha(
        LayoutKind.SGLANG_MHA,
        num_layers,
        total_kv_heads,
        head_dim,
        page_size,
        dtype,
        tp_size,
        tp_rank,
    )


def sglang_mla(
    num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, page_size: int, dtype: Any
) -> PagedKVLayout:
    """SGLang ``MLATokenToKVPool``: ``[num_slots, 1, kv_lora_rank + qk_rope_head_dim]`` per layer."""
    return PagedKVLayout(
        LayoutKind.SGLANG_MLA, num_layers, 1, kv_lora_rank + qk_rope_head_dim, page_size, dtype
    )


def from_vllm_tensor(
    kv_cache: Any,
    num_layers: int,
    *,
    is_cpu: bool,
    total_kv_heads: int = 0,
    tp_size: int = 1,
    tp_rank: int = 0,
    isa: str = "vec",
) -> PagedKVLayout:
    """The layout of one layer tensor vLLM passes to ``register_kv_caches`` (logical ``[B, H, N, 2D]``).

    The memory order (HND or NHD) and any block padding are read from the strides;
    ``total_kv_heads`` defaults to the local head count times ``tp_size``.
    """
    if len(kv_cache.shape) != 4 or kv_cache.shape[3] % 2:
        raise LayoutError(
            f"a vLLM layer KV tensor is [num_blocks, H, N, 2*head_dim], got {tuple(kv_cache.shape)}"
        )
    _, num_kv_heads, block_size, content = (int(x) for x in kv_cache.shape)
    stride = kv_cache.stride()
    dtype = dtype_name(kv_cache.dtype)
    total = total_kv_heads or num_kv_heads * tp_size
    head_start, held = tp_head_range(total, tp_size, tp_rank)
    if held != num_kv_heads:
        raise LayoutError(
            f"the tensor holds {num_kv_heads} KV heads but TP rank {tp_rank}/{tp_size} of {total} holds {held}"
        )
    c = content
    is_hnd = (
        stride[3] == 1 and stride[2] == c and (stride[1] == block_size * c or num_kv_heads == 1)
    )
    is_nhd = (
        stride[3] == 1 and stride[1] == c and (stride[2] == num_kv_heads * c or block_size == 1)
    )
    if not (is_hnd or is_nhd):
        raise LayoutError(
            f"vLLM KV tensor strides {tuple(stride)} are neither HND nor NHD with dense blocks"
        )
    kind = LayoutKind.VLLM_HND if is_hnd else LayoutKind.VLLM_NHD
    if is_cpu:
        if kind is not LayoutKind.VLLM_HND:
            raise LayoutError("the vLLM CPU backend only uses the HND (LBHNC) layout")
        kind = LayoutKind.VLLM_CPU
    layout = PagedKVLayout(
        kind, num_layers, num_kv_heads, content // 2, block_size, dtype,
        head_start=head_start, total_kv_heads=total, cpu_isa=isa if is_cpu else "",
    )  # fmt: skip
    block_stride = int(stride[0]) * DTYPE_SIZES[dtype]
    if block_stride != layout.page_nbytes:
        from dataclasses import replace

        layout = replace(layout, block_stride=block_stride)
    return layout
