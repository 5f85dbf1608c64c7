"""PdxConnector's store side against a real ``pdx store``, without an engine.

Paged KV tensors shaped like vLLM CPU's; scheduler-side requests are plain objects with
the fields vLLM's ``Request`` has. Saved blocks come back byte-exact into other blocks
of another "engine"; a store that is gone turns loads into load errors and saves into
no-ops, never exceptions.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from pdx.connector.config import StoreConfig  # noqa: E402
from pdx.connector.store_side import StoreScheduler, StoreWorker, key_extras  # noqa: E402
from pdx.engines.vllm.kv_caches import describe_kv_caches, host_layer_views  # noqa: E402
from pdx.errors import ConfigError  # noqa: E402
from pdx.keys import KeyExtras  # noqa: E402
from pdx.testing.vllm_request import FakeBlocks, FakeRequest, FakeStatus  # noqa: E402
from tests.storage.helpers import StoreProc  # noqa: E402

BLOCK = 16
CHUNK = 32  # 2 blocks per chunk
EXTRAS = KeyExtras("test-model", "float32", "test-layout")


def kv_caches(seed: int, num_blocks: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.attn": torch.randn(num_blocks, 2, BLOCK, 8, generator=g) for i in range(3)}


@pytest.fixture
def store(tmp_path):
    proc = StoreProc(tmp_path, capacity_gb=0.02, slab_mb=1.0)
    yield proc
    if proc.proc.poll() is None:
        assert proc.stop() == 0


def finish_and_save(sched: StoreScheduler, worker: StoreWorker, request, block_ids) -> None:
    """The request finishes: its save is queued (blocks never held), then copied at the next step."""
    assert sched.request_finished(request, block_ids) is None
    assert sched.has_pending_work()  # vLLM keeps stepping until the save is handed to the worker
    loads, saves = sched.take_specs()
    assert not loads and [s.req_id for s in saves] == [request.request_id]
    worker.save(saves)
    assert not sched.has_pending_work()


def sides(store: StoreProc, caches: dict[str, torch.Tensor], address: str | None = None,
          token: str = "") -> tuple[StoreScheduler, StoreWorker]:  # fmt: skip
    cfg = StoreConfig(address or store.socket, timeout_s=0.5, l2_budget_s=0.0, chunk_size=CHUNK, auth_token=token)
    worker = StoreWorker(cfg, BLOCK)
    memory = describe_kv_caches(caches)
    worker.register(memory.layout, host_layer_views(caches, memory))
    return StoreScheduler(cfg, BLOCK, EXTRAS), worker


def test_chunks_saved_by_one_engine_load_byte_exact_into_another(store):
    prompt = list(range(100, 100 + 3 * CHUNK + 5))  # 3 full chunks + a tail
    a_caches, b_caches = kv_caches(1), kv_caches(2)
    a_sched, a_worker = sides(store, a_caches)
    b_sched, b_worker = sides(store, b_caches)
    try:
        # A computed the prompt into blocks 5..11 and finished: its 3 full chunks are saved.
        a_blocks = [5, 6, 7, 8, 9, 10, 11]
        finish_and_save(a_sched, a_worker, FakeRequest("a", prompt, num_computed_tokens=len(prompt)), a_blocks)
        assert store.stats()["num_chunks"] == 3
        # A chunk is, for each layer in model order, its blocks in token order as the engine holds them.
        with a_worker.client.read_views(a_sched._keys(prompt, len(prompt))[1:2]) as (view,):
            want = torch.cat([a_caches[f"model.layers.{i}.attn"][[7, 8]].reshape(-1) for i in range(3)])
            assert bytes(view) == want.numpy().tobytes()
        # Saving again stores nothing new (the store skips the chunks it holds).
        finish_and_save(a_sched, a_worker, FakeRequest("a2", prompt, len(prompt)), a_blocks)
        assert store.stats()["num_chunks"] == 3
        assert a_worker.client.stats().num_saved == 3

        # B has the first block locally (a 16-token prefix-cache hit) and loads the rest.
        req = FakeRequest("b", prompt)
        assert b_sched.get_num_new_matched_tokens(req, BLOCK) == (3 * CHUNK - BLOCK, False)
        b_blocks = [0, 1, 2, 3, 4, 11, 10]
        before_hit = b_caches["model.layers.0.attn"][0].clone()
        assert b_sched.update_state_after_alloc(req, FakeBlocks(b_blocks), 3 * CHUNK - BLOCK)
        loads, _ = b_sched.take_specs()
        b_worker.load(loads[0])
        assert b_worker.pop_load_errors() == set()
        for name in a_caches:
            for i in range(1, 6):  # blocks of the 3 chunks beyond B's own hit
                assert torch.equal(b_caches[name][b_blocks[i]], a_caches[name][a_blocks[i]]), (name, i)
        assert torch.equal(b_caches["model.layers.0.attn"][0], before_hit)  # B's hit left alone
        # A request is offered a load once.
        assert b_sched.get_num_new_matched_tokens(req, 0) == (0, False)
    finally:
        for side in (a_sched, a_worker, b_sched, b_worker):
            side.shutdown()


def test_never_offers_the_last_prompt_token(store):
    prompt = list(range(7, 7 + 2 * CHUNK))  # exactly two chunks
    caches = kv_caches(3)
    sched, worker = sides(store, caches)
    try:
        finish_and_save(sched, worker, FakeRequest("a", prompt, len(prompt)), list(range(4)))
        # Two chunks stored, but the second holds the last prompt token: only one is offered.
        assert sched.get_num_new_matched_tokens(FakeRequest("b", prompt), 0) == (CHUNK, False)
    finally:
        sched.shutdown()
        worker.shutdown()


def test_store_gone_means_misses_and_load_errors_never_exceptions(store):
    prompt = list(range(50, 50 + 2 * CHUNK + 1))
    caches = kv_caches(4)
    sched, worker = sides(store, caches)
    try:
        finish_and_save(sched, worker, FakeRequest("a", prompt, len(prompt)), list(range(5)))
        req = FakeRequest("b", prompt)
        assert sched.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
        sched.update_state_after_alloc(req, FakeBlocks([6, 7, 8, 9, 10]), 2 * CHUNK)
        loads, _ = sched.take_specs()
        store.kill()
        worker.load(loads[0])  # the lookup said yes, the store died before the copy
        assert worker.pop_load_errors() == {6, 7, 8, 9}
        assert sched.get_num_new_matched_tokens(FakeRequest("c", prompt), 0) == (0, False)
        # A save while the store is gone is dropped without an error.
        finish_and_save(sched, worker, FakeRequest("d", prompt, len(prompt)), list(range(5)))
    finally:
        sched.shutdown()
        worker.shutdown()


def test_kv_memory_is_one_layout_and_each_layers_place_in_the_backing_buffers():
    from pdx.errors import LayoutError
    from pdx.layout import vllm_cpu

    raw = torch.zeros(3 * 12 * 2 * BLOCK * 8)  # vLLM: every layer in one backing buffer
    caches = {f"model.layers.{i}.attn": raw[i * 12 * 2 * BLOCK * 8:(i + 1) * 12 * 2 * BLOCK * 8].view(12, 2, BLOCK, 8)
              for i in (2, 0, 1)}  # fmt: skip
    memory = describe_kv_caches(caches, isa="vec16")
    assert memory.layout == vllm_cpu(3, 2, 4, BLOCK, "float32", isa="vec16")
    assert memory.layer_names == tuple(f"model.layers.{i}.attn" for i in range(3))  # model order
    assert memory.buffers == ((raw.data_ptr(), raw.numel() * 4),) and memory.num_blocks == 12
    assert memory.layer_buffers == tuple((0, i * 12 * memory.layout.page_nbytes) for i in range(3))
    views = host_layer_views(caches, memory)
    caches["model.layers.1.attn"][5] = 1.0
    assert views[1].view("float32").reshape(12, -1)[5].min() == 1.0 and not views[0].any()
    with pytest.raises(LayoutError, match="other layers"):
        describe_kv_caches({**caches, "model.layers.3.attn": torch.zeros(12, 2, BLOCK, 16)}, isa="vec16")


def test_chunk_keys_name_the_model_and_the_kv_layout():
    from pdx.layout import vllm_cpu

    f32, bf16 = vllm_cpu(2, 2, 64, 128, "float32"), vllm_cpu(2, 2, 64, 128, "bfloat16")
    extras = key_extras("tiny", f32)
    assert extras == KeyExtras("tiny", "float32", f32.fingerprint("tiny"), (0, 2))
    assert len({key_extras(*a).digest() for a in (("tiny", f32), ("tiny", bf16), ("other", f32))}) == 3


def test_chunk_size_must_be_whole_blocks(store):
    with pytest.raises(ConfigError, match="multiple of the engine's block_size"):
        StoreScheduler(StoreConfig(store.socket, chunk_size=24), BLOCK, EXTRAS)


def test_store_setting_is_validated():
    from pdx.connector.config import ConnectorConfig

    secrets = {"auth_token": "t", "kv_secret": "s"}
    cfg = ConnectorConfig.from_extra_config({**secrets, "store": {"socket": "/tmp/s.sock", "timeout_s": 0.2}})
    assert cfg.store == StoreConfig("/tmp/s.sock", timeout_s=0.2)
    assert ConnectorConfig.from_extra_config(secrets).store is None
    for bad in ({"socket": ""}, {"socket": "/s", "chunk_size": 0}, {"socket": "/s", "timeout_s": 0},
                {"socket": "/s", "bogus": 1}, {"timeout_s": 1.0}, {"socket": "pdx-store://host-without-port"}):
        with pytest.raises(ConfigError, match="kv_connector_extra_config"):
            ConnectorConfig.from_extra_config({"store": bad})


def test_one_step_saves_every_finished_request_at_once_and_never_twice(store):
    shared = list(range(900, 900 + CHUNK))  # both prompts start with this chunk
    p, q = shared + list(range(10, 10 + CHUNK + 3)), shared + list(range(20, 20 + CHUNK + 3))
    caches = kv_caches(5)
    sched, worker = sides(store, caches)
    try:
        assert sched.request_finished(FakeRequest("p", p, len(p)), [0, 1, 2, 3, 4]) is None
        assert sched.request_finished(FakeRequest("q", q, len(q)), [0, 1, 5, 6, 7]) is None
        # An aborted request saves nothing (its last step's KV may not be written).
        aborted = FakeRequest("x", list(range(5000, 5000 + 2 * CHUNK)), 2 * CHUNK)
        aborted.status = FakeStatus.FINISHED_ABORTED
        assert sched.request_finished(aborted, [8, 9, 10, 11]) is None
        loads, saves = sched.take_specs()
        assert not loads and [s.req_id for s in saves] == ["p", "q"]
        worker.save(saves)
        assert store.stats()["num_chunks"] == 3  # the shared chunk once, then one of each
        assert worker.client.stats().num_saved == 3
        for prompt, blocks in ((p, [0, 1, 2, 3]), (q, [0, 1, 5, 6])):
            req = FakeRequest("load-" + str(prompt[-1]), prompt)
            assert sched.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
            dst = [8, 9, 10, 11, 4]  # the last one holds the tail, which is computed, not loaded
            assert sched.update_state_after_alloc(req, FakeBlocks(dst), 2 * CHUNK)
            worker.load(sched.take_specs()[0][0])
            for name in caches:
                for i, b in enumerate(blocks):
                    assert torch.equal(caches[name][dst[i]], caches[name][b]), (name, i)
    finally:
        sched.shutdown()
        worker.shutdown()


def test_an_engine_on_another_node_shares_chunks_through_a_remote_store(tmp_path):
    """A's store setting is pdx-store://HOST:PORT (a transport to the store's arena); B is on the
    store's node (shared memory). B loads A's chunks byte-exact, and A loads B's."""
    store = StoreProc(tmp_path, capacity_gb=0.02, slab_mb=1.0,
                      extra=["--remote-listen", "127.0.0.1:0", "--remote-token", "t0k"])  # fmt: skip
    prompt = list(range(300, 300 + 2 * CHUNK + 1))
    a_caches, b_caches = kv_caches(6), kv_caches(7)
    a_sched, a_worker = sides(store, a_caches, store.remote_url, token="t0k")
    b_sched, b_worker = sides(store, b_caches)
    try:
        a_side, b_side = (a_sched, a_worker, a_caches), (b_sched, b_worker, b_caches)
        for (src, src_worker, src_caches), (dst, dst_worker, dst_caches), tag, shift in (
            (a_side, b_side, "ab", 0), (b_side, a_side, "ba", 5000),  # remote -> local, local -> remote
        ):
            tokens = [t + shift for t in prompt]
            finish_and_save(src, src_worker, FakeRequest(f"{tag}-save", tokens, len(tokens)), [0, 1, 2, 3, 4])
            req = FakeRequest(f"{tag}-load", tokens)
            assert dst.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
            dst.update_state_after_alloc(req, FakeBlocks([7, 8, 9, 10, 11]), 2 * CHUNK)
            dst_worker.load(dst.take_specs()[0][0])
            assert dst_worker.pop_load_errors() == set()
            for name in src_caches:
                for i in range(4):
                    assert torch.equal(dst_caches[name][7 + i], src_caches[name][i]), (tag, name, i)
        stats = store.stats()
        assert stats["remote_saved_chunks"] == 2 and stats["remote_loaded_chunks"] == 2
    finally:
        for side in (a_sched, a_worker, b_sched, b_worker):
            side.shutdown()
        assert store.stop() == 0
