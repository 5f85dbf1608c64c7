"""``pdx bench pd`` pieces that need no engine: statistics, prompts, table, failure entries."""

from __future__ import annotations

import pytest

from pdx.bench import pd


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert pd.percentile(values, 50) == 3.0
    assert pd.percentile(values, 99) == 5.0
    assert pd.percentile([7.0], 99) == 7.0


def test_prompts_are_distinct_sized_and_reproducible():
    prompts = pd.prompts_for(1024, 3, offset=0)
    assert [len(p) for p in prompts] == [1024] * 3
    assert len({tuple(p[:32]) for p in prompts}) == 3  # no shared prefix for the cache to hit
    assert prompts == pd.prompts_for(1024, 3, offset=0)
    assert prompts[0] != pd.prompts_for(1024, 1, offset=10_000)[0]  # warm-up set differs
    assert min(min(p) for p in prompts) >= 3  # no special tokens


def test_exposed_fraction_uses_only_the_named_transfers():
    figures = {
        "a": {"transfer_ms": 10.0, "exposed_ms": 1.0},
        "b": {"transfer_ms": 30.0, "exposed_ms": 3.0},
        "warm": {"transfer_ms": 100.0, "exposed_ms": 100.0},
    }
    assert pd._exposed_fraction(figures, ["a", "b"]) == 0.1
    assert pd._exposed_fraction(figures, ["missing"]) is None


def test_figure_p50s_split_exposed_time_over_the_named_transfers():
    figures = {
        "a": {"transfer_ms": 10.0, "exposed_ms": 3.0, "last_post_ms": 1.0, "last_write_ms": 2.0},
        "b": {"transfer_ms": 20.0, "exposed_ms": 5.0},  # written before the split existed
        "warm": {"transfer_ms": 99.0, "exposed_ms": 99.0, "last_post_ms": 99.0},
    }
    assert pd._figure_p50s(figures, ["a", "b"]) == {
        "transfer_ms_p50": 10.0,
        "exposed_ms_p50": 3.0,
        "last_post_ms_p50": 1.0,
        "last_write_ms_p50": 2.0,
    }


def test_exposed_after_attention_is_clipped_at_zero_and_needs_both_clocks():
    figures = {
        "a": {"transfer_ms": 10.0, "t_done": 100.004, "t_attention_done": 100.001},  # 3 ms late
        "b": {"transfer_ms": 10.0, "t_done": 100.0, "t_attention_done": 100.5},  # landed first
        "c": {"transfer_ms": 10.0, "t_done": 100.0},  # P wrote no stats
    }
    assert pd._exposed_after_attention_fraction(figures, ["a", "b"]) == pytest.approx(0.15)
    assert pd._exposed_after_attention_fraction(figures, ["a", "c"]) is None
    assert pd._figure_p50s(figures, ["b"])["exposed_after_attention_ms_p50"] == 0.0


def test_transfer_figures_join_p_and_d_lines_by_transfer_id(tmp_path):
    import json

    from pdx.bench.pd_systems import System

    d_path, p_path = tmp_path / "d.jsonl", tmp_path / "p.jsonl"
    d_path.write_text(json.dumps({"transfer_id": "t1", "transfer_ms": 4.0, "t_done": 2.0}) + "\n")
    lines = [{"side": "prefill", "transfer_id": "t1", "t_attention_done": 1.5},
             {"side": "prefill", "transfer_id": "gone", "t_attention_done": 1.0}]  # fmt: skip
    p_path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    system = System("pdx", [], decode=None, stats_path=d_path, prefill_stats_path=p_path)
    assert system.transfer_figures() == {
        "t1": {"transfer_id": "t1", "transfer_ms": 4.0, "t_done": 2.0, "t_attention_done": 1.5}
    }


def test_table_shows_ratios_against_vllm_nixl_and_errors():
    results = [
        {"system": "single", "prompt_tokens": 1024, "ttft_ms_p50": 50.0, "ttft_ms_p99": 60.0, "e2e_ms_p50": 100.0},
        {"system": "vllm-nixl", "prompt_tokens": 1024, "ttft_ms_p50": 100.0, "ttft_ms_p99": 120.0, "e2e_ms_p50": 200.0},
        {"system": "pdx", "prompt_tokens": 1024, "error": "EngineError: boom"},
    ]  # fmt: skip
    table = pd.format_table(results).splitlines()
    assert "0.50x" in table[1] and "1.00x" in table[2]
    assert "error: EngineError: boom" in table[3]


def test_a_system_that_fails_gets_error_entries(monkeypatch, tmp_path):
    from pdx.bench import pd_systems
    from pdx.errors import EngineError
    from pdx.harness.process import EngineSpec

    stopped = []

    class Broken:
        def start(self):
            raise EngineError("PdxConnector failed to load")

        def stop(self):
            stopped.append(True)

    monkeypatch.setattr(pd_systems, "make_pdx", lambda base, log_dir, transport: Broken())
    entries = pd.run_system("pdx", EngineSpec(model="/m", port=0), tmp_path, "tcp", [1024, 4096], 1)
    assert [e["prompt_tokens"] for e in entries] == [1024, 4096]
    assert all("PdxConnector failed to load" in e["error"] for e in entries)
    assert stopped == [True]


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        pd.main(["--systems", "single,nope"])
    assert "unknown systems" in capsys.readouterr().err


def test_model_layers_builds_that_model_and_is_recorded(monkeypatch, tmp_path, capsys):
    import contextlib
    import json

    from pdx.harness import lock
    from pdx.models import tiny

    built, ran = [], []
    monkeypatch.setattr(
        tiny, "build_tiny_model", lambda **kw: built.append(kw) or tmp_path / "model"
    )
    monkeypatch.setattr(lock, "engine_lock", contextlib.nullcontext)

    def fake_run(name, base, log_dir, transport, sizes, reps, nixl_threads=None):
        ran.append((name, base.model))
        return [{"system": name, "prompt_tokens": s, "ttft_ms_p50": 1.0, "ttft_ms_p99": 1.0,
                 "e2e_ms_p50": 2.0, "exposed_transfer_fraction": 0.1} for s in sizes]  # fmt: skip

    monkeypatch.setattr(pd, "run_system", fake_run)
    out = tmp_path / "r.json"
    argv = ["--systems", "pdx", "--sizes", "64", "--model-layers", "8", "--json", str(out),
            "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    assert pd.main(argv) == 0
    assert built[0]["num_layers"] == 8
    assert ran == [("pdx", str(tmp_path / "model"))]
    report = json.loads(out.read_text())
    assert report["model_layers"] == 8 and report["pdx_exposed_transfer_fraction"] == 0.1
    assert "8-layer model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pd.main(["--model-layers", "0"])
