"""``kv_connector_extra_config`` of ``PdxConnector``: validated once, frozen for runtime.

Every key is documented here and in docs/connector.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdx.errors import ConfigError
from pdx.storage.config import StoreClientOptions as _StoreConfig
from pdx.storage.config import StoreConfig

_SECRETS = (("auth_token", "PDX_KV_AUTH_TOKEN"), ("kv_secret", "PDX_KV_SECRET"))


class _ExtraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transport: str = "tcp"  # a transports registry name
    transport_options: dict[str, Any] = Field(default_factory=dict)  # passed to create_transport
    control_host: str = "127.0.0.1"  # P: where the control server listens
    control_port: int = Field(default=0, ge=0, le=65535)  # P: the engine's kv_port; 0 picks one
    auth_token: str = ""  # control channel, shared by P and D; env PDX_KV_AUTH_TOKEN when empty; required
    kv_secret: str = ""  # the fleet secret the router signs transfer params with; env PDX_KV_SECRET; required
    lease_s: float = Field(default=30.0, gt=0)  # P: hold finished blocks at most this long for D
    recv_timeout_s: float = Field(default=30.0, gt=0)  # D: registration to last layer landed
    write_timeout_s: float = Field(default=10.0, gt=0)  # P: one posted write
    stats_path: str | None = None  # D: one JSON line of figures per request; P: one per transfer
    debug_corrupt_block: bool = False  # tests only: D damages one landed block of every transfer
    debug_corrupt_prefix: str | None = None  # tests only: ... of transfers whose id starts with this
    store: _StoreConfig | None = None  # the shared storage tier (prefix reuse); off when absent


@dataclass(frozen=True)
class ConnectorConfig:
    transport: str = "tcp"
    transport_options: dict[str, Any] = field(default_factory=dict)
    control_host: str = "127.0.0.1"
    control_port: int = 0
    auth_token: str = ""
    kv_secret: str = ""
    lease_s: float = 30.0
    recv_timeout_s: float = 30.0
    write_timeout_s: float = 10.0
    stats_path: str | None = None
    debug_corrupt_block: bool = False
    debug_corrupt_prefix: str | None = None
    store: StoreConfig | None = None

    def should_corrupt(self, transfer_id: str) -> bool:
        prefix = self.debug_corrupt_prefix
        return self.debug_corrupt_block or (bool(prefix) and transfer_id.startswith(prefix or ""))

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        try:
            parsed = _ExtraConfig.model_validate(dict(extra or {}))
        except ValidationError as exc:
            raise ConfigError(f"invalid PdxConnector kv_connector_extra_config: {exc}") from exc
        values = parsed.model_dump()
        for key, env in _SECRETS:
            if not values[key]:
                values[key] = os.environ.get(env, "")
            if not values[key]:
                raise ConfigError(f"PdxConnector needs a non-empty {key}: set kv_connector_extra_config.{key} "
                                  f"or the environment variable {env} (pdx launch sets both)")
        if values["store"] is not None:
            values["store"] = StoreConfig(**values["store"])
        return cls(**values)
