"""The L2 interface: a second tier behind the node's L1 arena (local disk, Redis/Valkey).

The store server calls every method from worker threads (never its event loop):

- ``put(key, payload, checksum)``  write-through of a committed L1 chunk.
- ``get(key)``                     on an L1 miss, before promoting into L1.
- ``contains_prefix(keys)``        from ``lookup``, for the keys after the L1 run.
- ``clear()``                      operator ``clear`` with ``l2: true``.
- ``close()``                      at shutdown; idempotent.

Every value is ``HEADER + payload``; the header carries a magic, a format version,
the payload length, its xxh3_64 and a digest of the chunk key. ``get`` checks all of
them, so a value that is truncated, from another format version, stored under the
wrong name or bit-flipped raises ``ChunkCorrupt`` and is never served; the adapter
deletes it. A backend that cannot be reached or fails (redis errors, OS errors of the
disk) raises ``StoreUnavailable``, mapped here and in the adapters with ``from exc``.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pdx.errors import ChunkCorrupt, StoreUnavailable
from pdx.storage.checksum import checksum as compute_checksum
from pdx.storage.checksum import key_digest

MAGIC = b"PDXC"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHQQ16s")  # magic, version, flags, payload nbytes, xxh3_64, key digest


@dataclass(frozen=True)
class L2Value:
    payload: memoryview  # verified chunk bytes
    checksum: int  # xxh3_64 of payload


def encode_header(key: bytes, nbytes: int, checksum: int) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, nbytes, checksum, key_digest(key))


def decode_value(key: bytes, blob: bytes | bytearray | memoryview) -> L2Value:
    """Check a stored value against its header; raises ChunkCorrupt naming what failed."""
    view = memoryview(blob).cast("B")
    if len(view) < HEADER.size:
        raise ChunkCorrupt(f"L2 value for {key.hex()[:16]} is truncated ({len(view)} bytes)")
    magic, version, _flags, nbytes, want, digest = HEADER.unpack_from(view)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise ChunkCorrupt(f"L2 value for {key.hex()[:16]} has format {magic!r} v{version}")
    if digest != key_digest(key):
        raise ChunkCorrupt(f"L2 value for {key.hex()[:16]} belongs to another key")
    payload = view[HEADER.size :]
    if len(payload) != nbytes:
        raise ChunkCorrupt(
            f"L2 value for {key.hex()[:16]} has {len(payload)} payload bytes, header says {nbytes}"
        )
    if compute_checksum(payload) != want:
        raise ChunkCorrupt(f"L2 value for {key.hex()[:16]} fails its checksum")
    return L2Value(payload, want)


class L2Store(ABC):
    """One L2 backend. Implementations store opaque blobs; this class owns the format."""

    url: str

    def put(self, key: bytes, payload: memoryview, checksum: int) -> None:
        with self._mapped("write"):
            self._write(key, encode_header(key, payload.nbytes, checksum), payload)

    def get(self, key: bytes) -> L2Value | None:
        """The verified value, or None if absent. Raises ChunkCorrupt (value deleted)."""
        with self._mapped("read"):
            blob = self._read(key)
        if blob is None:
            return None
        try:
            return decode_value(key, blob)
        except ChunkCorrupt:
            self._delete(key)
            raise

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys present (presence only; ``get`` verifies)."""
        n = 0
        with self._mapped("check keys"):
            found = self._exists(keys)
        for is_present in found:
            if not is_present:
                break
            n += 1
        return n

    def clear(self) -> int:
        """Remove every value this store wrote; returns how many."""
        with self._mapped("clear"):
            return self._clear()

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """OS errors of a backend (disk full, permissions, I/O) as ``StoreUnavailable``."""
        try:
            yield
        except OSError as exc:
            raise StoreUnavailable(f"L2 {self.url} failed to {what}: {exc}") from exc

    @abstractmethod
    def _write(self, key: bytes, header: bytes, payload: memoryview) -> None:
        """Store ``header + payload`` under key atomically (a reader never sees half)."""

    @abstractmethod
    def _read(self, key: bytes) -> bytes | bytearray | None:
        """The stored blob, or None."""

    @abstractmethod
    def _exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Presence of each key, in order."""

    @abstractmethod
    def _delete(self, key: bytes) -> None:
        """Remove one value; absent is fine."""

    @abstractmethod
    def _clear(self) -> int:
        """Remove every value this store wrote; returns how many."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and files; idempotent."""
