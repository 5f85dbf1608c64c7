"""``StoreConfig``: the one configuration of the storage tier, for the server and its clients.

Text enters through pydantic models, each field documented once there:

    StoreClientOptions   what an engine sets: the store's address, timeouts, auth token
                         (``PdxConnector``'s ``store`` extra config, ``create_client``)
    StoreOptions         the above plus what the ``pdx store`` server sets (flags, env)

``to_config()`` turns either into the frozen ``StoreConfig`` that the server, the CLI
and the clients read at runtime (fields a side does not set keep their defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdx.errors import ConfigError

GB = 1_000_000_000
MB = 1 << 20
DEFAULT_SOCKET = "/tmp/pdx-store.sock"
REMOTE_SCHEME = "pdx-store://"


@dataclass(frozen=True)
class StoreConfig:
    socket: str = DEFAULT_SOCKET  # unix socket of the node's store, or pdx-store://HOST:PORT (clients)
    # -- clients ---------------------------------------------------------------------------
    timeout_s: float = 1.0
    l2_budget_s: float = 0.5
    chunk_size: int = 256  # tokens per stored chunk (the connector's key hashing)
    auth_token: str = ""  # the remote port's token: required by the server, presented by clients
    retry_s: float = 2.0
    save_queue: int = 64
    verify_loads: bool = False
    transport_options: dict[str, Any] = field(default_factory=dict)
    # -- server ----------------------------------------------------------------------------
    capacity_bytes: int = 4 * GB
    slab_bytes: int = 64 * MB
    http_host: str = "127.0.0.1"
    http_port: int = 8300
    l2_url: str | None = None
    l2_queue: int = 256
    l2_workers: int = 2
    lease_ttl_s: float = 60.0
    max_budget_s: float = 5.0
    prefault: bool = False
    remote_listen: str | None = None
    remote_transport: str = "tcp"
    remote_advertise: str | None = None
    remote_data_port: int = 0
    http_token: str = ""  # bearer token of the HTTP API; empty: the remote token (auth_token)
    hello_timeout_s: float = 5.0  # a store connection's first frame must arrive by then
    idle_timeout_s: float = 600.0  # a store connection silent this long is closed (0: never)

    @property
    def is_remote(self) -> bool:
        return self.socket.startswith(REMOTE_SCHEME)


class StoreClientOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: str = Field(
        min_length=1, description="the node's `pdx store --socket`, or pdx-store://HOST:PORT (remote)"
    )
    timeout_s: float = Field(default=1.0, gt=0, description="one store call; then a miss / a dropped save")
    l2_budget_s: float = Field(default=0.5, ge=0, description="extra wait for a lookup/load that reaches L2")
    chunk_size: int = Field(default=256, gt=0, description="tokens per stored chunk; a multiple of block_size")
    auth_token: str = Field(
        default="", description="remote store: its --remote-token; env PDX_STORE_REMOTE_TOKEN when empty"
    )

    @field_validator("socket")
    @classmethod
    def _remote_address(cls, value: str) -> str:
        if value.startswith(REMOTE_SCHEME):
            from pdx.storage.remote_channel import parse_address

            parse_address(value)  # ValueError -> a validation error naming the field
        return value

    def to_config(self) -> StoreConfig:
        return StoreConfig(**self.model_dump())


class StoreOptions(StoreClientOptions):
    socket: str = Field(default=DEFAULT_SOCKET, min_length=1, description="unix socket engines connect to")
    capacity_gb: float = Field(default=4.0, description="L1 arena size (GB)")
    slab_mb: float = Field(default=64, description="slab size (MiB); a chunk must fit in one")
    http_host: str = Field(default="127.0.0.1", description="operator API and /metrics host")
    http_port: int = Field(default=8300, ge=-1, le=65535, description="0 = any free port, -1 = no HTTP")
    l2: str | None = Field(default=None, description="L2 URL: file:///path or redis://host:port/db")
    l2_queue: int = Field(default=256, ge=0, description="write-through backlog before drops (counted)")
    l2_workers: int = Field(default=2, description="threads writing to L2 (at least 1)")
    lease_ttl_s: float = Field(default=60.0, gt=0, description="longest a lease may live")
    max_budget_s: float = Field(default=5.0, ge=0, description="cap on the L2 time one lookup/acquire may spend")
    prefault: bool = Field(default=False, description="touch the whole arena at start")
    remote_listen: str | None = Field(
        default=None, description="serve engines on other nodes on this TCP port (0 = any); off by default"
    )
    remote_transport: Literal["tcp", "nixl", "auto"] = Field(
        default="tcp", description="transport remote clients move chunks over"
    )
    auth_token: str = Field(
        default="", description="token remote clients must present (prefer the env PDX_STORE_REMOTE_TOKEN)"
    )
    remote_advertise: str | None = Field(
        default=None, description="host remote clients dial for data (tcp; default: the listen host)"
    )
    remote_data_port: int = Field(default=0, ge=0, le=65535, description="tcp data port (0 = any free port)")
    http_token: str = Field(
        default="", description="bearer token of the HTTP API (env PDX_STORE_HTTP_TOKEN; default: the remote "
        "token); required when --http-host is not loopback, and for /clear, /pin, /unpin whenever set"
    )  # fmt: skip
    hello_timeout_s: float = Field(default=5.0, gt=0, description="close a connection whose hello takes longer")
    idle_timeout_s: float = Field(
        default=600.0, ge=0, description="close a store connection silent this long (0 = never); clients reconnect"
    )

    @model_validator(mode="after")
    def _tokens(self) -> StoreOptions:
        if self.remote_listen and not self.auth_token:
            raise ValueError(
                "--remote-listen needs a token: set --remote-token or PDX_STORE_REMOTE_TOKEN (remote clients "
                "present it; anyone without it is refused)"
            )
        if http_token_of(self.http_token, self.auth_token) == "" and self.http_port >= 0 and not is_loopback(
            self.http_host
        ):
            raise ValueError(
                f"--http-host {self.http_host} is not loopback: set --http-token or PDX_STORE_HTTP_TOKEN "
                "(or --remote-token), or bind the HTTP API to 127.0.0.1"
            )
        return self

    @field_validator("capacity_gb", "slab_mb")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"--capacity-gb and --slab-mb must be positive, got {value}")
        return value

    @field_validator("remote_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value:
            from pdx.storage.remote_server import parse_listen

            parse_listen(value)
        return value or None

    def to_config(self) -> StoreConfig:
        values = self.model_dump(exclude={"capacity_gb", "slab_mb", "l2", "l2_workers"})
        return StoreConfig(**values, capacity_bytes=int(self.capacity_gb * GB), slab_bytes=int(self.slab_mb * MB),
                           l2_url=self.l2 or None, l2_workers=max(1, self.l2_workers))  # fmt: skip


def http_token_of(http_token: str, auth_token: str) -> str:
    """The HTTP API's bearer token: its own, else the remote port's."""
    return http_token or auth_token


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve beyond loopback


def parse_options(model: type[StoreClientOptions], values: dict[str, Any], where: str) -> StoreConfig:
    """Validate text options into a ``StoreConfig``; ``ConfigError`` naming the field."""
    try:
        return model.model_validate(values).to_config()
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = ".".join(str(p) for p in err.get("loc", ())) or "options"
        raise ConfigError(f"{where}: {name}: {err.get('msg')}") from exc
