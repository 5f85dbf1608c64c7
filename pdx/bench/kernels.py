"""``pdx bench kernels``: GB/s of paged-KV gather/scatter per layout and chunk size.

Each point is compared with a plain ``copy_`` of the same number of bytes between two
contiguous tensors on the same device, measured in the same run (``ratio`` = kernel /
copy). Times are the best of several calls, after a warm-up, for kernel and copy alike. On CUDA tensors the Triton kernels run; on CPU the torch reference. Also times
chunk-key hashing of 128K tokens.

    pdx bench kernels [--quick] [--json FILE] [--device cpu|cuda] [--layers N] [--sizes 256,2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from pdx import layout as L


def _layouts(num_layers: int) -> list[L.PagedKVLayout]:
    # Llama-3-8B-like per-rank shapes (8 KV heads x 128); MLA like DeepSeek (512 + 64).
    return [
        L.vllm_flash(num_layers, 8, 128, 16, "bfloat16", order="HND"),
        L.vllm_flash(num_layers, 8, 128, 16, "bfloat16", order="NHD"),
        L.vllm_cpu(num_layers, 8, 128, 128, "bfloat16"),
        L.sglang_mha(num_layers, 8, 128, 16, "bfloat16"),
        L.sglang_mla(num_layers, 512, 64, 64, "bfloat16"),
    ]


def _time(
    fns: list[Callable[[], Any]], sync: Callable[[], None], min_seconds: float, max_iters: int
) -> list[float]:
    """Best (minimum) seconds per call of each function, after a warm-up call.

    The functions take turns in every round, so a kernel and its copy baseline see the
    same background load on a shared machine.
    """
    for fn in fns:
        fn()
    sync()
    best = [float("inf")] * len(fns)
    start, rounds = time.perf_counter(), 0
    while rounds < max_iters and (rounds < 3 or time.perf_counter() - start < min_seconds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
        rounds += 1
    return best


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _bench_layout(
    layout: L.PagedKVLayout, chunk_tokens: int, device: str, min_seconds: float, max_iters: int
) -> list[dict[str, Any]]:
    import torch

    import pdx.kernels as kernels
    from pdx.kernels.views import alloc_layer_cache

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    num_blocks = 2 * -(
        -chunk_tokens // layout.block_size
    )  # the request's blocks are scattered in a pool twice its size
    caches = [
        alloc_layer_cache(layout, num_blocks, device, fill="randn")
        for _ in range(layout.num_layers)
    ]
    gen = torch.Generator().manual_seed(0)
    block_ids = torch.randperm(num_blocks, generator=gen)[: num_blocks // 2].to(device)
    slots = kernels.slot_mapping_from_blocks(
        block_ids, layout.block_size, chunk_tokens, device=device
    )
    chunk = kernels.gather(layout, caches, slots)
    nbytes = chunk.numel() * chunk.element_size()
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255, generator=None)
    b = torch.empty_like(a)
    out = torch.empty_like(
        chunk
    )  # like the copy baseline, write into memory that is already mapped
    copy_s, gather_s, scatter_s = _time(
        [
            lambda: b.copy_(a),
            lambda: kernels.gather(layout, caches, slots, out=out),
            lambda: kernels.scatter(layout, caches, chunk, slots),
        ],
        sync,
        min_seconds,
        max_iters,
    )
    copy_gbps = nbytes / copy_s / 1e9
    return [
        {
            "layout": layout.kind.value,
            "op": op,
            "chunk_tokens": chunk_tokens,
            "gbps": _sig(nbytes / s / 1e9),
            "copy_gbps": _sig(copy_gbps),
            "ratio": _sig(copy_s / s),
            "nbytes": nbytes,
        }
        for op, s in (("gather", gather_s), ("scatter", scatter_s))
    ]


def _bench_keys(samples: int) -> dict[str, float]:
    import numpy as np

    from pdx.keys import KeyExtras, chunk_keys

    tokens = np.random.default_rng(0).integers(0, 150_000, 131_072)
    as_list = tokens.tolist()
    out = {}
    for hash_name in ("sha256", "blake3"):
        extras = KeyExtras("bench-model", "bfloat16", "0" * 16, (0, 8), hash_name)
        try:
            chunk_keys(tokens[:256], extras)
        except ValueError:
            continue  # blake3 not installed
        for kind, toks in (("array", tokens), ("list", as_list)):

            def run(toks: Any = toks, extras: KeyExtras = extras) -> None:
                chunk_keys(toks, extras)

            times = [_time([run], lambda: None, 0.0, 1)[0] for _ in range(samples)]
            out[f"{hash_name}_{kind}_ms_best"] = round(min(times) * 1e3, 3)
            out[f"{hash_name}_{kind}_ms_median"] = round(statistics.median(times) * 1e3, 3)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdx bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="two chunk sizes, short timing (under a minute)"
    )
    parser.add_argument("--json", metavar="FILE", help='write {"points": [...]} to FILE')
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--layers", type=int, default=4, help="layers per layout (default 4)")
    parser.add_argument(
        "--sizes", help="comma-separated chunk sizes in tokens (default by --quick)"
    )
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [256, 2048] if args.quick else [256, 1024, 4096, 16384]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    min_seconds, max_iters = (0.15, 10) if args.quick else (1.0, 200)
    layouts = _layouts(args.layers)
    points: list[dict[str, Any]] = []
    with tqdm(total=len(layouts) * len(sizes), desc="bench kernels", file=sys.stderr) as bar:
        for layout in layouts:
            for size in sizes:
                points += _bench_layout(layout, size, device, min_seconds, max_iters)
                bar.update(1)
    keys = _bench_keys(5 if args.quick else 20)

    print(
        f"device={device} layers={args.layers} dtype=bfloat16 (copy = plain copy_ of the same bytes, same run)"
    )
    print(
        f"{'layout':<11} {'op':<8} {'tokens':>7} {'MiB':>8} {'GB/s':>8} {'copy GB/s':>10} {'ratio':>6}"
    )
    for p in points:
        mib = p["nbytes"] / 2**20
        print(
            f"{p['layout']:<11} {p['op']:<8} {p['chunk_tokens']:>7} {mib:>8.1f} {p['gbps']:>8.2f} {p['copy_gbps']:>10.2f} {p['ratio']:>6.2f}"
        )
    print("chunk keys, 128K tokens: " + ", ".join(f"{k}={v}" for k, v in keys.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": points, "device": device, "keys_128k": keys}, f, indent=1)
    return 0
