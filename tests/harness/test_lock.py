"""The engine lock serializes engine runs, and never waits on a lock its own ancestor holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from pdx.harness.lock import engine_lock

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")


def test_lock_held_by_an_ancestor_is_not_taken_again(tmp_path):
    lock = tmp_path / "engines.lock"
    code = (
        "from pdx.harness.lock import engine_lock\n"
        f"with engine_lock({str(lock)!r}):\n"
        "    print('inside')\n"
    )
    out = subprocess.run(
        ["flock", str(lock), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "inside"


def test_lock_held_by_another_process_is_waited_for(tmp_path):
    lock = tmp_path / "engines.lock"
    lock.touch()
    release = tmp_path / "release"
    holder = subprocess.Popen(
        ["flock", str(lock), sys.executable, "-c",
         f"import os, time\nopen({str(tmp_path / 'held')!r}, 'w')\n"
         f"while not os.path.exists({str(release)!r}): time.sleep(0.05)\n"
         f"time.sleep(0.3)\nopen({str(tmp_path / 'exiting')!r}, 'w')\n"],
    )  # fmt: skip
    try:
        while not (tmp_path / "held").exists():
            assert holder.poll() is None
            time.sleep(0.05)
        release.touch()  # the holder lets go soon; engine_lock must wait for that
        with engine_lock(lock):
            assert (tmp_path / "exiting").exists(), "entered while another process held the lock"
    finally:
        holder.kill()
        holder.wait()
