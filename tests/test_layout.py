"""PagedKVLayout: factories, tensor-parallel head ranges, validation, fingerprints."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from pdx import layout as L
from pdx.errors import LayoutError


def test_tp_head_ranges_split_and_replicate():
    assert [L.tp_head_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 4)]
    assert [L.tp_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    with pytest.raises(LayoutError, match="evenly"):
        L.tp_head_range(6, 4, 0)
    with pytest.raises(LayoutError, match="rank"):
        L.tp_head_range(8, 2, 2)


def test_factories_describe_each_engine():
    hnd = L.vllm_flash(32, 8, 128, 16, "torch.bfloat16", order="HND", tp_size=2, tp_rank=1)
    assert (hnd.kind, hnd.num_kv_heads, hnd.head_range, hnd.dtype) == (
        L.LayoutKind.VLLM_HND,
        4,
        (4, 8),
        "bfloat16",
    )
    assert hnd.page_nbytes == 16 * 4 * 2 * 128 * 2  # K and V together
    assert L.vllm_flash(2, 8, 64, 16, "fp16", order="LBNHC").kind is L.LayoutKind.VLLM_NHD
    cpu = L.vllm_cpu(2, 2, 64, 128, "float32")
    assert cpu.is_head_major and cpu.is_token_addressable and cpu.page_nbytes == 2 * 128 * 128 * 4
    assert not L.vllm_cpu(2, 2, 64, 128, "bfloat16", isa="amx").is_token_addressable
    mha = L.sglang_mha(2, 8, 64, 1, "float16")
    assert mha.num_buffers == 2 and mha.page_nbytes == 8 * 64 * 2  # one pool
    mla = L.sglang_mla(2, 512, 64, 64, "bfloat16")
    assert (mla.num_components, mla.head_dim, mla.num_kv_heads) == (1, 576, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_layers=0), "num_layers"),
        (dict(dtype="int4"), "unsupported KV dtype"),
        (dict(head_start=6), "outside"),
        (dict(block_stride=8), "smaller than one page"),
        (dict(cpu_isa="vec"), "cpu_isa"),
    ],
)
def test_malformed_layouts_are_rejected(kwargs, match):
    base = dict(
        kind="vllm_hnd",
        num_layers=2,
        num_kv_heads=4,
        head_dim=8,
        block_size=16,
        dtype="float16",
        total_kv_heads=8,
    )
    with pytest.raises(LayoutError, match=match):
        L.PagedKVLayout(**{**base, **kwargs})


def test_unhandled_vllm_layout_is_named():
    with pytest.raises(LayoutError, match="unsupported vLLM KV cache layout 'BLHNC'"):
        L.vllm_flash(2, 4, 8, 16, "float16", order="BLHNC")


def test_fingerprint_covers_what_peers_must_agree_on():
    base = L.vllm_flash(4, 8, 64, 16, "bfloat16", tp_size=2, tp_rank=0)
    fp = base.fingerprint("tiny")
    assert fp == L.vllm_flash(4, 8, 64, 16, "bfloat16", tp_size=2, tp_rank=0).fingerprint("tiny")
    assert fp == replace(base, block_stride=base.page_nbytes * 4).fingerprint(
        "tiny"
    )  # local detail
    others = [
        base.fingerprint("other-model"),
        replace(base, dtype="float16").fingerprint("tiny"),
        replace(base, block_size=32).fingerprint("tiny"),
        base.with_heads(4, 4).fingerprint("tiny"),
        replace(base, kind=L.LayoutKind.VLLM_NHD).fingerprint("tiny"),
        replace(base, num_layers=5).fingerprint("tiny"),
    ]
    assert len({fp, *others}) == len(others) + 1


def test_fingerprint_is_the_same_in_another_process():
    code = (
        "from pdx import layout as L; print(L.vllm_cpu(2, 4, 64, 32, 'bfloat16').fingerprint('m'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})  # fmt: skip
    assert out.stdout.strip() == L.vllm_cpu(2, 4, 64, 32, "bfloat16").fingerprint("m")


def test_planning_and_keys_do_not_import_torch():
    code = (
        "import sys, pdx.layout, pdx.segments, pdx.keys, kernels\n"
        "print([m for m in ('torch', 'triton', 'vllm') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
