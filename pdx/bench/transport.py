"""``pdx bench transport``: pdx transports against each medium's raw baseline, same run.

For every selected transport and segment size, the initiator (this process) posts
``posts`` batched writes of ``post_bytes`` (``post_bytes // segment`` segments, in
scattered destination order so nothing can be merged) into a target endpoint in a
separate process (in-process for ``loopback``), after one warm-up post; then the
medium's raw baseline moves the same segments the same way (``_baselines.py``).
``--rounds N`` alternates the two N times and pools the posts.

Output: a table (GB/s, baseline GB/s, ratio, per-post latency p50/p99), the
"64 KiB vs 1 MiB" throughput ratio per transport, ``--json FILE`` and ``--plot FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

KiB, MiB = 1 << 10, 1 << 20
FULL_SIZES = [16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB]
QUICK_SIZES = [64 * KiB, MiB, 16 * MiB]
DEFAULT_TRANSPORTS = ["loopback", "shm", "tcp", "nixl", "ucx"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdx bench transport", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 sizes, 16 MiB posts, 4 posts per point (< 1 minute)")
    p.add_argument("--transports", default=",".join(DEFAULT_TRANSPORTS),
                   help="comma-separated transports (unavailable ones are skipped)")
    p.add_argument("--sizes", help="comma-separated segment sizes in bytes (overrides the defaults)")
    p.add_argument("--post-mib", type=float, help="bytes per post, MiB (default 64; --quick 16)")
    p.add_argument("--posts", type=int, help="timed posts per point (default 8, so >= 256 MiB; --quick 4)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate pdx and baseline this many times per transport, pooling the posts "
                        "(both sample the same load on a shared machine; default 1)")
    p.add_argument("--json", dest="json_path", help="write all points to this JSON file")
    p.add_argument("--plot", dest="plot_path", help="draw GB/s vs segment size to this PNG")
    return p.parse_args(argv)


def _order(num_segments: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_segments).astype(np.int64)


def _table(src_region: int, dst_region: int, seg: int, order: np.ndarray) -> np.ndarray:
    n = len(order)
    t = np.empty((n, 5), dtype=np.int64)
    t[:, 0], t[:, 1] = src_region, np.arange(n, dtype=np.int64) * seg
    t[:, 2], t[:, 3], t[:, 4] = dst_region, order * seg, seg
    return t


async def _pdx_points(kind: str, points: list[tuple[int, np.ndarray]], posts: int, post_bytes: int,
                      tick: Any) -> list[list[float]]:
    """Per-post seconds of pdx's ``kind`` for each (segment, order) point."""
    import pdx.transports as transports
    from pdx.transports.remote import RemoteEndpoint
    from pdx.transports.segments import SegmentPairs

    remote = None
    target = None
    if kind == "loopback":
        target = transports.create_transport(kind)
        rid, descriptor = target.allocate(post_bytes).region_id, target.descriptor()
    else:
        remote = RemoteEndpoint.start(kind)
        rid, descriptor = remote.call("allocate", post_bytes), remote.call("descriptor")
    t = transports.create_transport(kind)
    out = []
    try:
        src = t.allocate(post_bytes)
        src.buffer[:] = 1
        peer = await t.connect(descriptor)
        for seg, order in points:
            pairs = SegmentPairs(_table(src.region_id, rid, seg, order))
            lat = []
            for _ in range(posts + 1):
                t0 = time.perf_counter()
                await (await t.post_write(peer, pairs)).wait(120)
                lat.append(time.perf_counter() - t0)
            out.append(lat[1:])
            tick()
    finally:
        await t.aclose()
        if target is not None:
            await target.aclose()
        if remote is not None:
            remote.close()
            remote.stop()
    return out


def _point(kind: str, seg: int, n: int, lat: list[float], base: list[float]) -> dict[str, Any]:
    from pdx.bench._baselines import BASELINE_NAMES

    # median post time: one preempted post on a shared box should not move the figure
    gbps = seg * n / float(np.median(lat)) / 1e9
    base_gbps = seg * n / float(np.median(base)) / 1e9
    p50, p99 = np.percentile(np.array(lat) * 1e6, [50, 99])
    return {"transport": kind, "segment_bytes": seg, "num_segments": n, "gbps": round(gbps, 3),
            "baseline": BASELINE_NAMES[kind], "baseline_gbps": round(base_gbps, 3),
            "ratio": round(gbps / base_gbps, 3), "latency_us_p50": round(float(p50), 1),
            "latency_us_p99": round(float(p99), 1)}


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // KiB} KiB"


