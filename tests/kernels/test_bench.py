"""``pdx bench kernels`` writes the documented JSON."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_bench_kernels_json(tmp_path, capsys):
    from pdx.bench.kernels import main

    out = tmp_path / "k.json"
    assert (
        main(["--quick", "--layers", "1", "--sizes", "32", "--json", str(out), "--device", "cpu"])
        == 0
    )
    points = json.loads(out.read_text())["points"]
    kinds = {"vllm_hnd", "vllm_nhd", "vllm_cpu", "sglang_mha", "sglang_mla"}
    assert {(p["layout"], p["op"]) for p in points} == {
        (k, op) for k in kinds for op in ("gather", "scatter")
    }
    for p in points:
        assert p["chunk_tokens"] == 32 and p["gbps"] > 0 and p["copy_gbps"] > 0
        assert p["ratio"] == pytest.approx(p["gbps"] / p["copy_gbps"], rel=0.01)
    assert "vllm_cpu" in capsys.readouterr().out
