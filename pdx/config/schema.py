"""The topology file's schema: pydantic models for untrusted YAML.

Every field is documented here, once. ``pdx.config.load_topology`` validates a
file against these models and converts the result to the frozen dataclasses in
``pdx.config.topology``; nothing else in pdx sees these models.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = Field(min_length=1)  # the served model name clients send as "model"
    path: str | None = None  # model dir for local engines; "builtin:tiny" builds the tiny model
    max_model_len: int = Field(default=2048, gt=0)
    dtype: str = "float32"


class TransportSpec(_Strict):
    name: str = "tcp"  # a transports registry name: tcp, shm, nixl, ucx, loopback
    options: dict[str, object] = Field(default_factory=dict)  # passed to create_transport()


class LocalLaunch(_Strict):
    """Present on an engine that ``pdx launch`` starts on this machine."""

    cpu: int | None = None  # VLLM_CPU_OMP_THREADS_BIND (a core id or list, e.g. "0" or "0-1")
    kv_cache_gib: int = Field(default=1, gt=0)  # VLLM_CPU_KVCACHE_SPACE (whole GiB)
    side_channel_port: int | None = Field(default=None, ge=1, le=65535)  # VLLM_NIXL_SIDE_CHANNEL_PORT
    max_num_seqs: int = Field(default=16, gt=0)
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the engine
    extra_args: list[str] = Field(default_factory=list)  # extra api_server arguments


class EngineSpec(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str  # http://host:port of the engine's OpenAI server
    role: Literal["prefill", "decode", "both"]
    kind: Literal["vllm", "sglang"] = "vllm"
    connector: Literal["pdx", "nixl"] | None = None  # vLLM only; default pdx
    bootstrap_port: int | None = Field(default=None, ge=1, le=65535)  # SGLang prefill only
    kv_port: int | None = Field(default=None, ge=1, le=65535)  # pdx connector control port (P)
    api_key: str | None = None  # sent to the engine as "Authorization: Bearer ..."
    transport: TransportSpec = Field(default_factory=TransportSpec)
    local: LocalLaunch | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError("must look like http://HOST:PORT (https is not supported to engines)")
        if parts.path not in ("", "/"):
            raise ValueError("must not have a path")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _kind_fields(self) -> EngineSpec:
        if self.kind == "sglang":
            if self.connector is not None:
                raise ValueError("connector applies to vllm engines only")
            if self.local is not None:
                raise ValueError("pdx launch starts vllm engines only; remove 'local'")
        elif self.bootstrap_port is not None:
            raise ValueError("bootstrap_port applies to sglang engines only")
        if self.kind == "vllm" and (self.connector or "pdx") == "pdx" and self.role != "decode":
            if self.kv_port is None:
                raise ValueError("a pdx-connector engine that prefills needs kv_port (its connector's control port)")
        elif self.kv_port is not None:
            raise ValueError("kv_port applies to pdx-connector prefill engines only")
        return self


class PolicySpec(_Strict):
    prefill: Literal["prefix_aware", "round_robin", "least_loaded", "session_affinity"] = "prefix_aware"
    decode: Literal["least_loaded", "round_robin", "session_affinity", "prefix_aware"] = "least_loaded"
    session_header: str = "x-session-id"  # requests with this header stick to one engine pair
    disaggregate_min_tokens: int = Field(default=0, ge=0)  # shorter prompts go to D alone (vllm)
    decode_prefix_fraction: float = Field(default=1.1, ge=0)  # D alone if D holds this share (>1: off)
    chunk_size: int = Field(default=256, gt=0)  # tokens per chunk key


class TimeoutSpec(_Strict):
    connect_s: float = Field(default=2.0, gt=0)
    prefill_s: float = Field(default=300.0, gt=0)  # until P's response is complete
    decode_first_byte_s: float = Field(default=300.0, gt=0)  # until D's response headers
    idle_s: float = Field(default=300.0, gt=0)  # longest gap between streamed chunks


class RetrySpec(_Strict):
    max_retries: int = Field(default=2, ge=0)  # extra attempts, each with a fresh pair and id
    max_attempts: int = Field(default=3, ge=1, le=10)  # upstream attempts per client request, a hard cap
    backoff_ms: float = Field(default=20.0, ge=0)


class ClientTimeoutSpec(_Strict):
    header_s: float = Field(default=10.0, gt=0)  # from a connection's first byte until a request's headers end
    body_s: float = Field(default=30.0, gt=0)  # from the headers until the whole request body arrived
    keep_alive_s: float = Field(default=10.0, gt=0)  # an idle connection (none sent yet, or between requests)


class HealthSpec(_Strict):
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    unhealthy_after: int = Field(default=2, gt=0)  # consecutive failed checks
    healthy_after: int = Field(default=1, gt=0)  # consecutive good checks
    scrape_metrics: bool = True  # read engines' /metrics for load and KV-transfer figures


class CircuitSpec(_Strict):
    failure_threshold: int = Field(default=5, gt=0)  # consecutive request failures that open it
    cooldown_s: float = Field(default=10.0, gt=0)  # then one trial request (half-open)


class RouterSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    policies: PolicySpec = Field(default_factory=PolicySpec)
    timeouts: TimeoutSpec = Field(default_factory=TimeoutSpec)
    retries: RetrySpec = Field(default_factory=RetrySpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    circuit: CircuitSpec = Field(default_factory=CircuitSpec)
    auth_token: str | None = Field(default=None, min_length=1)  # clients must send "Authorization: Bearer <token>"
    admin_token: str | None = Field(default=None, min_length=1)  # POST/DELETE /workers; None: membership is fixed
    insecure: bool = False  # allow a non-loopback host without auth_token
    client_timeouts: ClientTimeoutSpec = Field(default_factory=ClientTimeoutSpec)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_json_depth: int = Field(default=64, ge=2, le=200)  # nesting of a request body (orjson writes <= 254)
    max_connections_per_engine: int = Field(default=256, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "warning"


class TopologySpec(_Strict):
    model: ModelSpec
    engines: list[EngineSpec] = Field(default_factory=list)
    router: RouterSpec = Field(default_factory=RouterSpec)
    storage: dict[str, object] = Field(default_factory=dict)  # reserved for the storage tier
    # The fleet secret (env PDX_KV_SECRET): the router signs each leg's pdx transfer params with
    # it and pdx-connector engines verify them (kv_connector_extra_config.kv_secret). Required by
    # a pdx fleet's router; ``pdx launch`` generates one when absent. Never log or commit it.
    kv_secret: str | None = Field(default=None, min_length=16, repr=False)

    @model_validator(mode="after")
    def _fleet(self) -> TopologySpec:
        ids = [e.id for e in self.engines]
        if len(set(ids)) != len(ids):
            raise ValueError(f"engine ids must be unique, got {ids}")
        urls = [e.url for e in self.engines]
        if len(set(urls)) != len(urls):
            raise ValueError("engine urls must be unique")
        kinds = {e.kind for e in self.engines}
        if len(kinds) > 1:
            raise ValueError("one fleet speaks one protocol: all engines vllm, or all sglang")
        connectors = {e.connector or "pdx" for e in self.engines if e.kind == "vllm"}
        if len(connectors) > 1:
            raise ValueError("all vllm engines must use the same connector (pdx or nixl)")
        if "sglang" in kinds and any(e.role == "both" for e in self.engines):
            raise ValueError("sglang engines are prefill or decode, not both")
        return self
