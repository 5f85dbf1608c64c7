"""`pdx bench transport` in a tiny mode writes the documented JSON (schema only, not speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

KEYS = {"transport", "segment_bytes", "num_segments", "gbps", "baseline", "baseline_gbps", "ratio",
        "latency_us_p50", "latency_us_p99"}


def test_bench_transport_writes_points_and_plot(tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    cmd = [sys.executable, "-m", "pdx.cli", "bench", "transport", "--transports", "loopback,tcp",
           "--sizes", "65536,1048576", "--post-mib", "1", "--posts", "2", "--rounds", "2",
           "--json", str(out), "--plot", str(png)]
    env = {**os.environ, "UCX_NET_DEVICES": "lo"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert set(doc) == {"points", "machine"}
    assert doc["machine"]["rounds"] == 2
    points = doc["points"]
    assert [(p["transport"], p["segment_bytes"]) for p in points] == [
        ("loopback", 65536), ("loopback", 1048576), ("tcp", 65536), ("tcp", 1048576)]
    for p in points:
        assert set(p) == KEYS
        assert p["num_segments"] == (1 << 20) // p["segment_bytes"]
        assert p["gbps"] > 0 and p["baseline_gbps"] > 0
        assert abs(p["ratio"] - p["gbps"] / p["baseline_gbps"]) < 0.01 * p["ratio"] + 1e-3
        assert 0 < p["latency_us_p50"] <= p["latency_us_p99"]
    assert png.stat().st_size > 1000
    assert "64 KiB vs 1 MiB" in proc.stdout


def test_bench_transport_rejects_zero_rounds():
    proc = subprocess.run([sys.executable, "-m", "pdx.cli", "bench", "transport", "--transports", "loopback",
                           "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds" in proc.stderr


def test_bench_transport_rejects_unknown_transport():
    proc = subprocess.run([sys.executable, "-m", "pdx.cli", "bench", "transport", "--transports", "carrier-pigeon"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "carrier-pigeon" in proc.stderr
