"""Where P sends a layer from: before its attention when the KV is already written, else after."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.model_executor.layers.attention.attention import Attention  # noqa: E402

from pdx.engines import vllm as pdx_vllm  # noqa: E402
from pdx.engines.vllm.metadata import PdxConnectorMetadata, SaveSpec  # noqa: E402


def _layer(cls=Attention, writes_in_forward=False, shares_kv_with=None):
    layer = object.__new__(cls)  # no nn.Module init: only the attributes the check reads
    layer.__dict__.update(
        attn_backend=SimpleNamespace(forward_includes_kv_cache_update=writes_in_forward),
        kv_sharing_target_layer_name=shares_kv_with,
    )
    return layer


class Worker:
    def __init__(self, is_producer=True):
        self.is_producer = is_producer
        self.sent: list[str] = []
        self.attention_done_for: list[str] = []

    def save_kv_layer(self, layer_name, kv_layer, meta):
        assert meta.saves and kv_layer == f"kv-{layer_name}"
        self.sent.append(layer_name)

    def attention_done(self, layer_name, meta):
        self.attention_done_for.append(layer_name)


@pytest.fixture
def connector(monkeypatch):
    layers = {
        "early": _layer(),
        "writes_in_forward": _layer(writes_in_forward=True),
        "shared": _layer(shares_kv_with="early"),
        "subclass": _layer(type("OtherAttention", (Attention,), {})),
    }
    import vllm.model_executor.layers.attention.attention as attention

    monkeypatch.setattr(attention, "get_attention_context",
                        lambda name: (None, layers[name], f"kv-{name}", None))  # fmt: skip
    c = object.__new__(pdx_vllm.PdxConnector)
    c.worker = Worker()
    c._kv_written_before_attention = {}
    meta = PdxConnectorMetadata(saves=[SaveSpec("r", "t", (1,), 0, 8, 8)])
    c._get_connector_metadata = lambda: meta
    return c


def _run_layer(c, name):
    c.wait_for_layer_load(name)
    before = list(c.worker.sent)
    c.save_kv_layer(name, f"kv-{name}", None)
    return before, c.worker.sent


def test_a_layer_whose_kv_is_written_first_is_sent_before_its_attention_once(connector):
    assert _run_layer(connector, "early") == (["early"], ["early"])
    assert connector.worker.attention_done_for == ["early"]  # its attention time still noted


@pytest.mark.parametrize("name", ["writes_in_forward", "shared", "subclass"])
def test_other_layers_are_sent_after_their_attention_once(connector, name):
    assert _run_layer(connector, name) == ([], [name])


def test_a_decoder_sends_nothing(connector):
    connector.worker = Worker(is_producer=False)
    connector.wait_for_layer_load("early")
    assert connector.worker.sent == []


def test_p_notes_when_each_transfers_last_layer_finished_attention(tmp_path):
    import json

    from pdx.connector.config import ConnectorConfig
    from pdx.engines.vllm.worker import PdxWorker

    stats = tmp_path / "p.jsonl"
    worker = PdxWorker(ConnectorConfig(stats_path=str(stats)), 16, True, False, "p")
    worker._prefill = SimpleNamespace(pop_released=lambda: [])
    worker._layer_index = {"l0": 0, "l1": 1}
    first_step = PdxConnectorMetadata(saves=[SaveSpec("r", "t", (1,), 0, 8, 16)])
    last_step = PdxConnectorMetadata(saves=[SaveSpec("r", "t", (1, 2), 8, 16, 16)])
    worker.attention_done("l1", first_step, 1.0)  # prompt not done yet
    worker.attention_done("l0", last_step, 2.0)  # not the last layer
    worker.attention_done("l1", last_step, 3.0)
    assert worker.get_finished() == (None, None)
    lines = [json.loads(x) for x in stats.read_text().splitlines()]
    assert lines == [{"side": "prefill", "transfer_id": "t", "t_attention_done": 3.0}]
    worker.get_finished()
    assert len(stats.read_text().splitlines()) == 1  # written once
