"""``pdx launch``: a fleet secret for every run, handed to engines by environment, and recompute on load failure."""

from __future__ import annotations

import json

from pdx.config import parse_topology
from pdx.connector.signing import control_token
from pdx.launch import engine_spec, kv_transfer_config, with_fleet_secret

YAML = """model: {name: tiny, path: /m}
engines:
  - {id: p0, url: 'http://127.0.0.1:8100', role: prefill, kv_port: 15600, local: {cpu: 0}}
  - {id: d0, url: 'http://127.0.0.1:8200', role: decode, local: {cpu: 1}}
"""


def test_launch_generates_a_secret_and_passes_it_by_environment(monkeypatch):
    monkeypatch.delenv("PDX_KV_SECRET", raising=False)
    topology = parse_topology(YAML)
    assert topology.kv_secret is None
    first, second = with_fleet_secret(topology), with_fleet_secret(topology)
    assert first.kv_secret and len(first.kv_secret) == 64 and first.kv_secret != second.kv_secret
    mine = parse_topology(YAML + "kv_secret: " + "k" * 32 + "\n")
    assert with_fleet_secret(mine).kv_secret == "k" * 32  # an operator's own secret is kept
    for engine in first.engines:
        spec = engine_spec(first, engine, "/m")
        env = dict(spec.extra_env)
        assert env["PDX_KV_SECRET"] == first.kv_secret
        assert env["PDX_KV_AUTH_TOKEN"] == control_token(first.kv_secret) != first.kv_secret
        assert first.kv_secret not in json.dumps(spec.kv_transfer_config)  # not on the command line


def test_launch_recomputes_failed_loads():
    topology = parse_topology(YAML)
    for engine in topology.engines:
        assert kv_transfer_config(engine)["kv_load_failure_policy"] == "recompute"


def test_launch_refuses_an_exposed_router_before_any_engine_starts(tmp_path, monkeypatch, capsys):
    import pdx.launch

    monkeypatch.delenv("PDX_ROUTER_AUTH_TOKEN", raising=False)
    started = []
    monkeypatch.setattr(pdx.launch, "start_local_engines", lambda *a, **kw: started.append(a) or [])
    path = tmp_path / "fleet.yaml"
    path.write_text(YAML + "router: {host: 0.0.0.0, port: 18999}\n")
    assert pdx.launch.main(["--topology", str(path)]) == 1
    assert not started, "engines started although the router could never serve"
    assert "router.auth_token" in capsys.readouterr().err
