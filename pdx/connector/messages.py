"""Wire messages of the connector's data plane: what P tells D with each write.

    P -> D  LayerLanded   carried by the transport as the notification of one write;
                          delivered only once every byte of that write is in D's blocks

One ``LayerLanded`` per layer per write, so the encoding is fixed binary
(``struct``, about 70 bytes) rather than JSON or pydantic: the fixed layout
gives every field its type, and ``decode`` checks the size, version, transfer
id and ranges. The payload comes from the network: ``decode`` raises
``KVMessageError`` for anything else, and D drops (and counts) such a message.

Layout, little-endian::

    version u8 | transfer id length u8 | layer u32 | start u32 | end u32 | nbytes u64
    | t_saved f64 | t_posted f64 | transfer id (ASCII hex)
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

from pdx.errors import KVMessageError

VERSION = 1
_HEADER = struct.Struct("<BBIIIQdd")
_TID_RE = re.compile(rb"[0-9a-fA-F]{8,64}")  # as pdx_transfer_id (protocol.py)
MIN_NBYTES = _HEADER.size + 8
MAX_NBYTES = _HEADER.size + 64


@dataclass(frozen=True, slots=True)
class LayerLanded:
    """Bytes of one layer for prompt tokens [start, end) of a transfer are in D's blocks."""

    transfer_id: str  # hex, 8-64 characters
    layer: int
    start: int  # prompt tokens
    end: int  # exclusive, > start
    nbytes: int  # bytes this write moved
    t_saved: float  # P's wall clock (s) when the layer's KV was computed
    t_posted: float  # P's wall clock (s) when the write was posted; 0.0: unknown

    def encode(self) -> bytes:
        tid = self.transfer_id.encode("ascii")
        return _HEADER.pack(VERSION, len(tid), self.layer, self.start, self.end, self.nbytes,
                            self.t_saved, self.t_posted) + tid

    @classmethod
    def decode(cls, payload: bytes) -> LayerLanded:
        """Parse and check a notification from a peer; ``KVMessageError`` says what is wrong."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise KVMessageError(f"layer-landed message must be bytes, got {type(payload).__name__}")
        size = len(payload)
        if not MIN_NBYTES <= size <= MAX_NBYTES:
            raise KVMessageError(f"layer-landed message is {size} bytes, expected {MIN_NBYTES}-{MAX_NBYTES}")
        version, tid_len, layer, start, end, nbytes, t_saved, t_posted = _HEADER.unpack_from(payload)
        if version != VERSION:
            raise KVMessageError(f"layer-landed message version {version}, expected {VERSION}: "
                                 "run the same pdx version on prefill and decode engines")
        tid = bytes(payload[_HEADER.size:])
        if tid_len != len(tid) or not _TID_RE.fullmatch(tid):
            raise KVMessageError(f"layer-landed message carries a malformed transfer id {tid[:64]!r}")
        if end <= start:
            raise KVMessageError(f"layer-landed message has an empty token range [{start}, {end})")
        if not (math.isfinite(t_saved) and math.isfinite(t_posted) and t_saved >= 0.0 and t_posted >= 0.0):
            raise KVMessageError(f"layer-landed message has bad clocks t_saved={t_saved} t_posted={t_posted}")
        return cls(tid.decode("ascii"), layer, start, end, nbytes, t_saved, t_posted)
