"""``pdx bench router [--quick] [--json FILE]``: router overhead on instant fake engines.

Same run, same fakes, same load generator (each its own process, all on this
machine's cores): the load goes to

- ``direct``: one fake decode engine, no router (the baseline);
- ``pdx``: ``pdx route`` in PD mode (pdx protocol: P and D concurrently);
- ``pdx-nixl``: ``pdx route`` speaking vLLM's NIXL protocol (full run only);
- ``sglang-router`` (0.3.2, PD mode, SGLang fakes) and ``vllm-router`` (0.1.17, PD
  mode, NIXL fakes), when installed (``pip install -e .[dev]``).

Modes: ``plain`` (non-streaming) and ``stream`` (64 SSE chunks per answer).
Prints a table and the pdx / best-Rust-router ratios; ``--json FILE`` writes
``{"results": [{"system", "mode", "concurrency", "rps", "latency_ms_p50",
"latency_ms_p99", "added_p50_ms", "added_p99_ms"}, ...]}``. Figures move with
machine load: compare systems within one run only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pdx.harness.process import free_port

logger = logging.getLogger(__name__)

BODIES = {
    "plain": {"model": "tiny", "prompt": "hello from the load generator", "max_tokens": 16},
    "stream": {"model": "tiny", "prompt": "hello from the load generator", "max_tokens": 64, "stream": True},
}


class Procs:
    """Child processes in their own process groups; ``stop_all`` ends every group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def _post_ok(url: str, body: dict, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback)
            resp.read()
            return resp.status == 200
    except OSError:
        return False


