"""Triton kernels against the torch reference: on CUDA where present, else in Triton's interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pdx.kernels as kernels
import pytest
import torch

from tests.kernels.helpers import (
    DTYPES,
    bits_equal,
    fill_random_bits,
    flat,
    new_caches,
    tiny_layouts,
)

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
ROOT = Path(__file__).resolve().parents[2]


def check_against_reference(device: str) -> None:
    """Gather and scatter with both backends on every layout and dtype; raise on any difference."""
    from pdx.kernels.views import layer_tensors

    for dtype in DTYPES:
        for layout in (
            tiny_layouts(dtype, 16, tp_size=2, tp_rank=1)[:4] + tiny_layouts(dtype, 16)[4:]
        ):
            src = new_caches(layout, 6)
            for i, cache in enumerate(src):
                fill_random_bits(layout, cache, seed=i)
            src = [[t.to(device) for t in c] if isinstance(c, tuple) else c.to(device) for c in src]
            if layout.kind.value == "vllm_nhd":  # keep vLLM's permuted strides on the device
                src = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in src]
            slots = kernels.slot_mapping_from_blocks(
                [4, 0], 16, 21, device=device
            )  # partial last block
            head_ranges: list = [None]
            if layout.num_kv_heads > 1 and dtype == "bfloat16":
                head_ranges.append((layout.head_start + 1, layout.head_end))
            for heads in head_ranges:
                ref = kernels.gather(layout, src, slots, heads, backend="reference")
                got = kernels.gather(layout, src, slots, heads, backend="triton")
                assert bits_equal(got, ref), (
                    f"gather differs: {layout.kind.value} {dtype} heads={heads}"
                )
                dst_ref = [kernels.views.alloc_layer_cache(layout, 6, device) for _ in src]
                dst_tri = [kernels.views.alloc_layer_cache(layout, 6, device) for _ in src]
                kernels.scatter(layout, dst_ref, ref, slots, heads, backend="reference")
                kernels.scatter(layout, dst_tri, ref, slots, heads, backend="triton")
                for a, b in zip(dst_ref, dst_tri, strict=True):
                    for x, y in zip(
                        layer_tensors(layout, a), layer_tensors(layout, b), strict=True
                    ):
                        assert bits_equal(flat(x), flat(y)), (
                            f"scatter differs: {layout.kind.value} {dtype}"
                        )


@pytest.mark.slow
@needs_triton
def test_triton_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    code = (
        "from tests.kernels.test_triton import check_against_reference as c; c('cpu'); print('OK')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@needs_triton
def test_triton_launcher_rejects_cpu_tensors_outside_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter accepts CPU tensors")
    layout = tiny_layouts("float16", 16)[0]
    caches = new_caches(layout, 2)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.gather(layout, caches, kernels.slot_mapping_from_blocks([1], 16), backend="triton")


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_reference_on_cuda():
    check_against_reference("cuda")
