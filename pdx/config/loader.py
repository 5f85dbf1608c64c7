"""Load a topology YAML file: validate, map errors to lines, apply env overrides.

Errors raise ``pdx.errors.ConfigError`` with ``FILE:LINE: FIELD: what is wrong``.
Environment overrides (applied before validation, so they are validated too):

    PDX_ROUTER_HOST, PDX_ROUTER_PORT, PDX_ROUTER_AUTH_TOKEN, PDX_ROUTER_ADMIN_TOKEN, PDX_ROUTER_LOG_LEVEL,
    PDX_ROUTER_MAX_RETRIES (router.retries.max_retries), PDX_MODEL_PATH, PDX_KV_SECRET (kv_secret)
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from pdx.config import schema, topology
from pdx.errors import ConfigError

ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "PDX_ROUTER_HOST": ("router", "host"),
    "PDX_ROUTER_PORT": ("router", "port"),
    "PDX_ROUTER_AUTH_TOKEN": ("router", "auth_token"),
    "PDX_ROUTER_ADMIN_TOKEN": ("router", "admin_token"),
    "PDX_ROUTER_LOG_LEVEL": ("router", "log_level"),
    "PDX_ROUTER_MAX_RETRIES": ("router", "retries", "max_retries"),
    "PDX_MODEL_PATH": ("model", "path"),
    "PDX_KV_SECRET": ("kv_secret",),
}


def _line_of(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int:
    """The 1-based line of the deepest YAML node that ``loc`` reaches."""
    if node is None:
        return 1
    line = node.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                child = node.value[part]
                line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _field_name(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "literal[")):  # pydantic's internal loc parts
            out += f".{part}" if out else part
    return out or "(top level)"


def _apply_env(raw: dict) -> None:
    for name, path in ENV_OVERRIDES.items():
        value = os.environ.get(name)
        if value is None:
            continue
        target = raw
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: cannot override {'.'.join(path)}: parent is not a mapping")
        target[path[-1]] = value


def parse_topology(text: str, source: str = "<string>") -> topology.Topology:
    """Validate topology YAML text; raise ConfigError naming source, line and field."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(f"{source}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}:1: a topology is a mapping with 'model', 'engines', 'router'")
    _apply_env(raw)
    try:
        spec = schema.TopologySpec.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}:{_line_of(root, loc)}: {_field_name(loc)}: {msg}")
        raise ConfigError("invalid topology:\n  " + "\n  ".join(lines)) from None
    return to_topology(spec, source)


def load_topology(path: str | os.PathLike[str]) -> topology.Topology:
    """Read and validate a topology file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the topology file: {exc.strerror}") from exc
    return parse_topology(text, str(p))


def to_engine(e: schema.EngineSpec) -> topology.Engine:
    local = None
    if e.local is not None:
        local = topology.LocalLaunch(
            cpu=e.local.cpu,
            kv_cache_gib=e.local.kv_cache_gib,
            side_channel_port=e.local.side_channel_port,
            max_num_seqs=e.local.max_num_seqs,
            env=tuple(sorted(e.local.env.items())),
            extra_args=tuple(e.local.extra_args),
        )
    return topology.Engine(
        id=e.id,
        url=e.url,
        role=e.role,
        kind=e.kind,
        connector=(e.connector or "pdx") if e.kind == "vllm" else None,
        bootstrap_port=e.bootstrap_port,
        kv_port=e.kv_port,
        api_key=e.api_key,
        transport=e.transport.name,
        transport_options=tuple(sorted(e.transport.options.items())),
        local=local,
    )


def to_topology(spec: schema.TopologySpec, source: str) -> topology.Topology:
    r = spec.router
    router = topology.RouterConfig(
        host=r.host,
        port=r.port,
        policies=topology.Policies(**r.policies.model_dump()),
        timeouts=topology.Timeouts(**r.timeouts.model_dump()),
        health=topology.Health(**r.health.model_dump()),
        max_retries=r.retries.max_retries,
        max_attempts=r.retries.max_attempts,
        retry_backoff_ms=r.retries.backoff_ms,
        circuit_failure_threshold=r.circuit.failure_threshold,
        circuit_cooldown_s=r.circuit.cooldown_s,
        auth_token=r.auth_token,
        admin_token=r.admin_token,
        insecure=r.insecure,
        client_timeouts=topology.ClientTimeouts(**r.client_timeouts.model_dump()),
        max_body_bytes=r.max_body_bytes,
        max_json_depth=r.max_json_depth,
        max_connections_per_engine=r.max_connections_per_engine,
        log_level=r.log_level,
    )
    return topology.Topology(
        model=spec.model.name,
        model_path=spec.model.path,
        max_model_len=spec.model.max_model_len,
        dtype=spec.model.dtype,
        engines=tuple(to_engine(e) for e in spec.engines),
        router=router,
        storage=tuple(sorted(spec.storage.items())),
        source=source,
        kv_secret=spec.kv_secret,
    )
