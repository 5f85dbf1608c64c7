"""The one peer-descriptor codec of every pdx transport.

A descriptor is UTF-8 JSON, at most ``MAX_DESCRIPTOR_BYTES`` (untrusted input: it
comes from a peer; every field is validated and any problem is a ``DescriptorError``)::

    {"pdx": 1, "kind": "tcp", "name": "...", "instance": "<nonce>", "host": "<host id>",
     "address": {...}, "regions": [{"region_id", "nbytes", "device", "addr", "extra"}],
     "blob": "<base64>", "caps": {...}}

``instance`` is random per transport object, so a descriptor taken from a peer that
has since restarted is recognised as stale. ``host`` identifies the machine (same
host -> same-host media such as ``shm`` are possible). ``address`` says how to reach
the endpoint (host/port, socket path, IPC handles). ``addr`` is the region's address
in the peer's process, present only where the medium writes to it one-sidedly
(nixl). ``blob`` carries backend bytes (NIXL agent metadata). ``caps`` carries what
``auto`` needs to pick a medium.
"""

from __future__ import annotations

import base64
import binascii
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
MAX_DESCRIPTOR_BYTES = 16 << 20  # a region table of thousands of regions plus agent metadata fits


@dataclass(frozen=True)
class Descriptor:
    kind: str
    name: str
    instance: str  # nonce of the transport object that wrote it
    host: str  # host identity, see host_id()
    address: dict[str, Any]  # transport-specific: host/port, socket path, IPC handles
    regions: dict[int, RegionInfo]
    blob: bytes = b""  # backend bytes (NIXL agent metadata)
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
    address: dict[str, Any],
    caps: dict[str, Any] | None = None,
    *,
    blob: bytes = b"",
    with_addr: bool = False,  # publish each region's address (one-sided media only)
) -> bytes:
    regions = []
    for r in transport.regions.values():
        row: dict[str, Any] = {"region_id": r.region_id, "nbytes": r.nbytes, "device": r.device, "extra": r.extra}
        if with_addr:
            row["addr"] = r.addr
        regions.append(row)
    doc = {
        "pdx": WIRE_VERSION,
        "kind": transport.kind,
        "name": transport.name,
        "instance": transport.instance,
        "host": host_id(),
        "address": address,
        "regions": regions,
        "blob": base64.b64encode(blob).decode("ascii"),
        "caps": caps or {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_descriptor(data: bytes, kind: str | None = None, *, with_addr: bool = False) -> Descriptor:
    """Parse and validate a peer descriptor (of transport ``kind``; with every region's address
    when ``with_addr``). Raises ``DescriptorError`` naming what is wrong."""
    from pydantic import ValidationError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DescriptorError(f"a descriptor is bytes, got {type(data).__name__}")
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError(f"descriptor of {len(data)} bytes is larger than {MAX_DESCRIPTOR_BYTES}")
    try:
        doc = _model().model_validate(json.loads(bytes(data)))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DescriptorError(f"malformed descriptor (not pdx JSON): {exc}") from exc
    except ValidationError as exc:
        raise DescriptorError(f"malformed descriptor: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
    if doc.pdx != WIRE_VERSION:
        raise DescriptorError(f"descriptor wire version {doc.pdx} is not supported (expected {WIRE_VERSION})")
    if kind is not None and doc.kind != kind:
        raise DescriptorError(
            f"descriptor is for transport {doc.kind!r}, not {kind!r}; connect with a {doc.kind} transport"
        )
    if with_addr and any(r.addr is None for r in doc.regions):
        raise DescriptorError(f"{doc.kind} descriptor of {doc.name} lacks the address of a region")
    try:
        blob = base64.b64decode(doc.blob, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DescriptorError(f"malformed descriptor: bad blob ({exc})") from exc
    regions = {r.region_id: RegionInfo(r.region_id, r.nbytes, r.device, dict(r.extra), r.addr) for r in doc.regions}
    return Descriptor(doc.kind, doc.name, doc.instance, doc.host, dict(doc.address), regions, blob, dict(doc.caps))


@functools.cache
def _model() -> Any:
    """The pydantic model of a descriptor (built on first use: pydantic stays out of ``import``)."""
    from pydantic import BaseModel, ConfigDict, Field

    class _Region(BaseModel):
        model_config = ConfigDict(extra="forbid")
        region_id: int = Field(ge=0)
        nbytes: int = Field(gt=0)
        device: str = "cpu"
        addr: int | None = Field(default=None, ge=0)
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
        blob: str = ""
        caps: dict[str, Any] = {}

    return _Doc
