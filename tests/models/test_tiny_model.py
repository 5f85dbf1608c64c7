"""The built-in tiny model: deterministic, complete, and reused when up to date."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from pdx.models import tiny  # noqa: E402

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    tiny.MANIFEST,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny.build_tiny_model(root / "a", seed=0), root


def test_same_seed_gives_same_bytes(built):
    first, root = built
    second = tiny.build_tiny_model(root / "b", seed=0)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_other_seed_gives_other_weights(built):
    first, root = built
    other = tiny.build_tiny_model(root / "c", seed=1)
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_weights_have_llama_names_shapes_and_float32(built):
    from safetensors.numpy import load_file

    model, _ = built
    weights = load_file(str(model / "model.safetensors"))
    spec = tiny.TinyModelSpec()
    assert weights["model.embed_tokens.weight"].shape == (spec.vocab_size, spec.hidden_size)
    assert weights["lm_head.weight"].shape == (spec.vocab_size, spec.hidden_size)
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    k = weights["model.layers.1.self_attn.k_proj.weight"]
    assert q.shape == (spec.num_heads * spec.head_dim, spec.hidden_size)
    assert k.shape == (spec.num_kv_heads * spec.head_dim, spec.hidden_size)
    assert all(w.dtype.name == "float32" for w in weights.values())
    assert 0.9 < float(weights["model.embed_tokens.weight"].std()) < 1.1  # not a constant fill
    assert len(weights) == 3 + 9 * spec.num_layers


def test_config_and_tokenizer_agree(built):
    from tokenizers import Tokenizer

    model, _ = built
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] >= 4096 + 64
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"] == 4096
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [
        config["bos_token_id"],
        config["eos_token_id"],
        config["pad_token_id"],
    ]
    text = "def prefill(block_ids):\n    return [b * 2 for b in block_ids]  # ünïcode"
    assert tok.decode(tok.encode(text).ids) == text
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False and "chat_template" in tok_config


def test_up_to_date_dir_is_reused_and_stale_one_rebuilt(built):
    model, _ = built
    marker = model / "marker"
    marker.write_text("kept")
    assert tiny.build_tiny_model(model, seed=0) == model
    assert marker.exists()  # reused, not rebuilt
    manifest = json.loads((model / tiny.MANIFEST).read_text())
    (model / tiny.MANIFEST).write_text(json.dumps({**manifest, "builder_version": 0}))
    tiny.build_tiny_model(model, seed=0)
    assert not marker.exists()  # stale manifest: rebuilt
    assert json.loads((model / tiny.MANIFEST).read_text()) == manifest


def test_cli_prints_the_directory(tmp_path, capsys):
    assert tiny.main(["--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / tiny.MANIFEST).read_text())["seed"] == 3


def test_layer_count_sets_config_and_weights_and_keys_the_default_dir(monkeypatch, tmp_path):
    from safetensors.numpy import load_file

    monkeypatch.setenv("PDX_TINY_MODEL_DIR", str(tmp_path / "tiny-llama"))
    shallow = tiny.build_tiny_model()
    deep = tiny.build_tiny_model(num_layers=3)
    assert shallow == tmp_path / "tiny-llama"
    assert deep == tmp_path / "tiny-llama-layers3"  # a different spec never replaces the default
    for model, num_layers in ((shallow, 2), (deep, 3)):
        config = json.loads((model / "config.json").read_text())
        assert config["num_hidden_layers"] == num_layers
        weights = load_file(str(model / "model.safetensors"))
        assert len(weights) == 3 + 9 * num_layers
        assert f"model.layers.{num_layers - 1}.mlp.down_proj.weight" in weights
        assert json.loads((model / tiny.MANIFEST).read_text())["num_layers"] == num_layers
    assert tiny.build_tiny_model() == shallow  # both stay current side by side
    assert json.loads((shallow / "config.json").read_text())["num_hidden_layers"] == 2


def test_default_dir_names_every_field_that_differs(monkeypatch, tmp_path):
    monkeypatch.setenv("PDX_TINY_MODEL_DIR", str(tmp_path / "m"))
    assert (
        tiny.default_model_dir() == tiny.default_model_dir(tiny.TinyModelSpec()) == tmp_path / "m"
    )
    spec = tiny.TinyModelSpec(seed=1, max_model_len=16384, num_layers=8)
    assert tiny.default_model_dir(spec) == tmp_path / "m-seed1-len16384-layers8"


def test_bad_layer_count_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="num_layers"):
        tiny.build_tiny_model(tmp_path / "m", num_layers=0)
    with pytest.raises(SystemExit):
        tiny.main(["--out", str(tmp_path / "m"), "--num-layers", "0"])
    assert "--num-layers" in capsys.readouterr().err
