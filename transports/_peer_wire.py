"""JSON descriptors for the library-backed transports (nixl, ucx, cuda_ipc).

A descriptor is untrusted input from a peer, so decoding validates every field
and maps any problem to ``DescriptorError``. Layout::

    {"kind": "nixl", "version": 1, "name": "nixl-1a2b", "regions": [[id, nbytes, addr, device], ...],
     "blob": "<base64>", "extra": {...}}

``blob`` carries backend bytes (NIXL agent metadata); ``extra`` small
transport-specific fields (listener address, IPC handles).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from .base import RegionInfo
from .errors import DescriptorError

VERSION = 1


@dataclass(frozen=True)
class PeerDescriptor:
    kind: str
    name: str
    regions: dict[int, RegionInfo]  # addr in RegionInfo.extra["addr"]
    blob: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def encode_descriptor(
    kind: str,
    name: str,
    regions: list[tuple[int, int, int, str]],  # (region_id, nbytes, addr, device)
    blob: bytes = b"",
    extra: dict[str, Any] | None = None,
) -> bytes:
    doc = {
        "kind": kind,
        "version": VERSION,
        "name": name,
        "regions": [list(r) for r in regions],
        "blob": base64.b64encode(blob).decode("ascii"),
        "extra": extra or {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_descriptor(data: bytes, kind: str) -> PeerDescriptor:
    """Parse and validate a descriptor of transport ``kind``; raises ``DescriptorError``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DescriptorError(f"a {kind} descriptor must be bytes, got {type(data).__name__}")
    try:
        doc = json.loads(bytes(data))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DescriptorError(f"malformed {kind} descriptor: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DescriptorError(f"malformed {kind} descriptor: expected an object")
    if doc.get("kind") != kind:
        raise DescriptorError(
            f"descriptor is for transport {doc.get('kind')!r}, not {kind!r}; "
            "both endpoints must use the same transport"
        )
    if doc.get("version") != VERSION:
        raise DescriptorError(f"{kind} descriptor version {doc.get('version')!r} is not {VERSION}")
    name = doc.get("name")
    rows = doc.get("regions")
    extra = doc.get("extra", {})
    if not isinstance(name, str) or not name or not isinstance(rows, list) or not isinstance(extra, dict):
        raise DescriptorError(f"malformed {kind} descriptor: bad name, regions or extra")
    regions: dict[int, RegionInfo] = {}
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in row[:3])
            or not isinstance(row[3], str)
            or row[1] <= 0
            or row[2] < 0
        ):
            raise DescriptorError(f"malformed {kind} descriptor: bad region row {row!r}")
        rid, nbytes, addr, device = row
        regions[rid] = RegionInfo(rid, nbytes, device, {"addr": addr})
    try:
        blob = base64.b64decode(doc.get("blob", ""), validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise DescriptorError(f"malformed {kind} descriptor: bad blob ({exc})") from exc
    return PeerDescriptor(kind, name, regions, blob, extra)
