"""Local-disk L2 (``file:///path[?max_gb=N]``): one file per chunk, ``<root>/<hex[:2]>/<hex>.chunk``.

Writes go to a temporary file renamed into place, so a reader never sees half a
chunk; a crash leaves at most a ``.tmp`` file, removed by ``clear``. With ``max_gb``
the least recently used chunk files are deleted to stay under that size (files
already there at start count, oldest mtime first); without it the disk is the limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from pdx.errors import ConfigError
from pdx.storage.l2.base import L2Store

logger = logging.getLogger(__name__)

SUFFIX = ".chunk"


class DiskL2(L2Store):
    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigError(f"file L2 URL must look like file:///abs/path, got {url!r}")
        self.url = url
        self.root = unquote(parts.path)
        try:
            self.max_bytes = int(float(parse_qs(parts.query).get("max_gb", ["0"])[0]) * 1e9)
        except ValueError:
            raise ConfigError(f"max_gb in {url!r} must be a number") from None
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.Lock()  # adapters are called from several threads
        self._sizes: OrderedDict[str, int] = OrderedDict()  # path -> bytes, LRU first
        self._total_bytes = 0
        if self.max_bytes > 0:
            self._scan()

    def _scan(self) -> None:
        found = []
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if name.endswith(SUFFIX):
                    st = os.stat(os.path.join(dirpath, name))
                    found.append((st.st_mtime, os.path.join(dirpath, name), st.st_size))
        for _, path, size in sorted(found):
            self._sizes[path] = size
            self._total_bytes += size
        self._evict(keep=None)

    def _evict(self, keep: str | None) -> None:
        """Delete LRU files until under max_bytes (never ``keep``). Caller holds the lock."""
        while self._total_bytes > self.max_bytes and self._sizes:
            path, size = next(iter(self._sizes.items()))
            if path == keep:
                break
            del self._sizes[path]
            self._total_bytes -= size
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _path(self, key: bytes) -> str:
        name = key.hex()
        return os.path.join(self.root, name[:2], name + SUFFIX)

    def _write(self, key: bytes, header: bytes, payload: memoryview) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)
        if self.max_bytes > 0:
            with self._lock:
                self._total_bytes += len(header) + payload.nbytes - self._sizes.pop(path, 0)
                self._sizes[path] = len(header) + payload.nbytes
                self._evict(keep=path)

    def _read(self, key: bytes) -> bytearray | None:
        try:
            path = self._path(key)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                n = f.readinto(buf)
        except FileNotFoundError:
            return None
        if self.max_bytes > 0:
            with self._lock:
                if path in self._sizes:
                    self._sizes.move_to_end(path)
        return buf if n == size else buf[:n]

    def _exists(self, keys: Sequence[bytes]) -> list[bool]:
        out = []
        for key in keys:
            is_present = os.path.exists(self._path(key))
            out.append(is_present)
            if not is_present:  # callers want the leading run only
                break
        return out

    def _delete(self, key: bytes) -> None:
        path = self._path(key)
        with self._lock:
            self._total_bytes -= self._sizes.pop(path, 0)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _clear(self) -> int:
        with self._lock:
            self._sizes.clear()
            self._total_bytes = 0
        n = 0
        for entry in os.scandir(self.root):
            if entry.is_dir() and len(entry.name) == 2:
                n += sum(1 for name in os.listdir(entry.path) if name.endswith(SUFFIX))
                shutil.rmtree(entry.path, ignore_errors=True)
        return n

    def close(self) -> None:
        pass
