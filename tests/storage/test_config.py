"""One ``StoreConfig`` for the server, the CLI and the clients: text is validated once
(pydantic, errors naming the field), runtime reads the frozen dataclass."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from pdx.errors import ConfigError
from pdx.storage.cli import build_parser, config_from_args
from pdx.storage.config import GB, MB, StoreClientOptions, StoreConfig, StoreOptions


def test_cli_flags_and_env_build_the_config(monkeypatch):
    monkeypatch.setenv("PDX_STORE_CAPACITY_GB", "2")
    monkeypatch.setenv("PDX_STORE_REMOTE_TOKEN", "s3cret")
    args = build_parser().parse_args(
        ["--socket", "/tmp/x.sock", "--slab-mb", "8", "--http-port", "-1", "--l2", "file:///tmp/l2",
         "--l2-workers", "0", "--remote-listen", "127.0.0.1:0", "--prefault"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config == StoreConfig(
        socket="/tmp/x.sock", capacity_bytes=2 * GB, slab_bytes=8 * MB, http_port=-1, l2_url="file:///tmp/l2",
        l2_workers=1, remote_listen="127.0.0.1:0", auth_token="s3cret", prefault=True,
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.socket = "/elsewhere"  # type: ignore[misc]


def test_cli_defaults_are_the_config_defaults(monkeypatch):
    for name in ("SOCKET", "CAPACITY_GB", "REMOTE_TOKEN", "L2"):
        monkeypatch.delenv(f"PDX_STORE_{name}", raising=False)
    assert config_from_args(build_parser().parse_args([])) == StoreConfig()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--capacity-gb", "-1"], "must be positive"),
        (["--http-port", "70000"], "http_port"),
        (["--lease-ttl-s", "soon"], "lease_ttl_s"),
        (["--remote-transport", "pigeon"], "remote_transport"),
        (["--remote-listen", "nohost"], "--remote-listen must be HOST:PORT"),
    ],
)
def test_bad_flags_are_config_errors_naming_the_field(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args(build_parser().parse_args(argv))


def test_client_options_take_only_what_an_engine_sets():
    config = StoreClientOptions(socket="pdx-store://10.0.0.7:8301", auth_token="t").to_config()
    assert config == StoreConfig("pdx-store://10.0.0.7:8301", auth_token="t") and config.is_remote
    with pytest.raises(ValidationError, match="capacity_gb"):
        StoreClientOptions.model_validate({"socket": "/tmp/s.sock", "capacity_gb": 8})
    with pytest.raises(ValidationError, match="HOST:PORT"):
        StoreClientOptions(socket="pdx-store://nohostport")
    assert StoreOptions().to_config() == StoreConfig()


def test_create_client_takes_an_address_or_a_config(store):
    from pdx.storage.client import create_client

    with create_client(store.socket, timeout_s=0.5, token=None) as client:
        assert client.config == StoreConfig(store.socket, timeout_s=0.5)
    with create_client(StoreConfig(store.socket), l2_budget_s=0.0) as client:
        assert client.config.l2_budget_s == 0.0 and client.lookup_prefix([b"\x01" * 32]) == 0
