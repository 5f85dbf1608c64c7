"""Topology files: the shipped examples validate; errors name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdx.config import load_topology, parse_topology
from pdx.config.cli import check_main
from pdx.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))

GOOD = """\
model: {name: tiny}
engines:
  - id: p0
    url: http://127.0.0.1:8100
    role: prefill
    kv_port: 5700
  - id: d0
    url: http://127.0.0.1:8200
    role: decode
"""


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path, capsys):
    assert check_main(["--topology", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_expected_example_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"local-1p1d.yaml", "local-1p1d-nixl.yaml", "2p2d.yaml", "sglang-1p1d.yaml"} <= names


def test_protocol_follows_the_engines():
    assert parse_topology(GOOD).protocol == "pdx"
    assert load_topology(Path(__file__).parents[2] / "configs/local-1p1d-nixl.yaml").protocol == "nixl"
    assert load_topology(Path(__file__).parents[2] / "configs/sglang-1p1d.yaml").protocol == "sglang"


def test_errors_name_file_line_and_field():
    bad = GOOD.replace("role: decode", "role: decoder").replace("router", "x")
    with pytest.raises(ConfigError) as err:
        parse_topology(bad, "fleet.yaml")
    assert "fleet.yaml:9: engines[1].role:" in str(err.value)
    with pytest.raises(ConfigError, match=r"fleet.yaml:4: engines\[0\].url: must look like"):
        parse_topology(GOOD.replace("http://127.0.0.1:8100", "127.0.0.1"), "fleet.yaml")
    with pytest.raises(ConfigError, match=r"fleet.yaml:\d+: router.port"):
        parse_topology(GOOD + "router:\n  port: 70000\n", "fleet.yaml")
    with pytest.raises(ConfigError, match=r"router.polices: Extra inputs are not permitted"):
        parse_topology(GOOD + "router:\n  polices: {}\n", "fleet.yaml")
    with pytest.raises(ConfigError, match=r"fleet.yaml:3: not valid YAML"):
        parse_topology("model: {name: tiny}\nengines: [\n", "fleet.yaml")


def test_fleet_rules():
    with pytest.raises(ConfigError, match="kv_port"):
        parse_topology(GOOD.replace("    kv_port: 5700\n", ""))
    with pytest.raises(ConfigError, match="unique"):
        parse_topology(GOOD.replace("id: d0", "id: p0"))
    with pytest.raises(ConfigError, match="one protocol"):
        parse_topology(GOOD.replace("    role: decode\n", "    role: decode\n    kind: sglang\n"))
    with pytest.raises(ConfigError, match="bootstrap_port applies to sglang"):
        parse_topology(GOOD.replace("    role: decode\n", "    role: decode\n    bootstrap_port: 1\n"))


def test_env_overrides_are_validated(monkeypatch):
    monkeypatch.setenv("PDX_ROUTER_PORT", "9123")
    monkeypatch.setenv("PDX_ROUTER_AUTH_TOKEN", "s3cret")
    topo = parse_topology(GOOD)
    assert topo.router.port == 9123 and topo.router.auth_token == "s3cret"
    monkeypatch.setenv("PDX_ROUTER_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="router.port"):
        parse_topology(GOOD)


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert check_main(["--topology", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read the topology file" in capsys.readouterr().err
