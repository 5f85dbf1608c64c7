"""The L1 arena: one POSIX shared-memory segment (``/dev/shm/<name>``) mapped by the
store server and by every engine on the node.

The server creates and unlinks it; clients attach by name and copy chunk bytes
in and out at offsets the server hands them. We open ``/dev/shm`` directly
instead of using ``multiprocessing.shared_memory``: on Python < 3.13 the latter
registers attached segments with a resource tracker that unlinks them when the
*client* exits.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets

import numpy as np

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ARENA_PREFIX = "pdx-store-"


class SharedArena:
    """A mapped shared-memory segment. ``array`` is a uint8 numpy view over all of it."""

    __slots__ = ("name", "nbytes", "array", "_mmap", "_is_owner", "_lock_fd")

    def __init__(self, name: str, nbytes: int, mm: mmap.mmap, is_owner: bool, lock_fd: int = -1):
        self.name = name
        self.nbytes = nbytes
        self._mmap: mmap.mmap | None = mm
        self._is_owner = is_owner
        self._lock_fd = lock_fd  # creator only: holds flock(LOCK_EX) while the store lives
        self.array: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)  # [nbytes]

    @classmethod
    def create(cls, nbytes: int, *, prefault: bool = False) -> SharedArena:
        """Create a new segment named ``pdx-store-<pid>-<random>`` of ``nbytes`` bytes.

        The creator holds an exclusive flock on it for its lifetime; that lock, not the
        pid, tells ``sweep_stale_arenas`` the owner is alive (pids are per namespace).
        """
        name = f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(SHM_DIR, name)
        tmp_path = os.path.join(SHM_DIR, f".{name}.tmp")  # not swept: locked before it is named
        shm = os.statvfs(SHM_DIR)
        if nbytes > shm.f_bavail * shm.f_frsize:
            # tmpfs pages are allocated on first write; a full /dev/shm would SIGBUS engines
            raise OSError(
                f"{SHM_DIR} has {shm.f_bavail * shm.f_frsize / 1e9:.2f} GB free, less than the "
                f"{nbytes / 1e9:.2f} GB arena; lower --capacity-gb or enlarge {SHM_DIR}"
            )
        fd = os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, nbytes)
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if prefault else 0)
            mm = mmap.mmap(fd, nbytes, flags=flags)
            os.rename(tmp_path, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp_path)
            raise
        logger.info("created arena %s (%.2f GB)", path, nbytes / 1e9)
        return cls(name, nbytes, mm, is_owner=True, lock_fd=fd)

    @classmethod
    def attach(cls, name: str, nbytes: int) -> SharedArena:
        """Map an existing segment; raises FileNotFoundError when it is gone."""
        if "/" in name or not name.startswith(ARENA_PREFIX):
            raise ValueError(f"not a pdx arena name: {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ValueError(f"arena {name} has {size} bytes, expected {nbytes}")
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        return cls(name, nbytes, mm, is_owner=False)

    @property
    def is_open(self) -> bool:
        return self._mmap is not None

    def close(self) -> None:
        """Unmap (and, for the creator, unlink). Idempotent."""
        mm, self._mmap = self._mmap, None
        self.array = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                logger.debug("arena %s still has live views; unmapped when they go", self.name)
        if self._is_owner:
            self._is_owner = False
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
        lock_fd, self._lock_fd = self._lock_fd, -1
        if lock_fd >= 0:
            os.close(lock_fd)

    def __del__(self) -> None:
        try:
            if self._mmap is not None or self._is_owner:
                self.close()
        except Exception:  # never raise from __del__
            pass


def sweep_stale_arenas() -> list[str]:
    """Unlink arenas left by store servers that died without cleaning up (SIGKILL).

    An arena is stale when nobody holds its flock (the kernel drops it when the owner
    dies, in any pid namespace sharing this /dev/shm). Returns the names removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(ARENA_PREFIX):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            removed.append(name)
        except OSError:  # locked: its store is alive (or not ours to remove)
            pass
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d stale arena(s): %s", len(removed), ", ".join(removed))
    return removed
