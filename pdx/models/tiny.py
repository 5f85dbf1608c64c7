"""The built-in tiny model: a Llama-style model directory built offline, in about 2 s.

``pdx make-tiny-model [--out DIR] [--seed 0] [--max-model-len 8192] [--num-layers 2] [--force]``

It exists so that end-to-end tests and benchmarks run real vLLM engines with no
download. The directory holds:

- ``tokenizer.json``: byte-level BPE (vocab 4096, specials ``<s> </s> <pad>`` = ids
  0, 1, 2) trained with the ``tokenizers`` library on a fixed, ordered list of the
  Python standard library's ``.py`` files;
- ``tokenizer_config.json``: ``PreTrainedTokenizerFast``, ``add_bos_token`` false,
  and a small chat template so ``/v1/chat/completions`` works;
- ``config.json``: ``LlamaForCausalLM``, hidden 256, 2 layers (``num_layers``), 4 heads,
  2 KV heads, head_dim 64, float32;
- ``model.safetensors``: *seeded random* weights (about 3.3M parameters). Never use
  ``--load-format dummy`` instead: with dummy weights the output depends only on the
  last prompt token, so a test cannot notice wrong KV. With these weights, changing
  the first of 500 prompt tokens changes the output.
- ``pdx-tiny-model.json``: what built it (builder version, spec, corpus digest). A
  directory whose manifest matches is reused as is.

The default directory is keyed on the spec: the default spec builds into
``default_model_dir()``, any other spec into a sibling named after the fields that
differ (``tiny-llama-layers8``), so builds of different shapes never replace each
other's files under a running engine.

The weights are a pure function of the seed (same seed, same bytes, on any
machine). The tokenizer is a pure function of the corpus, whose digest is
recorded: Python versions with different standard-library sources give different
(equally valid) tokenizers. Tests should send prompts as token ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1  # bump when the produced files change
MANIFEST = "pdx-tiny-model.json"
SERVED_MODEL_NAME = "tiny"
DEFAULT_MAX_MODEL_LEN = 8192  # room for 4096-token prompts plus output

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# Fixed and ordered: the tokenizer depends on this list and on nothing else.
CORPUS_FILES = (
    "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/tasks.py", "base64.py",
    "bisect.py", "calendar.py", "collections/__init__.py", "configparser.py", "contextlib.py",
    "csv.py", "dataclasses.py", "datetime.py", "decimal.py", "difflib.py", "email/message.py",
    "enum.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "gzip.py", "heapq.py",
    "http/client.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "mailbox.py", "os.py", "pathlib.py", "pickle.py", "pprint.py",
    "random.py", "shutil.py", "socket.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "textwrap.py", "threading.py", "typing.py", "urllib/parse.py", "uuid.py",
    "zipfile.py",
)  # fmt: skip

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model; ``seed`` fixes the weights."""

    seed: int = 0
    max_model_len: int = DEFAULT_MAX_MODEL_LEN  # becomes max_position_embeddings
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64


# Directory-name tags of spec fields (a field without one is tagged by its own name).
_DIR_TAGS = {"num_layers": "layers", "max_model_len": "len"}