def _print_report(points: list[dict[str, Any]]) -> None:
    print(f"{'transport':<9} {'segment':>8} {'segs/post':>9} {'GB/s':>7} {'base GB/s':>9} {'ratio':>6} "
          f"{'p50 us':>9} {'p99 us':>9}  baseline")
    for p in points:
        print(f"{p['transport']:<9} {_size(p['segment_bytes']):>8} {p['num_segments']:>9} {p['gbps']:>7.2f} "
              f"{p['baseline_gbps']:>9.2f} {p['ratio']:>6.2f} {p['latency_us_p50']:>9.0f} "
              f"{p['latency_us_p99']:>9.0f}  {p['baseline']}")
    print()
    for kind in dict.fromkeys(p["transport"] for p in points):
        by = {p["segment_bytes"]: p for p in points if p["transport"] == kind}
        if 64 * KiB in by and MiB in by:
            pdx = by[64 * KiB]["gbps"] / by[MiB]["gbps"]
            base = by[64 * KiB]["baseline_gbps"] / by[MiB]["baseline_gbps"]
            print(f"{kind:<9} 64 KiB vs 1 MiB: pdx {pdx:.2f}x, baseline {base:.2f}x")


def _is_available(transports: Any, kind: str) -> bool:
    try:
        cls = transports.transport_class(kind)
    except transports.TransportError:
        return False
    check = getattr(cls, "is_available", None)
    return check is None or bool(check())


def _machine(args: argparse.Namespace, post_bytes: int, posts: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "numpy": np.__version__,
            "ucx_net_devices": os.environ.get("UCX_NET_DEVICES"), "quick": args.quick,
            "post_bytes": post_bytes, "posts_per_point": posts, "rounds": args.rounds,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # keep UCX on loopback
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs INFO lines to stdout otherwise
    from tqdm import tqdm

    import pdx.transports as transports
    from pdx.bench._baselines import BASELINES

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    post_bytes = int((args.post_mib or (16 if args.quick else 64)) * MiB)
    posts = args.posts or (4 if args.quick else 8)
    kinds = []
    for k in [k.strip() for k in args.transports.split(",") if k.strip()]:
        if k not in BASELINES:
            print(f"pdx bench transport: no baseline for {k!r}; choose from {list(BASELINES)}", file=sys.stderr)
            return 2
        if _is_available(transports, k):
            kinds.append(k)
        else:
            print(f"pdx bench transport: skipping {k} (not available here)", file=sys.stderr)
    sizes = [s for s in sizes if 0 < s <= post_bytes]
    pts = [(s, _order(post_bytes // s)) for s in sizes]
    if args.rounds < 1:
        print("pdx bench transport: --rounds must be >= 1", file=sys.stderr)
        return 2
    bar = tqdm(total=2 * args.rounds * len(kinds) * len(pts), file=sys.stderr, unit="point", desc="bench transport")
    results: list[dict[str, Any]] = []
    for kind in kinds:
        pdx_lat: list[list[float]] = [[] for _ in pts]
        base_lat: list[list[float]] = [[] for _ in pts]
        for _ in range(args.rounds):  # alternate, so both sample the same load on a shared machine
            bar.set_postfix_str(f"pdx {kind}")
            for pooled, lat in zip(pdx_lat, asyncio.run(_pdx_points(kind, pts, posts, post_bytes, lambda: bar.update(1))),
                                   strict=True):
                pooled.extend(lat)
            bar.set_postfix_str(f"baseline {kind}")
            for pooled, lat in zip(base_lat, BASELINES[kind](pts, posts), strict=True):
                pooled.extend(lat)
            bar.update(len(pts))
        for (seg, order), lat, base in zip(pts, pdx_lat, base_lat, strict=True):
            results.append(_point(kind, seg, len(order), lat, base))
    bar.close()
    _print_report(results)
    doc = {"points": results, "machine": _machine(args, post_bytes, posts)}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot_path:
        from pdx.bench._plot import plot_transport

        plot_transport(results, args.plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
