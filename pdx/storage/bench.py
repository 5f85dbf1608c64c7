"""Micro-benchmark: L1 save/load GB/s through ``StoreClient`` against a plain numpy memcpy
of the same bytes, measured in the same run.

    python -m pdx.storage.bench [--total-mb 512] [--chunk-mb 1,8,32] [--repeat 3]
    python -m pdx.storage.bench --remote tcp     # also a RemoteStoreClient over 127.0.0.1

Starts its own ``pdx store`` process; the arena pages are touched once before timing.
Save time covers reserve + copy + xxh3 checksum + commit; load covers acquire +
copy + release (and the checksum with --verify). With ``--remote`` the same bytes are
saved and loaded through a remote client too, next to a bare transport read of the
same number of bytes out of the store's arena (the transport's own speed, same run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from pdx.storage.client import StoreClient, create_client
from pdx.storage.messages import Clear


def _start_store(socket_path: str, capacity_gb: float, slab_mb: int,
                 remote: str | None = None) -> tuple[subprocess.Popen[str], str]:  # fmt: skip
    args = [sys.executable, "-m", "pdx.cli", "store", "--socket", socket_path, "--http-port", "-1",
            "--capacity-gb", str(capacity_gb), "--slab-mb", str(slab_mb), "--log-level", "warning",
            *(["--remote-listen", "127.0.0.1:0", "--remote-transport", remote] if remote else [])]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while line and not line.startswith("pdx store ready"):  # libraries (NIXL) may print first
        line = proc.stdout.readline()
    if not line.startswith("pdx store ready"):
        proc.kill()
        raise SystemExit(f"store did not start: {line!r}")
    fields = dict(part.split("=", 1) for part in line.split()[3:])
    return proc, fields.get("remote", "off")


def measure(client: StoreClient, chunk_mb: float, total_mb: int, repeat: int,
            admin: StoreClient | None = None) -> dict[str, float]:  # fmt: skip
    """Best-of-``repeat`` GB/s of memcpy, save and load for one chunk size (``admin``: a
    node-local client that clears the store between rounds, when ``client`` is remote)."""
    nbytes = int(chunk_mb * (1 << 20))
    num = max(1, total_mb * (1 << 20) // nbytes)
    total = num * nbytes
    rng = np.random.default_rng(0)
    srcs = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(num)]
    dsts = [np.ones(nbytes, np.uint8) for _ in range(num)]  # pages touched
    memcpy_s = save_s = load_s = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for dst, src in zip(dsts, srcs, strict=True):
            np.copyto(dst, src)
        memcpy_s = min(memcpy_s, time.perf_counter() - start)
    for round_ in range(repeat + 1):  # round 0 touches the arena pages
        (admin or client)._ctl.call(Clear())  # operator op over the engine socket (bench only)
        keys = [f"{chunk_mb}-{round_}-{i}".encode() for i in range(num)]
        start = time.perf_counter()
        assert client.save(keys, srcs).result() == num
        if round_:
            save_s = min(save_s, time.perf_counter() - start)
    for _ in range(repeat):
        start = time.perf_counter()
        assert client.load(keys, dsts) == num
        load_s = min(load_s, time.perf_counter() - start)
    assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs, strict=True))
    gb = total / 1e9
    return {
        "chunk_mb": chunk_mb,
        "gb": gb,
        "memcpy": gb / memcpy_s,
        "save": gb / save_s,
        "load": gb / load_s,
    }


def bare_read(client: Any, chunk_mb: float, total_mb: int, repeat: int) -> float:
    """GB/s of a bare transport read of the same bytes out of the store's arena (no store ops)."""
    from pdx.transports.segments import SegmentPairs

    nbytes = int(chunk_mb * (1 << 20))
    num = max(1, total_mb * (1 << 20) // nbytes)
    store = client._store  # connected by the measured loads (bench only)
    local = client._transport.allocate(num * nbytes)
    pairs = SegmentPairs.strided(local.region_id, store.region_id, nbytes, num)
    best = float("inf")
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            client._loop.run(_read(client._transport, store.peer, pairs))
            best = min(best, time.perf_counter() - start)
    finally:
        local.release()
    return num * nbytes / 1e9 / best


async def _read(transport: Any, peer: Any, pairs: Any) -> None:
    await (await transport.post_read(peer, pairs)).wait(120)


def run(total_mb: int, chunk_mbs: list[float], repeat: int, verify: bool,
        remote: str | None = None) -> list[dict[str, float]]:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "store.sock")
        slab_mb = max(64, int(max(chunk_mbs)) + 1)
        capacity_gb = 1.2 * total_mb * (1 << 20) / 1e9 + 3 * slab_mb * (1 << 20) / 1e9
        store, address = _start_store(sock, capacity_gb, slab_mb, remote)
        try:
            with create_client(sock, timeout_s=30.0, verify_loads=verify) as client:
                rows = [measure(client, mb, total_mb, repeat) for mb in chunk_mbs]
                if remote is None:
                    return rows
                with create_client(f"pdx-store://{address}", timeout_s=30.0) as far:
                    for row, mb in zip(rows, chunk_mbs, strict=True):
                        got = measure(far, mb, total_mb, repeat, admin=client)
                        row.update(remote_save=got["save"], remote_load=got["load"],
                                   bare_read=bare_read(far, mb, total_mb, repeat))  # fmt: skip
                return rows
        finally:
            store.terminate()
            store.wait(timeout=30)
            if store.stdout:
                store.stdout.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pdx.storage.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--total-mb", type=int, default=512, help="bytes moved per measurement")
    p.add_argument("--chunk-mb", default="1,8,32", help="comma-separated chunk sizes (MiB)")
    p.add_argument("--repeat", type=int, default=3, help="best of N for memcpy and load")
    p.add_argument("--verify", action="store_true", help="loads verify the xxh3 checksum")
    p.add_argument("--remote", choices=["tcp", "nixl", "auto"], help="also measure a remote client")
    args = p.parse_args(argv)
    rows = run(
        args.total_mb, [float(x) for x in args.chunk_mb.split(",")], args.repeat, args.verify,
        args.remote,
    )
    print(f"{'chunk MiB':>9} {'GB':>6} {'memcpy GB/s':>12} {'save GB/s':>10} {'save/memcpy':>12} "
          f"{'load GB/s':>10} {'load/memcpy':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['chunk_mb']:>9g} {r['gb']:>6.2f} {r['memcpy']:>12.2f} {r['save']:>10.2f} "
              f"{r['save'] / r['memcpy']:>12.2f} {r['load']:>10.2f} {r['load'] / r['memcpy']:>12.2f}")  # fmt: skip
    if args.remote:
        print(f"\nremote client over {args.remote} (127.0.0.1), same bytes, same run:")
        print(f"{'chunk MiB':>9} {'bare read GB/s':>15} {'load GB/s':>10} {'load/bare':>10} "
              f"{'load/local':>11} {'save GB/s':>10} {'save/local':>11}")  # fmt: skip
        for r in rows:
            print(f"{r['chunk_mb']:>9g} {r['bare_read']:>15.2f} {r['remote_load']:>10.2f} "
                  f"{r['remote_load'] / r['bare_read']:>10.2f} {r['remote_load'] / r['load']:>11.2f} "
                  f"{r['remote_save']:>10.2f} {r['remote_save'] / r['save']:>11.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
