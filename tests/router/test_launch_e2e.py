"""``pdx launch`` end to end: real vLLM CPU engines behind the router, for the shipped local
topologies (stock NixlConnector, and the pdx connector).

Holds /tmp/pdx-vllm.lock while engines run (one engine fleet on the machine at a time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pdx.engines.metrics import parse_prometheus_text
from pdx.harness.lock import engine_lock
from pdx.harness.process import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.nixl, pytest.mark.timeout(3600)]  # includes waiting for the engine lock

ROOT = Path(__file__).parents[2]
PROMPT = [(i * 37) % 4000 + 3 for i in range(300)]  # token ids: no tokenizer dependence


def _engine_pids(ports: list[int]) -> list[int]:
    """Processes whose command line serves one of ``ports`` (orphan check)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in b" ".join(argv):
            if any(argv[i] == b"--port" and argv[i + 1] == str(p).encode() for i in range(len(argv) - 1) for p in ports):
                found.append(int(proc.name))
    return found


@pytest.fixture(scope="session", params=["local-1p1d-nixl.yaml", "local-1p1d.yaml"])
def fleet(request, tmp_path_factory):
    """A shipped local topology on free ports, launched by ``pdx launch``."""
    pytest.importorskip("vllm")
    pytest.importorskip("nixl")
    config = request.param
    work = tmp_path_factory.mktemp("launch")
    ports = {name: free_port() for name in ("router", "p", "d", "sp", "sd", "kv")}
    text = (ROOT / "configs" / config).read_text()
    text = text.replace("8100", str(ports["p"])).replace("8200", str(ports["d"]))
    text = text.replace("5600", str(ports["sp"])).replace("5601", str(ports["sd"])).replace("5700", str(ports["kv"]))
    text = text.replace("port: 8000", f"port: {ports['router']}")
    topo = work / "fleet.yaml"
    topo.write_text(text)
    # Queue behind any other fleet; if this pytest process already holds the lock (the e2e
    # fixtures keep it for the whole session) it is not taken again: a second flock on a new
    # open file would wait for ourselves until the timeout.
    lock = engine_lock()
    lock.__enter__()
    log = open(work / "launch.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdx.cli", "launch", "--topology", str(topo), "--log-dir", str(work)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "UCX_NET_DEVICES": "lo"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{ports['router']}"
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            assert proc.poll() is None, (work / "launch.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("fleet not ready in 420 s:\n" + (work / "launch.log").read_text()[-3000:])
        httpx.post(url + "/v1/completions", json={"prompt": PROMPT[:20], "max_tokens": 2}, timeout=120)  # warm-up
        # A first NIXL request's handshake can keep an engine (pinned to one core) from answering
        # health checks for a few seconds: wait until the router has them both back in rotation.
        deadline = time.monotonic() + 60
        while not all(w["healthy"] for w in httpx.get(url + "/workers", timeout=5).json()["workers"]):
            assert time.monotonic() < deadline, httpx.get(url + "/workers", timeout=5).text
            time.sleep(0.5)
        yield {"url": url, "proc": proc, "ports": ports, "work": work, "config": config}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in _engine_pids([ports["p"], ports["d"]]):
            os.kill(pid, signal.SIGKILL)
        log.close()
        lock.__exit__(None, None, None)


def test_requests_flow_through_a_launched_fleet_with_kv_transferred(fleet):
    url, ports = fleet["url"], fleet["ports"]
    c = httpx.Client(base_url=url, timeout=120)
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    with c.stream("POST", "/v1/completions",
                  json={"prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}) as s:  # fmt: skip
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert s.status_code == 200 and events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert len(events) >= 2 and isinstance(streamed, str)
    # D received the prompt's KV from P rather than computing it
    d_metrics = parse_prometheus_text(httpx.get(f"http://127.0.0.1:{ports['d']}/metrics").text)
    assert d_metrics.sum("prompt_tokens_by_source", source="external_kv_transfer") >= len(PROMPT)
    # and the router re-exports that figure after a health round
    deadline = time.monotonic() + 10
    series = {"engine": "d0", "role": "decode", "source": "external_kv_transfer"}
    while time.monotonic() < deadline:
        router_metrics = parse_prometheus_text(c.get("/metrics").text)
        if router_metrics.sum("pdx_router_engine_prompt_tokens_total", **series) > 0:
            break
        time.sleep(0.5)
    assert router_metrics.find("pdx_router_engine_prompt_tokens_total", **series)
    workers = c.get("/workers").json()["workers"]
    assert {w["id"]: w["healthy"] for w in workers} == {"p0": True, "d0": True}


def test_sigterm_stops_router_and_every_engine(fleet):
    proc, ports = fleet["proc"], fleet["ports"]
    assert _engine_pids([ports["p"], ports["d"]])
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    deadline = time.monotonic() + 30
    while _engine_pids([ports["p"], ports["d"]]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _engine_pids([ports["p"], ports["d"]]) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(fleet["url"] + "/health", timeout=2)
