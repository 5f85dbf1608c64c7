"""Local-disk L2 (``file:///path``): one file per chunk, ``<root>/<hex[:2]>/<hex>.chunk``.

Writes go to a temporary file renamed into place, so a reader never sees half a
chunk; a crash leaves at most a ``.tmp`` file, removed by ``clear``. No capacity
limit: size the disk or clear it from the operator API.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

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
        os.makedirs(self.root, exist_ok=True)

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

    def _read(self, key: bytes) -> bytearray | None:
        try:
            with open(self._path(key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                n = f.readinto(buf)
        except FileNotFoundError:
            return None
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
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def clear(self) -> int:
        n = 0
        for entry in os.scandir(self.root):
            if entry.is_dir() and len(entry.name) == 2:
                n += sum(1 for name in os.listdir(entry.path) if name.endswith(SUFFIX))
                shutil.rmtree(entry.path, ignore_errors=True)
        return n

    def close(self) -> None:
        pass