def default_model_dir(spec: TinyModelSpec | None = None) -> Path:
    """``$PDX_TINY_MODEL_DIR`` or ``~/.cache/pdx/tiny-llama`` for the default spec; for any
    other spec a sibling whose name lists the fields that differ (``tiny-llama-layers8``)."""
    env = os.environ.get("PDX_TINY_MODEL_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "pdx" / "tiny-llama"
    if spec is None:
        return base
    default = asdict(TinyModelSpec())
    tags = [f"{_DIR_TAGS.get(k, k)}{v}" for k, v in asdict(spec).items() if v != default[k]]
    return base.with_name("-".join([base.name, *tags])) if tags else base


def corpus_paths() -> list[Path]:
    """The standard-library files the tokenizer is trained on, in order (missing ones skipped)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / name for name in CORPUS_FILES if (stdlib / name).is_file()]


def corpus_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def train_tokenizer(spec: TinyModelSpec, paths: list[Path]):  # -> tokenizers.Tokenizer
    """Byte-level BPE over ``paths``; specials get ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not paths:
        raise FileNotFoundError(
            "no training text found for the tiny model's tokenizer "
            f"(looked for {len(CORPUS_FILES)} files under {sysconfig.get_paths()['stdlib']})"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(
        (p.read_text(encoding="utf-8", errors="replace") for p in paths), trainer=trainer
    )
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, token
    return tokenizer


def random_weights(spec: TinyModelSpec) -> dict:  # name -> np.ndarray (float32)
    """Seeded random Llama weights; same seed, same values, on any machine."""
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    h, inter, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d

    def normal(shape: tuple[int, ...], std: float):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    # Sharp attention (q/k 0.15) makes every output depend on the whole prompt.
    weights = {"model.embed_tokens.weight": normal((spec.vocab_size, h), 1.0)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        weights[f"{p}.input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        weights[f"{p}.self_attn.q_proj.weight"] = normal((q_out, h), 0.15)
        weights[f"{p}.self_attn.k_proj.weight"] = normal((kv_out, h), 0.15)
        weights[f"{p}.self_attn.v_proj.weight"] = normal((kv_out, h), 0.1)
        weights[f"{p}.self_attn.o_proj.weight"] = normal((h, q_out), 0.1)
        weights[f"{p}.post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
        weights[f"{p}.mlp.gate_proj.weight"] = normal((inter, h), 0.1)
        weights[f"{p}.mlp.up_proj.weight"] = normal((inter, h), 0.1)
        weights[f"{p}.mlp.down_proj.weight"] = normal((h, inter), 0.05)
    weights["model.norm.weight"] = np.ones(h, dtype=np.float32)
    weights["lm_head.weight"] = normal((spec.vocab_size, h), 0.05)
    return weights


def model_config(spec: TinyModelSpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_model_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }


def tokenizer_config(spec: TinyModelSpec) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_model_len,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _manifest(spec: TinyModelSpec, digest: str) -> dict:
    return {"builder_version": BUILDER_VERSION, "corpus_sha256": digest, **asdict(spec)}


def _is_current(out_dir: Path, expected: dict) -> bool:
    try:
        return json.loads((out_dir / MANIFEST).read_text()) == expected
    except (OSError, ValueError):
        return False


def write_model(out_dir: Path, spec: TinyModelSpec, paths: list[Path]) -> None:
    """Write every file of the model into the existing directory ``out_dir``."""
    from safetensors.numpy import save_file

    tokenizer = train_tokenizer(spec, paths)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(spec))
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    )
    _write_json(out_dir / "config.json", model_config(spec))
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID},
    )
    save_file(random_weights(spec), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def build_tiny_model(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    num_layers: int = 2,
    force: bool = False,
) -> Path:
    """Build the tiny model into ``out_dir`` (default ``default_model_dir(spec)``) and return it.

    An existing directory whose manifest matches (builder version, spec, corpus) is
    reused unless ``force``. The build goes to a temporary sibling directory that is
    renamed into place, so concurrent builders never see a half-written model.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    spec = TinyModelSpec(seed=seed, max_model_len=max_model_len, num_layers=num_layers)
    out = Path(out_dir).expanduser() if out_dir is not None else default_model_dir(spec)
    paths = corpus_paths()
    expected = _manifest(spec, corpus_digest(paths))
    if not force and _is_current(out, expected):
        logger.debug("reusing tiny model at %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_model(tmp, spec, paths)
        _write_json(tmp / MANIFEST, expected)
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            if not force and _is_current(out, expected):  # another builder finished first
                return out
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_current(out, expected):  # lost a race to an incompatible build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny model (seed %d, %d layers) at %s", seed, num_layers, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pdx make-tiny-model", description="Build the built-in tiny Llama model offline."
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"output directory (default {default_model_dir()}, or a sibling named after "
        "the options that differ from their defaults)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=DEFAULT_MAX_MODEL_LEN,
        help=f"max_position_embeddings (default {DEFAULT_MAX_MODEL_LEN})",
    )
    parser.add_argument("--num-layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    if args.max_model_len < 64:
        parser.error("--max-model-len must be at least 64")
    if args.num_layers < 1:
        parser.error("--num-layers must be at least 1")
    out = build_tiny_model(
        args.out,
        seed=args.seed,
        max_model_len=args.max_model_len,
        num_layers=args.num_layers,
        force=args.force,
    )
    print(out)
    return 0
