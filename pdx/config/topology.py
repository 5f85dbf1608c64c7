"""The runtime topology: frozen dataclasses built from a validated file.

``Protocol`` is derived from the engines: vLLM engines with the pdx connector
speak ``pdx``, with the stock NixlConnector ``nixl``; SGLang engines ``sglang``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

Role = Literal["prefill", "decode", "both"]
Protocol = Literal["pdx", "nixl", "sglang"]


@dataclass(frozen=True)
class LocalLaunch:
    cpu: int | None
    kv_cache_gib: int
    side_channel_port: int | None
    max_num_seqs: int
    env: tuple[tuple[str, str], ...]
    extra_args: tuple[str, ...]


@dataclass(frozen=True)
class Engine:
    id: str
    url: str  # http://host:port, no trailing slash
    role: Role
    kind: Literal["vllm", "sglang"] = "vllm"
    connector: Literal["pdx", "nixl"] | None = None  # vllm engines only
    bootstrap_port: int | None = None  # sglang prefill engines
    kv_port: int | None = None  # pdx connector's control port (prefill engines)
    api_key: str | None = None
    transport: str = "tcp"
    transport_options: tuple[tuple[str, object], ...] = ()
    local: LocalLaunch | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 80)

    @property
    def can_prefill(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")


@dataclass(frozen=True)
class Policies:
    prefill: str = "prefix_aware"
    decode: str = "least_loaded"
    session_header: str = "x-session-id"
    disaggregate_min_tokens: int = 0
    decode_prefix_fraction: float = 1.1
    chunk_size: int = 256


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 2.0
    prefill_s: float = 300.0
    decode_first_byte_s: float = 300.0
    idle_s: float = 300.0


@dataclass(frozen=True)
class Health:
    interval_s: float = 2.0
    timeout_s: float = 1.0
    unhealthy_after: int = 2
    healthy_after: int = 1
    scrape_metrics: bool = True


@dataclass(frozen=True)
class ClientTimeouts:
    header_s: float = 10.0  # from a connection's first byte until a request's headers end
    body_s: float = 30.0  # from the headers until the whole request body arrived
    keep_alive_s: float = 10.0  # an idle connection


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    policies: Policies = field(default_factory=Policies)
    timeouts: Timeouts = field(default_factory=Timeouts)
    health: Health = field(default_factory=Health)
    max_retries: int = 2
    max_attempts: int = 3  # upstream attempts per client request, the first included: caps max_retries
    retry_backoff_ms: float = 20.0
    circuit_failure_threshold: int = 5
    circuit_cooldown_s: float = 10.0
    auth_token: str | None = None
    admin_token: str | None = None  # membership changes (POST/DELETE /workers); None: refused
    insecure: bool = False  # a non-loopback host without auth_token may start
    client_timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    max_body_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 64
    max_connections_per_engine: int = 256
    log_level: str = "warning"


@dataclass(frozen=True)
class Topology:
    model: str  # served model name
    model_path: str | None
    max_model_len: int
    dtype: str
    engines: tuple[Engine, ...]
    router: RouterConfig
    storage: tuple[tuple[str, object], ...] = ()
    source: str = "<memory>"  # the file it came from
    kv_secret: str | None = field(default=None, repr=False)  # signs pdx transfer params (schema.py)

    @property
    def protocol(self) -> Protocol:
        return protocol_of(self.engines)


def protocol_of(engines: tuple[Engine, ...] | list[Engine]) -> Protocol:
    """The PD protocol a fleet speaks (``pdx`` for an empty vLLM fleet)."""
    for engine in engines:
        if engine.kind == "sglang":
            return "sglang"
        return "nixl" if engine.connector == "nixl" else "pdx"
    return "pdx"
