"""Chunk keys: deterministic across processes, chained over prefixes, explicit about partial chunks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pdx import layout as L
from pdx.keys import KeyExtras, chunk_keys

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = KeyExtras("tiny-llama", "bfloat16", "abcd", (0, 4))
TOKENS = list(range(1000, 1000 + 600))  # 2 full chunks of 256 and a partial one of 88


def _hex(keys):
    return [k.hex for k in keys]


def test_same_keys_in_processes_with_different_hash_seeds():
    code = (
        "import json, sys; from pdx.keys import KeyExtras, chunk_keys\n"
        "e = KeyExtras('tiny-llama', 'bfloat16', 'abcd', (0, 4), sys.argv[1])\n"
        "print(json.dumps([k.hex for k in chunk_keys(list(range(1000, 1600)), e)]))\n"
    )
    for hash_name in ("sha256", "blake3"):
        if hash_name == "blake3":
            pytest.importorskip("blake3")
        outs = []
        for seed in ("0", "1", "random"):
            env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
            out = subprocess.run(
                [sys.executable, "-c", code, hash_name],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            outs.append(json.loads(out.stdout))
        assert (
            outs[0]
            == outs[1]
            == outs[2]
            == _hex(chunk_keys(TOKENS, replace(EXTRAS, hash_name=hash_name)))
        )


def test_keys_follow_the_documented_formula():
    """h_i = sha256(h_{i-1} || E || n_i as <u4 || tokens as <i4); E = sha256(canonical JSON extras)."""
    import hashlib
    import struct

    blob = json.dumps(
        {
            "v": 1,
            "model_id": "tiny-llama",
            "dtype": "bfloat16",
            "layout": "abcd",
            "heads": [0, 4],
            "hash": "sha256",
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    extra, h, expected = hashlib.sha256(blob).digest(), bytes(32), []
    for start in range(0, len(TOKENS), 256):
        chunk = TOKENS[start : start + 256]
        h = hashlib.sha256(
            h + extra + struct.pack("<I", len(chunk)) + struct.pack(f"<{len(chunk)}i", *chunk)
        ).digest()
        expected.append(h.hex())
    assert _hex(chunk_keys(TOKENS, EXTRAS)) == expected
    # pinned: a change of format orphans every stored chunk, so it must be deliberate
    assert expected[0] == "7411d2c8353bf3d147b58abcdcf0ee27b34db741c5b655a5966f651e2b264a1b"


def test_partial_last_chunk_is_keyed_with_its_length_or_dropped():
    keys = chunk_keys(TOKENS, EXTRAS)
    assert [(k.index, k.start, k.num_tokens, k.is_partial) for k in keys] == [
        (0, 0, 256, False),
        (1, 256, 256, False),
        (2, 512, 88, True),
    ]
    assert _hex(chunk_keys(TOKENS, EXTRAS, include_partial=False)) == _hex(keys[:2])
    assert chunk_keys(TOKENS[:512], EXTRAS, include_partial=False) == keys[:2]
    assert chunk_keys([], EXTRAS) == []


def test_keys_chain_over_the_prefix():
    keys = chunk_keys(TOKENS, EXTRAS)
    longer = chunk_keys(TOKENS + [7] * 300, EXTRAS)
    assert _hex(longer[:2]) == _hex(keys[:2])  # a shared prefix gives shared keys
    assert longer[2].hex != keys[2].hex  # the partial chunk grew into a full one
    changed = list(TOKENS)
    changed[10] += 1
    assert all(a.hex != b.hex for a, b in zip(chunk_keys(changed, EXTRAS), keys, strict=True))
    # continuing a chain from the previous digest gives the same keys as hashing everything
    tail = chunk_keys(TOKENS[256:], EXTRAS, prev=keys[0].digest)
    assert _hex(tail) == _hex(keys[1:])


def test_extras_separate_keys():
    base = _hex(chunk_keys(TOKENS, EXTRAS))
    for other in (
        replace(EXTRAS, model_id="other"),
        replace(EXTRAS, dtype="float16"),
        replace(EXTRAS, layout_fingerprint="ffff"),
        replace(EXTRAS, head_range=(4, 8)),
    ):
        assert not set(_hex(chunk_keys(TOKENS, other))) & set(base)
    if importlib.util.find_spec("blake3"):
        assert not set(_hex(chunk_keys(TOKENS, replace(EXTRAS, hash_name="blake3")))) & set(base)


def test_array_and_list_inputs_agree():
    arr = np.asarray(TOKENS)
    assert _hex(chunk_keys(arr, EXTRAS)) == _hex(chunk_keys(TOKENS, EXTRAS))
    assert _hex(chunk_keys(arr.astype(np.int32), EXTRAS)) == _hex(
        chunk_keys(arr.astype(np.uint32), EXTRAS)
    )


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        ([-1, 2], "in \\[0, 2\\*\\*31\\)"),
        ([2**31], "in \\[0"),
        ([[1, 2]], "one-dimensional"),
        ([1.5], "integers"),
    ],
)
def test_bad_tokens_are_rejected(tokens, match):
    with pytest.raises(ValueError, match=match):
        chunk_keys(tokens, EXTRAS)
    with pytest.raises(ValueError, match="unknown chunk-key hash"):
        chunk_keys(TOKENS, replace(EXTRAS, hash_name="md5"))


def test_extras_for_layout():
    layout = L.vllm_flash(2, 8, 64, 16, "bfloat16", tp_size=2, tp_rank=1)
    extras = KeyExtras.for_layout("m", layout)
    assert (extras.dtype, extras.head_range, extras.layout_fingerprint) == (
        "bfloat16",
        (4, 8),
        layout.fingerprint("m"),
    )
