"""Descriptor wire format shared by the pdx transports.

A descriptor is UTF-8 JSON (untrusted input: it comes from a peer)::

    {"pdx": 1, "kind": "tcp", "name": "...", "instance": "<nonce>", "host": "<host id>",
     "address": {...}, "regions": [{"region_id", "nbytes", "device", "extra"}], "caps": {...}}

``instance`` is random per transport object, so a descriptor taken from a peer that
has since restarted is recognised as stale. ``host`` identifies the machine (same
host -> same-host media such as ``shm`` are possible). ``caps`` carries what
``auto`` needs to pick a medium.
"""

from __future__ import annotations

import functools
import json
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base import RegionInfo
from .errors import DescriptorError

if TYPE_CHECKING:
    from .base import Transport

WIRE_VERSION = 1


@dataclass(frozen=True)
class Descriptor:
    kind: str
    name: str
    instance: str  # nonce of the transport object that wrote it
    host: str  # host identity, see host_id()
    address: dict[str, Any]  # transport-specific: host/port, socket path, agent metadata
    regions: dict[int, RegionInfo]
    caps: dict[str, Any] = field(default_factory=dict)


@functools.cache
def host_id() -> str:
    """Hostname plus kernel boot id: equal only for endpoints on the same running host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}/{boot}"


def encode_descriptor(
    transport: Transport,
    instance: str,
    address: dict[str, Any],
    caps: dict[str, Any] | None = None,
) -> bytes:
    regions = [
        {"region_id": r.region_id, "nbytes": r.nbytes, "device": r.device, "extra": r.extra}
        for r in transport.regions.values()
    ]
    doc = {
        "pdx": WIRE_VERSION,
        "kind": transport.kind,
        "name": transport.name,
        "instance": instance,
        "host": host_id(),
        "address": address,
        "regions": regions,
        "caps": caps or {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_descriptor(data: bytes, kind: str | None = None) -> Descriptor:
    """Parse and validate a peer descriptor. Raises ``DescriptorError`` naming what is wrong."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class _Region(BaseModel):
        model_config = ConfigDict(extra="forbid")
        region_id: int = Field(ge=0)
        nbytes: int = Field(gt=0)
        device: str = "cpu"
        extra: dict[str, Any] = {}

    class _Doc(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pdx: int
        kind: str
        name: str = Field(min_length=1)
        instance: str = Field(min_length=1)
        host: str
        address: dict[str, Any]
        regions: list[_Region]
        caps: dict[str, Any] = {}

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DescriptorError(f"a descriptor is bytes, got {type(data).__name__}")
    try:
        raw = json.loads(bytes(data))
        doc = _Doc.model_validate(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DescriptorError(f"malformed descriptor (not pdx JSON): {exc}") from exc
    except ValidationError as exc:
        raise DescriptorError(f"malformed descriptor: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
    if doc.pdx != WIRE_VERSION:
        raise DescriptorError(f"descriptor wire version {doc.pdx} is not supported (expected {WIRE_VERSION})")
    if kind is not None and doc.kind != kind:
        raise DescriptorError(
            f"descriptor is for transport {doc.kind!r}, not {kind!r}; connect with a {doc.kind} transport"
        )
    regions = {r.region_id: RegionInfo(r.region_id, r.nbytes, r.device, dict(r.extra)) for r in doc.regions}
    return Descriptor(doc.kind, doc.name, doc.instance, doc.host, dict(doc.address), regions, dict(doc.caps))
