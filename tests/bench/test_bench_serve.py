"""``pdx bench serve``: workload shapes, metric math, the load generator against fake engines, JSON schema."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from pdx.bench import serve
from pdx.bench.serve_client import LoadSpec, RequestRecord, run_load
from pdx.bench.serve_report import (
    RESULT_KEYS,
    PromptSources,
    results_json,
    sources_delta,
    summarize,
)
from pdx.bench.workloads import (
    NUM_SPECIAL,
    WorkloadSpec,
    create_workload,
    model_shape,
    users_for_kv_volume,
)
from pdx.engines.metrics import parse_prometheus_text
from pdx.testing.fake_engine import FAKE_KV_SECRET, FakeEngine
from tests.router.harness import Harness

SPEC = WorkloadSpec(seed=3, num_users=3, system_tokens=64, user_turn_tokens=8, answer_tokens=4,
                    max_prompt_tokens=120, num_docs=2, doc_tokens=96, question_tokens=8, random_tokens=48)  # fmt: skip


def _chat_turns(spec: WorkloadSpec, user: int, turns: int) -> list[tuple[int, ...]]:
    chat = create_workload("multi-round-chat", spec)
    prompts = []
    for _ in range(turns):
        prompts.append(chat.next_request(user).prompt)
        chat.on_answer(user)
    return prompts


# -- workload shapes ----------------------------------------------------------------------------


def test_chat_prompts_share_the_system_prompt_and_grow_by_exact_turns() -> None:
    chat = create_workload("multi-round-chat", SPEC)
    firsts = [chat.next_request(u).prompt for u in range(SPEC.num_users)]
    assert all(p[:64] == firsts[0][:64] for p in firsts)  # one shared system prompt
    assert len({p[64:] for p in firsts}) == SPEC.num_users  # users' turns differ
    prompts = _chat_turns(SPEC, 1, 4)
    for before, after in zip(prompts, prompts[1:], strict=False):
        assert after[: len(before)] == before  # the next turn extends the previous prompt
        assert len(after) == len(before) + SPEC.answer_tokens + SPEC.user_turn_tokens
    assert len(prompts[0]) == SPEC.system_tokens + SPEC.user_turn_tokens
    assert all(NUM_SPECIAL <= t < SPEC.vocab_size for p in prompts for t in p)


def test_chat_turn_waits_for_its_answer_and_long_conversations_start_over() -> None:
    chat = create_workload("multi-round-chat", SPEC)
    first = chat.next_request(0).prompt
    assert chat.next_request(0).prompt == first  # no answer yet: the history did not grow
    prompts = _chat_turns(SPEC, 0, 8)
    assert max(len(p) for p in prompts) <= SPEC.max_prompt_tokens
    restarts = [i for i in range(1, 8) if len(prompts[i]) < len(prompts[i - 1])]
    assert restarts, "a conversation past max_prompt_tokens must start over"
    fresh = prompts[restarts[0]]
    assert fresh[:64] == first[:64] and len(fresh) == 64 + 8 and fresh != first


def test_chat_users_open_with_their_own_context_and_restarts_bring_a_new_one() -> None:
    spec = WorkloadSpec(**{**SPEC.__dict__, "user_context_tokens": 24, "max_prompt_tokens": 150})
    chat = create_workload("multi-round-chat", spec)
    firsts = [chat.next_request(u).prompt for u in range(spec.num_users)]
    assert all(len(p) == 64 + 24 + 8 and p[:64] == firsts[0][:64] for p in firsts)
    assert len({p[64:88] for p in firsts}) == spec.num_users  # each user's context is its own
    prompts = _chat_turns(spec, 0, 8)
    restart = next(i for i in range(1, 8) if len(prompts[i]) < len(prompts[i - 1]))
    assert all(p[: 64 + 24] == prompts[0][: 64 + 24] for p in prompts[:restart])  # kept all conversation
    fresh = prompts[restart]
    assert len(fresh) == 64 + 24 + 8 and fresh[:64] == prompts[0][:64] and fresh[64:88] != prompts[0][64:88]


def test_prompts_are_deterministic_per_seed() -> None:
    assert _chat_turns(SPEC, 2, 3) == _chat_turns(SPEC, 2, 3)
    other = WorkloadSpec(**{**SPEC.__dict__, "seed": 4})
    assert _chat_turns(other, 2, 1) != _chat_turns(SPEC, 2, 1)
    a, b = create_workload("random", SPEC), create_workload("random", SPEC)
    assert [a.next_request().prompt for _ in range(3)] == [
        b.next_request().prompt for _ in range(3)
    ]


def test_random_prompts_share_no_prefix() -> None:
    rand = create_workload("random", SPEC)
    prompts = [rand.next_request().prompt for _ in range(50)]
    assert all(len(p) == SPEC.random_tokens for p in prompts)
    assert len({p[:2] for p in prompts}) == len(prompts)  # not even two tokens shared


def test_long_doc_qa_asks_new_questions_after_few_documents() -> None:
    qa = create_workload("long-doc-qa", SPEC)
    prompts = [qa.next_request().prompt for _ in range(6)]
    assert all(len(p) == SPEC.doc_tokens + SPEC.question_tokens for p in prompts)
    assert len({p[: SPEC.doc_tokens] for p in prompts}) == SPEC.num_docs
    assert prompts[0][:96] == prompts[2][:96] != prompts[1][:96]
    assert len({p[SPEC.doc_tokens :] for p in prompts}) == len(prompts)


def test_users_sized_to_kv_volume_from_model_shape() -> None:
    vocab, kv_bytes = model_shape(None)
    assert (vocab, kv_bytes) == (
        4096,
        2 * 2 * 2 * 64 * 4,
    )  # K+V x 2 layers x 2 KV heads x 64 x fp32
    assert users_for_kv_volume(0.02, kv_bytes, 1536) == int(0.02e9 / (2048 * 1536)) == 6
    assert users_for_kv_volume(1e-9, kv_bytes, 1536) == 1
    with pytest.raises(ValueError, match="unknown workload"):
        create_workload("nope", SPEC)


# -- metric math --------------------------------------------------------------------------------


def _rec(
    t_sent: float,
    ttft_ms: float,
    e2e_s: float,
    itl: tuple[float, ...],
    n_in: int = 100,
    n_out: int = 5,
):
    return RequestRecord(0, t_sent, n_in, n_out, ttft_ms / 1e3, e2e_s, itl)


def test_summary_percentiles_itl_and_token_rates() -> None:
    records = [
        _rec(0.0, 10, 1.0, (0.01, 0.03)),
        _rec(1.0, 20, 1.0, (0.02,)),
        _rec(2.0, 30, 1.0, ()),
        _rec(3.0, 40, 1.0, (0.04,)),  # last answer at 4.0 s: 4 s from first send
        RequestRecord(0, 3.5, 999, error="HTTP 500: x"),  # failures count nowhere
    ]
    r = summarize(
        "random",
        "pdx-store",
        records,
        PromptSources(local_compute=75, local_cache_hit=20, external_kv_transfer=5),
    )
    assert (r.ttft_ms_mean, r.ttft_ms_p50, r.ttft_ms_p90, r.ttft_ms_p99) == (25.0, 25.0, 37.0, 39.7)
    assert r.itl_ms_mean == 25.0  # mean of every gap: (10 + 30 + 20 + 40) / 4
    assert (
        r.input_tokens_per_s == 100.0 and r.output_tokens_per_s == 5.0
    )  # 400 and 20 tokens over 4 s
    assert r.hit_rate == 0.25


def test_summary_of_a_run_without_answers_is_null_not_a_crash() -> None:
    r = summarize("random", "none", [RequestRecord(0, 0.0, 10, error="refused")], None)
    assert r.ttft_ms_mean is None and r.ttft_ms_p99 is None and r.itl_ms_mean is None
    assert r.input_tokens_per_s == 0.0 and r.hit_rate is None


def test_hit_rate_from_engine_counter_deltas() -> None:
    def text(compute: int, cached: int, external: int) -> str:
        return "\n".join([
            "# TYPE vllm:prompt_tokens_by_source counter",
            f'vllm:prompt_tokens_by_source_total{{engine="0",model_name="tiny",source="local_compute"}} {compute}.0',
            f'vllm:prompt_tokens_by_source_total{{engine="0",model_name="tiny",source="local_cache_hit"}} {cached}.0',
            f'vllm:prompt_tokens_by_source_total{{engine="0",model_name="tiny",source="external_kv_transfer"}} {external}.0',
        ])  # fmt: skip

    before = [parse_prometheus_text(text(100, 0, 0)), parse_prometheus_text(text(50, 50, 0))]
    after = [parse_prometheus_text(text(130, 40, 30)), parse_prometheus_text(text(60, 90, 0))]
    sources = sources_delta(before, after)
    assert sources == PromptSources(local_compute=40, local_cache_hit=80, external_kv_transfer=30)
    assert sources.hit_rate == pytest.approx(110 / 150)
    assert sources_delta(before, [parse_prometheus_text("other 1"), None]) is None
    assert sources_delta([], []) is None


def test_json_has_exactly_the_documented_keys() -> None:
    r = summarize("multi-round-chat", "pdx-store", [_rec(0.0, 10, 1.0, (0.01,))], None)
    doc = results_json([r])
    assert list(doc) == ["results"]
    assert tuple(doc["results"][0]) == RESULT_KEYS == (
        "workload", "store", "system", "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_mean",
        "input_tokens_per_s", "output_tokens_per_s", "hit_rate",
    )  # fmt: skip
    assert doc["results"][0]["store"] is True and doc["results"][0]["hit_rate"] is None
    assert doc["results"][0]["system"] == "pdx-store"


# -- the load generator against fake engines over loopback ---------------------------------------


@pytest.fixture()
def harness():
    h = Harness()
    yield h
    h.stop()


def _run(
    harness: Harness, fake: FakeEngine, url: str, name: str, spec: WorkloadSpec, load: LoadSpec
):
    async def go():
        async with httpx.AsyncClient(timeout=10.0) as client:
            return await run_load(
                create_workload(name, spec), client, url, "tiny", load, max_tokens=4
            )

    return harness.call(go(), timeout=60.0)


def test_chat_users_send_the_next_turn_only_after_the_answer(harness: Harness) -> None:
    fake = FakeEngine("e0", role="both", num_chunks=6, delay_s=0.05)
    url = harness.serve(fake)
    records = _run(
        harness,
        fake,
        url,
        "multi-round-chat",
        SPEC,
        LoadSpec(qps=200, duration_s=0.8, arrival="uniform"),
    )
    assert records and all(r.is_ok for r in records)
    assert all(r.num_output_tokens == 6 and len(r.itl_s) == 5 and r.ttft_s >= 0.05 for r in records)
    for user in range(SPEC.num_users):
        mine = [r for r in records if r.user == user]
        assert len(mine) >= 2
        for a, b in zip(mine, mine[1:], strict=False):
            assert b.t_sent >= a.t_sent + a.e2e_s  # never two open turns per user
    sent = [tuple(q.body["prompt"]) for q in fake.requests]
    assert all(q.body["stream"] is True and q.body["model"] == "tiny" for q in fake.requests)
    assert all(p[:64] == sent[0][:64] for p in sent)
    assert max(map(len, sent)) > SPEC.system_tokens + SPEC.user_turn_tokens  # histories grew


def test_arrivals_stop_at_the_duration_and_open_requests_are_cut_after_the_drain(
    harness: Harness,
) -> None:
    fake = FakeEngine("e0", role="both", hang=True)
    url = harness.serve(fake)
    load = LoadSpec(qps=20, duration_s=0.5, arrival="uniform", drain_s=0.3)
    records = _run(harness, fake, url, "random", SPEC, load)
    assert 5 <= len(records) <= 10 and len(fake.requests) == len(records)
    assert all(r.error == "cancelled after the drain time" for r in records)


def test_cli_against_a_fake_writes_the_json_schema(harness: Harness, tmp_path, capsys) -> None:
    fake = FakeEngine("e0", role="both", num_chunks=4)
    url = harness.serve(fake)
    out = tmp_path / "serve.json"

    # The CLI runs its own event loop: run it in a thread beside the harness's loop.
    async def in_thread() -> int:
        return await asyncio.to_thread(serve.main, [
            "--url", url, "--workload", "random,long-doc-qa", "--qps", "20", "--duration", "0.5",
            "--arrival", "uniform", "--random-tokens", "32", "--doc-tokens", "64", "--json", str(out),
            "--no-progress", "--plot", str(tmp_path / "ttft.png"),
        ])  # fmt: skip

    assert harness.call(in_thread(), timeout=60.0) == 0
    doc = json.loads(out.read_text())
    assert [(r["workload"], r["store"]) for r in doc["results"]] == [
        ("random", False),
        ("long-doc-qa", False),
    ]
    for r in doc["results"]:
        assert tuple(r) == RESULT_KEYS
        assert r["ttft_ms_p50"] <= r["ttft_ms_p90"] <= r["ttft_ms_p99"]
        assert (
            r["input_tokens_per_s"] > 0
            and r["output_tokens_per_s"] > 0
            and not math.isnan(r["itl_ms_mean"])
        )
        assert r["hit_rate"] == 0.0  # the fake computes every prompt token itself
    assert (tmp_path / "ttft.png").stat().st_size > 0
    assert "random" in capsys.readouterr().out
    assert {len(q.body["prompt"]) for q in fake.requests} == {32, 64 + 32}


def test_cli_rejects_bad_combinations(capsys) -> None:
    assert serve.main(["--url", "http://127.0.0.1:9", "--workload", "nope"]) == 2
    assert serve.main(["--workload", "random"]) == 2  # neither --url nor --launch
    assert serve.main(["--url", "http://127.0.0.1:9", "--compare-no-store"]) == 2
    assert serve.main(["--url", "http://127.0.0.1:9", "--compare-lmcache"]) == 2
    assert "--compare-no-store and --compare-lmcache need --launch" in capsys.readouterr().err


def test_compare_lmcache_without_its_venv_says_how_to_install_before_starting_anything(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PDX_LMCACHE_VENV", str(tmp_path / "no-venv"))
    argv = ["--launch", "--compare-lmcache", "--topology", str(tmp_path / "never-read.yaml")]
    assert serve.main(argv) == 2
    assert "run scripts/setup-lmcache.sh" in capsys.readouterr().err


def test_launch_starts_store_and_router_then_reruns_without_the_store(
    harness: Harness, tmp_path
) -> None:
    """``--launch --compare-no-store`` on a topology of already-running (fake) engines: the real
    ``pdx store`` and ``pdx route`` processes start and stop, and both runs report."""
    from pdx.harness.process import free_port

    fakes = [FakeEngine(f"f{i}", role="both", num_chunks=4) for i in range(2)]
    urls = [harness.serve(f) for f in fakes]
    store_port, router_port = free_port(), free_port()
    sock = tmp_path / "store.sock"
    topology = tmp_path / "fleet.yaml"
    topology.write_text(
        "model: {name: tiny}\nengines:\n"
        + "".join(f"  - {{id: f{i}, url: '{u}', role: both, kind: vllm, kv_port: {free_port()}}}\n"
                  for i, u in enumerate(urls))
        + f"kv_secret: {FAKE_KV_SECRET}\n"
        + f"router: {{port: {router_port}, policies: {{disaggregate_min_tokens: 1000000}}, health: {{interval_s: 0.2}}}}\n"
        f"storage: {{socket: '{sock}', capacity_gb: 0.05, http_port: {store_port}, connector: {{store_socket: '{sock}'}}}}\n"
    )  # fmt: skip
    out = tmp_path / "serve.json"
    argv = ["--launch", "--topology", str(topology), "--compare-no-store", "--workload", "random",
            "--qps", "10", "--duration", "0.5", "--random-tokens", "16", "--json", str(out), "--no-progress",
            "--log-dir", str(tmp_path / "logs")]  # fmt: skip

    async def in_thread() -> int:
        return await asyncio.to_thread(serve.main, argv)

    assert harness.call(in_thread(), timeout=120.0) == 0
    doc = json.loads(out.read_text())
    assert [(r["workload"], r["store"], r["system"]) for r in doc["results"]] == [
        ("random", True, "pdx-store"),
        ("random", False, "none"),
    ]
    assert all(r["output_tokens_per_s"] > 0 and r["hit_rate"] == 0.0 for r in doc["results"])
    assert (
        sum(len(f.requests) for f in fakes) >= 2 * 2
    )  # both runs went through the router to the engines
    assert not sock.exists()  # the store was stopped and cleaned up
    assert (tmp_path / "logs" / "store" / "store.log").exists()


def test_launch_passes_only_the_store_settings_the_connector_accepts() -> None:
    from pdx.bench.serve_fleet import connector_store_extras
    from pdx.config import load_topology

    storage = dict(load_topology("configs/local-2x-store.yaml").storage)
    accepted, dropped = connector_store_extras(storage)
    assert (
        dropped == [] and accepted["store"]["socket"] == storage["socket"]
    )  # the shipped config is in use
    accepted, dropped = connector_store_extras({"connector": {"store_socket": "/x", "lease_s": 5}})
    assert accepted == {"lease_s": 5} and dropped == ["store_socket"]


# -- a real two-engine vLLM CPU fleet (slow) ----------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_launch_smoke_on_a_real_two_engine_fleet(tmp_path) -> None:
    """``--launch``: store, two vLLM CPU engines and the router start, serve and stop."""
    pytest.importorskip("vllm")
    out = tmp_path / "serve.json"
    argv = [
        "--launch", "--quick", "--workload", "multi-round-chat", "--qps", "2", "--duration", "6",
        "--users", "2", "--system-tokens", "256", "--user-context-tokens", "512", "--max-prompt-tokens", "1536",
        "--json", str(out), "--no-progress", "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert serve.main(argv) == 0  # holds the engine lock itself
    (result,) = json.loads(out.read_text())["results"]
    assert result["workload"] == "multi-round-chat" and result["store"] is True
    assert result["ttft_ms_mean"] > 0 and result["output_tokens_per_s"] > 0
    # Turn 2 of a user re-sends turn 1's prompt: the engines' prefix caches (or the store) serve part of it.
    assert 0.0 < result["hit_rate"] < 1.0
