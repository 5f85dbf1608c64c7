"""Chunk keys: chained content hashes that name a chunk of KV identically in every process.

``h_i = H(h_{i-1} || E || n_i || tokens_i)`` where ``H`` is sha256 (default) or blake3,
``h_{-1}`` is 32 zero bytes, ``E`` is the digest of the ``KeyExtras`` (model id, dtype,
layout fingerprint, head range and the hash name itself, so peers that hash differently
never share keys), ``n_i`` is the chunk's token count as 4 little-endian bytes and
``tokens_i`` its token ids as little-endian int32. Never Python ``hash()``: keys do not
depend on ``PYTHONHASHSEED``.

Partial last chunk: when ``len(tokens)`` is not a multiple of ``chunk_size`` the tail
gets a key too, marked ``is_partial``; its length is hashed in, so it never equals the
key of a full chunk. Pass ``include_partial=False`` to drop it (for example, a store
that keeps full chunks only).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HASH_NAMES = ("sha256", "blake3")
DEFAULT_HASH = "sha256"  # in hashlib everywhere; as fast as blake3 for 1 KiB chunks
DEFAULT_CHUNK_SIZE = 256
_ZERO = bytes(32)


def _hasher(name: str) -> Any:
    if name == "sha256":
        return hashlib.sha256
    if name == "blake3":
        try:
            from blake3 import blake3
        except ImportError as exc:
            raise ValueError("hash 'blake3' needs the blake3 package (pip install blake3)") from exc
        return blake3
    raise ValueError(f"unknown chunk-key hash {name!r}; use one of {HASH_NAMES}")


@dataclass(frozen=True)
class KeyExtras:
    """Everything besides token ids that makes two chunks' KV differ."""

    model_id: str
    dtype: str = ""
    layout_fingerprint: str = ""  # PagedKVLayout.fingerprint(model_id)
    head_range: tuple[int, int] = (0, 0)  # global KV heads the chunk holds; (0, 0) = all
    hash_name: str = DEFAULT_HASH

    def digest(self) -> bytes:
        blob = json.dumps(
            {
                "v": 1,
                "model_id": self.model_id,
                "dtype": self.dtype,
                "layout": self.layout_fingerprint,
                "heads": list(self.head_range),
                "hash": self.hash_name,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        return bytes(_hasher(self.hash_name)(blob).digest())

    @classmethod
    def for_layout(cls, model_id: str, layout: Any, hash_name: str = DEFAULT_HASH) -> KeyExtras:
        """Extras of a ``PagedKVLayout`` (dtype, fingerprint, head range)."""
        return cls(
            model_id,
            layout.dtype,
            layout.fingerprint(model_id),
            tuple(layout.head_range),
            hash_name,
        )


@dataclass(frozen=True)
class ChunkKey:
    digest: bytes  # 32 bytes
    index: int  # chunk number within the request
    start: int  # first token of the chunk
    num_tokens: int  # chunk_size, or fewer for a partial last chunk
    is_partial: bool = False

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def __str__(self) -> str:
        return self.hex


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> memoryview:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.dtype("<i4"):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**31):
            raise ValueError("token ids must be in [0, 2**31)")
        arr = arr.astype("<i4")
    elif arr.size and int(arr.min()) < 0:
        raise ValueError("token ids must be in [0, 2**31)")
    return memoryview(np.ascontiguousarray(arr).tobytes())


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    extras: KeyExtras,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    include_partial: bool = True,
    prev: bytes = _ZERO,
) -> list[ChunkKey]:
    """Keys of ``tokens`` split into ``chunk_size``-token chunks, in order.

    ``prev`` continues a chain (the digest of the chunk before ``tokens[0]``); the first
    chunk's ``start``/``index`` are then relative to ``tokens``. A 1-D int numpy array is
    the fast input (128K tokens hash in about 2 ms); a list is converted first.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    empty = _hasher(extras.hash_name)()  # copy() is much cheaper than a constructor under OpenSSL 3
    extra = extras.digest()
    data = _token_bytes(tokens)
    num_tokens = len(data) // 4
    keys: list[ChunkKey] = []
    for index, start in enumerate(range(0, num_tokens, chunk_size)):
        n = min(chunk_size, num_tokens - start)
        if n < chunk_size and not include_partial:
            break
        h = empty.copy()
        h.update(prev)
        h.update(extra)
        h.update(struct.pack("<I", n))
        h.update(data[start * 4 : (start + n) * 4])
        prev = h.digest()
        keys.append(ChunkKey(prev, index, start, n, n < chunk_size))
    return keys


def num_full_chunks(num_tokens: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    return num_tokens // chunk_size
