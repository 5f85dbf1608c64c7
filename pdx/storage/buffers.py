"""Chunk keys and buffers as the client sends and copies them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def key_bytes(keys: Sequence[Any]) -> list[bytes]:
    """Chunk keys as bytes: ``bytes`` or ``pdx.keys.ChunkKey`` (its ``digest``)."""
    return [k if isinstance(k, bytes) else k.digest for k in keys]


def byte_view(buf: Any, *, writable: bool) -> np.ndarray:
    """A flat uint8 numpy view of one chunk buffer (no copy); ValueError if it cannot be one."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"chunk buffers must be in host memory, got a {buf.device} tensor")
        if not buf.is_contiguous():
            raise ValueError("chunk buffers must be contiguous")
        buf = buf.detach().reshape(-1).view(torch.uint8).numpy()
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("chunk buffers must be C-contiguous")
    if writable and not arr.flags.writeable:
        raise ValueError("destination buffer is read-only")
    return arr.reshape(-1).view(np.uint8)
