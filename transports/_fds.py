"""This process's open file descriptors, for leak checks and runtime bookkeeping."""

from __future__ import annotations

import os


def open_fds() -> set[str]:
    """Open fds as ``"N->target"`` (the transport suite's leak-check format)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out
