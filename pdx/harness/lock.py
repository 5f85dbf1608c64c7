"""One machine-wide lock for anything that starts real vLLM engines (tests, benchmarks).

Engines on a small shared box must not overlap: each takes about 3 GB and a core.
``engine_lock()`` holds ``flock`` on ``/tmp/pdx-vllm.lock`` (``$PDX_ENGINE_LOCK``)
for the duration of a ``with`` block. If an ancestor process already holds it
(``flock /tmp/pdx-vllm.lock pytest ...``), it is not taken again: that would
wait for ourselves forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_LOCK_PATH = "/tmp/pdx-vllm.lock"


def lock_path() -> Path:
    return Path(os.environ.get("PDX_ENGINE_LOCK", DEFAULT_LOCK_PATH))


def _ancestor_pids() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])  # field 4: ppid
    return pids


def _holder_pids(path: Path) -> set[int]:
    """PIDs holding a flock on ``path`` according to /proc/locks (empty if unknown)."""
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return set()
    inode_suffix = f":{st.st_ino}"
    holders = set()
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(inode_suffix):
            holders.add(int(fields[4]))
    return holders


@contextlib.contextmanager
def engine_lock(path: str | Path | None = None) -> Iterator[None]:
    """Hold the engine lock (blocking) unless an ancestor process already holds it."""
    target = Path(path) if path is not None else lock_path()
    with open(target, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _holder_pids(target) & _ancestor_pids():
                logger.debug("engine lock %s already held by an ancestor", target)
                yield
                return
            logger.info("waiting for the engine lock %s (another run owns the engines)", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
