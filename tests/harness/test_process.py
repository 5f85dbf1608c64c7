"""The vLLM process harness: command line, environment, metrics parsing, clear start errors."""

from __future__ import annotations

import json
import sys

import pytest

from pdx.engines.metrics import parse_prometheus_text
from pdx.errors import EngineError
from pdx.harness.process import EngineSpec, VllmEngine, build_command, build_env, free_port

METRICS = """\
# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_compute"} 0.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="external_kv_transfer"} 1234.0
vllm:prompt_tokens_by_source_total{engine="1",model_name="tiny",source="external_kv_transfer"} 6.0
vllm:num_requests_running{engine="0",model_name="a \\"quoted\\" name"} 2.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="tiny"} 3.0 1700000000000
"""


def test_metrics_sum_by_name_and_labels():
    m = parse_prometheus_text(METRICS)
    assert m.sum("prompt_tokens_by_source", source="external_kv_transfer") == 1240.0
    assert (
        m.sum("vllm:prompt_tokens_by_source_total", source="external_kv_transfer", engine="0")
        == 1234.0
    )
    assert m.sum("prompt_tokens_by_source", source="local_compute") == 0.0
    assert m.sum("num_requests_running", model_name='a "quoted" name') == 2.0
    assert m.sum("e2e_request_latency_seconds_bucket", le="+Inf") == 3.0
    assert m.sum("no_such_metric") == 0.0


def test_metrics_reject_garbage():
    with pytest.raises(ValueError, match="not a Prometheus sample"):
        parse_prometheus_text("this is { not metrics")


def test_command_line_is_the_cpu_recipe():
    spec = EngineSpec(
        model="/m",
        port=8123,
        max_model_len=2048,
        block_size=32,
        max_num_seqs=4,
        kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_producer"},
        enable_prefix_caching=False,
    )
    cmd = build_command(spec, python="py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]

    def arg(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert (arg("--model"), arg("--port"), arg("--max-model-len")) == ("/m", "8123", "2048")
    assert (arg("--dtype"), arg("--load-format"), arg("--seed")) == ("float32", "auto", "0")
    assert (arg("--block-size"), arg("--max-num-seqs"), arg("--host")) == ("32", "4", "127.0.0.1")
    assert "--enforce-eager" in cmd and "--no-enable-prefix-caching" in cmd
    assert json.loads(arg("--kv-transfer-config"))["kv_connector"] == "NixlConnector"
    assert "--kv-transfer-config" not in build_command(EngineSpec(model="/m", port=1))


def test_environment_is_offline_pinned_and_nixl_aware():
    spec = EngineSpec(model="/m", port=1, kv_cache_gib=2, cpu_bind="1", nixl_side_channel_port=5601)
    env = build_env(spec, base={"PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["UCX_NET_DEVICES"] == "lo"
    assert (env["VLLM_NIXL_SIDE_CHANNEL_HOST"], env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) == (
        "127.0.0.1",
        "5601",
    )
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in build_env(EngineSpec(model="/m", port=1), base={})


def test_free_port_is_bindable_outside_the_ephemeral_range_and_never_repeats():
    import socket

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20 and all(1024 <= p < low for p in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_engine_that_dies_raises_with_log_tail(tmp_path, monkeypatch):
    # A server that cannot start (no vLLM module by that name) must fail fast and say why.
    import pdx.harness.process as process

    monkeypatch.setattr(
        process,
        "build_command",
        lambda spec: [sys.executable, "-c", "import sys; print('boom: bad model'); sys.exit(3)"],
    )
    engine = VllmEngine(EngineSpec(model="/m", port=free_port()), log_path=tmp_path / "e.log")
    with pytest.raises(EngineError, match=r"exited with code 3(.|\n)*boom: bad model"):
        engine.start(timeout_s=30)
    assert not engine.is_alive()
    engine.stop()  # idempotent


def test_stop_ends_the_whole_process_group(tmp_path, monkeypatch):
    import os
    import time

    import pdx.harness.process as process

    child_pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setattr(process, "build_command", lambda spec: [sys.executable, "-c", script])
    engine = VllmEngine(EngineSpec(model="/m", port=free_port()), log_path=tmp_path / "e.log")
    engine.launch()
    for _ in range(100):
        if child_pid_file.exists() and child_pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(child_pid_file.read_text())
    engine.stop(grace_s=2)
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} of the engine outlived stop()")


def test_pin_threads_pins_every_thread_of_the_engine(tmp_path, monkeypatch):
    import os
    import time

    import pdx.harness.process as process

    script = (
        "import os, threading, time\n"
        "os.sched_setaffinity(0, set(range(os.cpu_count())))\n"
        "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
        f"open({str(tmp_path / 'up')!r}, 'w')\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setattr(process, "build_command", lambda spec: [sys.executable, "-c", script])
    engine = VllmEngine(EngineSpec(model="/m", port=free_port()), log_path=tmp_path / "e.log")
    engine.launch()
    try:
        while not (tmp_path / "up").exists():
            assert engine.is_alive()
            time.sleep(0.05)
        assert engine.pin_threads({0}) >= 2
        tids = [int(t) for t in os.listdir(f"/proc/{engine.pid}/task")]
        assert len(tids) >= 2
        assert all(os.sched_getaffinity(tid) == {0} for tid in tids)
    finally:
        engine.stop(grace_s=2)


def test_parse_cpu_list():
    from pdx.harness.process import parse_cpu_list

    assert parse_cpu_list("0") == {0}
    assert parse_cpu_list("0-2,5") == {0, 1, 2, 5}


_SEGMENT_OWNER = """
import sys, time
from multiprocessing import resource_tracker, shared_memory
shm = shared_memory.SharedMemory(create=True, size=1 << 16)
resource_tracker.unregister(shm._name, "shared_memory")  # as a SIGKILLed vLLM worker: nobody unlinks it
print(shm.name, flush=True)
time.sleep(600)
"""


def test_stop_removes_the_shared_memory_segments_a_killed_engine_left(tmp_path):
    """vLLM's processes unlink their /dev/shm message-queue segments only on a clean exit; once
    an engine's process group is gone, stop() removes those it had mapped, and no one else's."""
    import os
    import subprocess
    from multiprocessing import shared_memory

    from pdx.harness.process import group_shm_segments

    other = shared_memory.SharedMemory(create=True, size=4096)  # this process's: must survive
    engine = VllmEngine(EngineSpec(model="unused", port=free_port(), name="shm-owner"), log_path=tmp_path / "log")
    proc = subprocess.Popen([sys.executable, "-c", _SEGMENT_OWNER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        path = "/dev/shm/" + proc.stdout.readline().strip().lstrip("/")
        engine._proc = proc  # the harness's own process group, as launch() makes it
        assert group_shm_segments(proc.pid) == {path}
        engine.stop(grace_s=5.0)
        assert proc.returncode is not None
        assert not os.path.exists(path)
        assert os.path.exists("/dev/shm/" + other.name.lstrip("/"))
    finally:
        other.close()
        other.unlink()
        if proc.poll() is None:
            proc.kill()