def wait_until_serving(url: str, proc: subprocess.Popen, name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        if _post_ok(url + "/v1/completions", BODIES["plain"]):
            return
        time.sleep(0.25)
    raise RuntimeError(f"{name} did not serve {url} within {timeout_s:.0f} s")


def run_load(url: str, mode: str, concurrency: int, duration: float, warmup: float) -> dict:
    cmd = [sys.executable, "-m", "pdx.bench.loadgen", "--url", url + "/v1/completions",
           "--body", json.dumps(BODIES[mode]), "--concurrency", str(concurrency),
           "--duration", str(duration), "--warmup", str(warmup)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=warmup + duration + 60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _topology(path: Path, port: int, fakes: dict[str, int], connector: str) -> None:
    from pdx.testing.fake_engine import FAKE_KV_SECRET

    p, d = f"p-{connector}", f"d-{connector}"
    kv = ", kv_port: 5799" if connector == "pdx" else ""
    path.write_text(
        "model: {name: tiny}\n"
        "engines:\n"
        f"  - {{id: p0, url: 'http://127.0.0.1:{fakes[p]}', role: prefill, connector: {connector}{kv}}}\n"
        f"  - {{id: d0, url: 'http://127.0.0.1:{fakes[d]}', role: decode, connector: {connector}}}\n"
        f"kv_secret: {FAKE_KV_SECRET}\n"  # the fakes' default fleet secret
        f"router: {{host: 127.0.0.1, port: {port}, log_level: error,"
        " policies: {prefill: round_robin, decode: round_robin}}\n"
    )


def start_system(system: str, procs: Procs, fakes: dict[str, int], work: Path) -> tuple[str, subprocess.Popen | None]:
    """Start one system; return its base URL and process (None for direct)."""
    if system == "direct":
        return f"http://127.0.0.1:{fakes['d-pdx']}", None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if system in ("pdx", "pdx-nixl"):
        topo = work / f"{system}.yaml"
        _topology(topo, port, fakes, "pdx" if system == "pdx" else "nixl")
        proc = procs.start(system, [sys.executable, "-m", "pdx.cli", "route", "--topology", str(topo)])
    elif system == "sglang-router":
        from pdx.models.tiny import build_tiny_model

        model_dir = build_tiny_model()
        cmd = [which("sglang-router") or "sglang-router", "launch", "--host", "127.0.0.1", "--port", str(port),
               "--pd-disaggregation", "--prefill", f"http://127.0.0.1:{fakes['p-sglang']}", "8998",
               "--decode", f"http://127.0.0.1:{fakes['d-sglang']}", "--policy", "round_robin",
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
               "--model-path", str(model_dir), "--log-level", "warn"]  # fmt: skip
        proc = procs.start(system, cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elif system == "vllm-router":
        cmd = [which("vllm-router") or "vllm-router", "--host", "127.0.0.1", "--port", str(port),
               "--vllm-pd-disaggregation", "--prefill", f"http://127.0.0.1:{fakes['p-nixl']}",
               "--decode", f"http://127.0.0.1:{fakes['d-nixl']}", "--policy", "round_robin",
               "--worker-startup-check-interval", "1", "--prometheus-port", str(free_port())]  # fmt: skip
        proc = procs.start(system, cmd)
    else:
        raise ValueError(system)
    wait_until_serving(url, proc, system)
    return url, proc


def which(name: str) -> str | None:
    """An executable on PATH or beside this interpreter (the venv's bin directory)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def available_systems(full: bool) -> list[str]:
    systems = ["direct", "pdx"] + (["pdx-nixl"] if full else [])
    for rust in ("sglang-router", "vllm-router"):
        if which(rust):
            systems.append(rust)
        else:
            logger.warning("%s is not installed (pip install -e .[dev]); skipping it", rust)
    return systems


def print_table(results: list[dict]) -> None:
    print(f"{'system':<14} {'mode':<7} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50':>7} {'+p99':>7}"
          f" {'cpu us/req':>10}")
    for r in results:
        print(f"{r['system']:<14} {r['mode']:<7} {r['concurrency']:>4} {r['rps']:>8.0f} {r['latency_ms_p50']:>8.2f} "
              f"{r['latency_ms_p99']:>8.2f} {r['added_p50_ms']:>7.2f} {r['added_p99_ms']:>7.2f}"
              f" {r['router_cpu_us_per_req']:>10.0f}")
    for mode in ("plain", "stream"):
        for conc in sorted({r["concurrency"] for r in results}):
            rows = {r["system"]: r for r in results if r["mode"] == mode and r["concurrency"] == conc}
            rust = [rows[s] for s in ("sglang-router", "vllm-router") if s in rows]
            if "pdx" not in rows or not rust:
                continue
            best = max(rust, key=lambda r: r["rps"])
            pdx = rows["pdx"]
            print(f"{mode} c={conc}: pdx/{best['system']} req/s x{pdx['rps'] / best['rps']:.2f}, "
                  f"router CPU/req x{pdx['router_cpu_us_per_req'] / best['router_cpu_us_per_req']:.2f}, "
                  f"added p50 {pdx['added_p50_ms']:.2f} vs {best['added_p50_ms']:.2f} ms, "
                  f"added p99 {pdx['added_p99_ms']:.2f} vs {best['added_p99_ms']:.2f} ms")


def cpu_seconds(proc: subprocess.Popen | None) -> float:
    """User + system CPU seconds the process has used so far (0 for none)."""
    if proc is None:
        return 0.0
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def aggregate(system: str, mode: str, conc: int, rounds: list[dict], cpu_s: float) -> dict:
    """One result row from interleaved rounds: total req/s, median of per-round percentiles."""
    num = sum(r["num_requests"] for r in rounds)
    duration = sum(r["duration"] for r in rounds)
    p50s = sorted(r["latency_ms_p50"] for r in rounds)
    p99s = sorted(r["latency_ms_p99"] for r in rounds)
    return {
        "system": system, "mode": mode, "concurrency": conc, "rps": num / duration,
        "latency_ms_p50": p50s[len(p50s) // 2], "latency_ms_p99": p99s[len(p99s) // 2],
        "router_cpu_us_per_req": (cpu_s / num * 1e6) if num else float("nan"),
        "num_errors": sum(r["num_errors"] for r in rounds), "num_rounds": len(rounds),
    }  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdx bench router", description="router overhead on instant fakes")
    parser.add_argument("--quick", action="store_true", help="concurrency 32 only, short runs (< 3 min)")
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--concurrency", type=int, nargs="*", help="override the concurrency levels")
    parser.add_argument("--systems", nargs="*", help="subset of systems to run")
    parser.add_argument("--duration", type=float, help="seconds of measured load per round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per point (default 3, quick 3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    concurrencies = args.concurrency or ([32] if args.quick else [1, 8, 32, 64])
    duration = args.duration or (3.0 if args.quick else 5.0)
    rounds = args.rounds or 3
    warmup = 0.5
    systems = args.systems or available_systems(full=not args.quick)
    if "direct" not in systems:
        systems.insert(0, "direct")

    work = Path(tempfile.mkdtemp(prefix="pdx-bench-router-"))
    procs = Procs(work)
    results: list[dict] = []
    try:
        fakes = {name: free_port() for name in ("p-pdx", "d-pdx", "p-nixl", "d-nixl", "p-sglang", "d-sglang")}
        specs = [f"{name}:{'prefill' if name[0] == 'p' else 'decode'}:"
                 f"{'sglang' if 'sglang' in name else 'vllm'}:{'nixl' if 'nixl' in name else 'pdx'}:{port}"
                 for name, port in fakes.items()]  # fmt: skip
        fake_proc = procs.start("fakes", [sys.executable, "-m", "pdx.testing.fake_server", *specs, "--num-chunks", "64"])
        wait_until_serving(f"http://127.0.0.1:{fakes['d-pdx']}", fake_proc, "fakes")
        running: dict[str, tuple[str, subprocess.Popen | None]] = {}
        for system in systems:
            try:
                running[system] = start_system(system, procs, fakes, work)
            except (RuntimeError, OSError) as exc:
                logger.warning("skipping %s: %s (logs in %s)", system, exc, work)
        # Interleave systems round by round: the machine's load drifts, all systems see the same drift.
        for mode in ("plain", "stream"):
            for conc in concurrencies:
                per_system: dict[str, list[dict]] = {s: [] for s in running}
                cpu: dict[str, float] = dict.fromkeys(running, 0.0)
                for _ in range(rounds):
                    for system, (url, proc) in running.items():
                        before = cpu_seconds(proc)
                        r = run_load(url, mode, conc, duration, warmup)
                        cpu[system] += cpu_seconds(proc) - before  # includes the warm-up's requests
                        r["duration"] = duration
                        per_system[system].append(r)
                for system, rs in per_system.items():
                    row = aggregate(system, mode, conc, rs, cpu[system] * duration / (duration + warmup))
                    if row["num_errors"]:
                        logger.warning("%s %s c=%d: %d errors", system, mode, conc, row["num_errors"])
                    results.append(row)
                    print(f"  {system:<14} {mode:<6} c={conc:<3} {row['rps']:8.0f} req/s  "
                          f"p50 {row['latency_ms_p50']:.2f} ms  p99 {row['latency_ms_p99']:.2f} ms  "
                          f"router CPU {row['router_cpu_us_per_req']:.0f} us/req", flush=True)
    finally:
        procs.stop_all()
    base = {(r["mode"], r["concurrency"]): r for r in results if r["system"] == "direct"}
    for r in results:
        b = base.get((r["mode"], r["concurrency"]))
        r["added_p50_ms"] = r["latency_ms_p50"] - b["latency_ms_p50"] if b else float("nan")
        r["added_p99_ms"] = r["latency_ms_p99"] - b["latency_ms_p99"] if b else float("nan")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0
