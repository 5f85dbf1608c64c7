"""PdxConnector's scheduler side with stand-in requests: what each role asks of its workers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from pdx.connector import protocol, signing  # noqa: E402
from pdx.connector.figures import TransferFigures  # noqa: E402
from pdx.engines.vllm.metadata import PdxWorkerMeta  # noqa: E402
from pdx.engines.vllm.scheduler import PdxScheduler  # noqa: E402
from pdx.testing.vllm_request import FakeBlocks, FakeRequest, FakeStatus  # noqa: E402

TID = "ab" * 16
SECRET = "unit-secret"


def _scheduler(is_producer: bool, is_consumer: bool) -> PdxScheduler:
    return PdxScheduler(128, is_producer, is_consumer, signing.TransferVerifier(SECRET))


def _prefill(tid=TID):
    return signing.sign(protocol.prefill_params(tid), SECRET)


def _decode(tid=TID, host="127.0.0.1", port=15600):
    return signing.sign(protocol.decode_params(tid, host, port), SECRET)


def _request(rid, params, num_prompt_tokens=300, num_computed_tokens=0):
    return FakeRequest(rid, list(range(num_prompt_tokens)), num_computed_tokens, params)


def test_prefill_saves_each_step_then_holds_blocks_until_sent():
    s = _scheduler(True, False)
    s.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: ([7, 8, 9],))
    req = _request("p1", _prefill(), num_computed_tokens=128)  # 128 cached locally
    s.on_new_request(req)
    meta = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 100, "other": 5}))
    (save,) = meta.saves
    assert (save.start, save.end, save.block_ids) == (0, 228, (7, 8, 9))  # cached prefix goes too
    req.num_computed_tokens = 228
    (save,) = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 72})).saves
    assert (save.start, save.end) == (228, 300)

    delay, params = s.request_finished(req, [7, 8, 9])
    assert delay and params["pdx_transfer_id"] == TID
    assert s.has_pending_push_work()
    (finish,) = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).finishes
    assert finish.is_held and not finish.is_aborted
    s.update_connector_output(SimpleNamespace(finished_sending={"p1"}, finished_recving=None,
                                              kv_connector_worker_meta=None))
    assert not s.has_pending_push_work()


def test_prefill_that_never_ran_holds_nothing():
    s = _scheduler(True, False)
    req = _request("p1", _prefill())
    s.on_new_request(req)
    req.status = FakeStatus.FINISHED_ABORTED
    assert s.request_finished(req, []) == (False, None)
    (finish,) = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).finishes
    assert not finish.is_held


def test_decode_loads_once_beyond_its_local_hit_and_releases_on_abort():
    s = _scheduler(False, True)
    req = _request("d1", _decode())
    assert s.get_num_new_matched_tokens(req, 128) == (172, True)
    s.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 172)
    (recv,) = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).recvs
    assert (recv.first_block, recv.num_tokens, recv.block_ids, recv.peer) == (1, 300, (4, 5, 6), ("127.0.0.1", 15600))
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)  # after a failure: recompute
    req.status = FakeStatus.FINISHED_ABORTED
    assert s.request_finished(req, [4, 5, 6]) == (False, None)
    (release,) = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).releases
    assert release.is_reserved and release.transfer_id == TID


def test_decode_answer_carries_transfer_figures():
    s = _scheduler(False, True)
    req = _request("d1", _decode())
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, FakeBlocks([1, 2, 3]), 300)
    fig = TransferFigures(TID, True, None, 4096, 300, 2, 1.5, 20.25, 3.0, 1.7e9, 1.0, 2.0)
    s.update_connector_output(SimpleNamespace(finished_sending=None, finished_recving={"d1"},
                                              kv_connector_worker_meta=PdxWorkerMeta({"d1": fig})))
    assert s.request_finished(req, [1, 2, 3]) == (False, {protocol.STATS: {
        "transfer_id": TID, "ok": True, "error": None, "nbytes": 4096, "num_tokens": 300, "num_writes": 2,
        "transfer_ms": 1.5, "wait_ms": 20.25, "exposed_ms": 3.0, "t_done": 1.7e9,
        "last_post_ms": 1.0, "last_write_ms": 2.0}})


def test_requests_without_pdx_params_are_left_alone():
    s = _scheduler(True, True)
    req = _request("x", None)
    s.on_new_request(req)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert s.request_finished(req, [1]) == (False, None)


@pytest.mark.parametrize("case", ["unsigned", "tampered_peer", "wrong_key", "expired", "replayed"])
def test_decode_leg_the_router_did_not_issue_is_served_locally(case):
    """Finding 1: D never connects to a peer named in params the router did not sign."""
    s = _scheduler(False, True)
    params = {
        "unsigned": protocol.decode_params(TID, "127.0.0.1", 15600),
        "tampered_peer": {**_decode(), "pdx_peer": "10.6.6.6:15600"},
        "wrong_key": signing.sign(protocol.decode_params(TID, "127.0.0.1", 15600), "other-fleet"),
        "expired": signing.sign(protocol.decode_params(TID, "127.0.0.1", 15600), SECRET, ttl_s=-1),
        "replayed": _decode(),
    }[case]
    if case == "replayed":
        first = _request("d0", params)
        assert s.get_num_new_matched_tokens(first, 0) == (300, True)
    req = _request("d1", params)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 0)
    meta = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert meta.recvs == [] and not s.is_decode_leg(req)
    assert s.request_finished(req, [4, 5, 6]) == (False, None)
    assert s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).releases == []  # no peer contacted
    expected = {"tampered_peer": "bad_signature", "wrong_key": "bad_signature"}.get(case, case)
    assert s.num_refused == {expected: 1}


def test_prefill_leg_the_router_did_not_issue_holds_nothing():
    s = _scheduler(True, False)
    s.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: ([7, 8, 9],))
    req = _request("p1", protocol.prefill_params(TID))
    s.on_new_request(req)
    assert s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 300})).saves == []
    assert s.request_finished(req, [7, 8, 9]) == (False, None)
    assert not s.has_pending_push_work() and s.num_refused == {"unsigned": 1}
