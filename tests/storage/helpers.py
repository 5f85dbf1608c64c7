"""Helpers for the storage tests: a ``pdx store`` process, a ``redis-server``, test chunks."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from pdx.harness.process import free_port  # noqa: F401 (re-exported for the storage tests)

MiB = 1 << 20
CHUNK = 256 * 1024  # bytes per test chunk


def make_keys(n: int, tag: str = "k") -> list[bytes]:
    """Deterministic 32-byte chunk keys."""
    import hashlib

    return [hashlib.sha256(f"{tag}-{i}".encode()).digest() for i in range(n)]


def make_chunk(key: bytes, nbytes: int = CHUNK) -> np.ndarray:
    """Chunk bytes derived from the key, so any process can regenerate them."""
    seed = int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def pdx_arenas() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("pdx-store-")}


class StoreProc:
    """A ``pdx store`` subprocess; ``stop()`` is a clean SIGTERM shutdown, ``kill()`` SIGKILL."""

    def __init__(self, tmp: Path, *, capacity_gb: float = 0.05, slab_mb: float = 1.0, l2: str | None = None,
                 socket_path: str | None = None, extra: list[str] | None = None,
                 ready_timeout: float = 30.0, http_token: str | None = None):  # fmt: skip
        self.http_token = http_token  # sent as a bearer token by get/post
        self.socket = socket_path or str(tmp / f"store-{time.monotonic_ns()}.sock")
        self.log_path = tmp / f"store-{time.monotonic_ns()}.log"
        args = [sys.executable, "-m", "pdx.cli", "store", "--socket", self.socket,
                "--capacity-gb", str(capacity_gb), "--slab-mb", str(slab_mb), "--http-port", "0",
                *(["--l2", l2] if l2 else []), *(extra or [])]  # fmt: skip
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self._read_ready(timeout=ready_timeout)
        fields = dict(part.split("=", 1) for part in line.split()[3:])
        self.http = fields["http"]
        self.arena = fields["arena"]
        self.remote_url = f"pdx-store://{fields['remote']}" if fields.get("remote", "off") != "off" else None

    def _read_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while not line.startswith("pdx store ready:"):  # libraries (NIXL) may print first
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                break
        if not line.startswith("pdx store ready:"):
            self.kill()
            raise RuntimeError(f"store did not start: {line!r}\n{self.log_path.read_text()}")
        return line

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.http_token}"} if self.http_token else {}

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.http + path, headers=self._headers())
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.http + path, data=json.dumps(body).encode(), method="POST", headers=self._headers()
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        return self.get("/stats")

    def wait_stat(self, name: str, value: int, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats[name] >= value or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        finally:
            self._close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


class RedisProc:
    def __init__(self, tmp: Path):
        self.port = free_port()
        self.dir = tmp / "redis"
        self.dir.mkdir(exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
