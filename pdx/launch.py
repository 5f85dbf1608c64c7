"""``pdx launch --topology FILE``: start a topology's local vLLM engines, then the router.

For every engine with a ``local`` section it starts a vLLM CPU OpenAI server
(``python -m vllm.entrypoints.openai.api_server``, see ``pdx.harness.process``)
with the ``--kv-transfer-config`` its role and connector need:

====================  ==========================================================
connector             kv_transfer_config
====================  ==========================================================
``pdx``               PdxConnector from ``pdx.engines.vllm``,
                      ``kv_load_failure_policy: recompute``; extra config
                      ``transport``, ``transport_options``, and for P
                      ``control_host``/``control_port`` = the engine's ``kv_port``;
                      env ``PDX_KV_SECRET`` (the fleet secret) and
                      ``PDX_KV_AUTH_TOKEN`` (the control token derived from it)
``nixl``              NixlConnector, ``kv_buffer_device: cpu``; env
                      ``VLLM_NIXL_SIDE_CHANNEL_HOST/PORT`` (``side_channel_port``)
====================  ==========================================================

The fleet secret is the topology's ``kv_secret`` (or env ``PDX_KV_SECRET``); when
neither is set, ``pdx launch`` generates one for this run. It reaches the engines
through their environment (not their command line, which ``ps`` shows) and the
router in-process; the router signs every leg's transfer params with it.

``kv_role`` is ``kv_producer`` for prefill, ``kv_consumer`` for decode,
``kv_both`` for both. Engines start together (about 60-120 s on 2 cores) while a
progress line shows each one's state; then the router serves in the foreground.
Ctrl-C or SIGTERM stops the router and every engine's process group. Engine
logs go to ``--log-dir`` (default ``/tmp/pdx-launch``).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from pdx.config import load_topology
from pdx.config.topology import Engine, Topology
from pdx.connector.signing import control_token
from pdx.errors import ConfigError, EngineError

logger = logging.getLogger(__name__)

KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
READY_TIMEOUT_S = 300.0


def resolve_model_path(topology: Topology) -> str:
    """The model directory local engines load (``builtin:tiny`` is built if missing)."""
    path = topology.model_path
    if path is None:
        raise ConfigError(f"{topology.source}: model.path is required to launch local engines")
    if path == "builtin:tiny":
        from pdx.models.tiny import build_tiny_model

        return str(build_tiny_model())
    if not Path(path).expanduser().is_dir():
        raise ConfigError(f"{topology.source}: model.path {path!r} is not a directory")
    return str(Path(path).expanduser())


def with_fleet_secret(topology: Topology) -> Topology:
    """``topology`` with a ``kv_secret``: its own, or a fresh random one for this run."""
    if topology.kv_secret:
        return topology
    return replace(topology, kv_secret=secrets.token_hex(32))


def secret_env(topology: Topology, engine: Engine) -> tuple[tuple[str, str], ...]:
    """What a pdx-connector engine needs of the fleet secret, as environment variables."""
    if engine.connector != "pdx":
        return ()
    if not topology.kv_secret:
        raise ConfigError(f"{topology.source}: a pdx engine needs the fleet secret: set kv_secret or PDX_KV_SECRET")
    return (("PDX_KV_AUTH_TOKEN", control_token(topology.kv_secret)), ("PDX_KV_SECRET", topology.kv_secret))


def kv_transfer_config(engine: Engine) -> dict[str, Any]:
    """The ``--kv-transfer-config`` of one engine."""
    role = KV_ROLES[engine.role]
    if engine.connector == "nixl":
        return {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
    extra: dict[str, Any] = {"transport": engine.transport, "transport_options": dict(engine.transport_options)}
    if engine.kv_port is not None:
        extra["control_host"] = engine.host
        extra["control_port"] = engine.kv_port
    return {
        "kv_connector": "PdxConnector",
        "kv_connector_module_path": "pdx.engines.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",  # a failed or partial transfer is recomputed, not an error
        "kv_connector_extra_config": extra,
    }


def engine_spec(topology: Topology, engine: Engine, model_dir: str):  # -> pdx.harness.process.EngineSpec
    from pdx.harness.process import EngineSpec

    local = engine.local
    assert local is not None
    return EngineSpec(
        model=model_dir,
        port=engine.port,
        host=engine.host,
        served_model_name=topology.model,
        max_model_len=topology.max_model_len,
        dtype=topology.dtype,
        max_num_seqs=local.max_num_seqs,
        kv_cache_gib=local.kv_cache_gib,
        cpu_bind=None if local.cpu is None else str(local.cpu),
        kv_transfer_config=kv_transfer_config(engine),
        nixl_side_channel_port=local.side_channel_port if engine.connector == "nixl" else None,
        extra_args=local.extra_args,
        extra_env=local.env + secret_env(topology, engine),
        name=engine.id,
    )


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as resp:  # noqa: S310 (loopback)
            return resp.status == 200
    except OSError:
        return False


def start_local_engines(
    topology: Topology, log_dir: Path, out: TextIO | None = sys.stderr, timeout_s: float = READY_TIMEOUT_S
) -> list:
    """Start every local engine together and wait until all are healthy.

    Shows one progress line on ``out``. On failure or interrupt every started
    engine is stopped before the exception propagates.
    """
    from pdx.harness.process import VllmEngine

    local = [e for e in topology.engines if e.local is not None]
    if not local:
        return []
    model_dir = resolve_model_path(topology)
    log_dir.mkdir(parents=True, exist_ok=True)
    engines = [VllmEngine(engine_spec(topology, e, model_dir), log_dir / f"{e.id}.log") for e in local]
    t0 = time.monotonic()
    try:
        for engine in engines:
            engine.launch()
        ready: set[str] = set()
        last_print = 0.0
        while len(ready) < len(engines):
            elapsed = time.monotonic() - t0
            for engine in engines:
                name = engine.spec.name
                if name in ready:
                    continue
                if not engine.is_alive():
                    raise EngineError(f"engine {name} exited before it was ready; log {engine.log_path}:\n"
                                      f"{engine.log_tail()}")
                if _is_healthy(engine.url):
                    ready.add(name)
            if elapsed > timeout_s:
                waiting = [e.spec.name for e in engines if e.spec.name not in ready]
                raise EngineError(f"engines {waiting} not ready after {timeout_s:.0f} s; logs in {log_dir}")
            if out is not None and (time.monotonic() - last_print > (1.0 if out.isatty() else 15.0)):
                states = ", ".join(f"{e.spec.name} {'ready' if e.spec.name in ready else 'starting'}"
                                   for e in engines)  # fmt: skip
                end = "\r" if out.isatty() else "\n"
                out.write(f"[pdx launch] {elapsed:5.0f} s  {states}   {end}")
                out.flush()
                last_print = time.monotonic()
            if len(ready) < len(engines):
                time.sleep(0.5)
        if out is not None:
            out.write(f"\n[pdx launch] {len(engines)} engines ready in {time.monotonic() - t0:.0f} s\n")
    except BaseException:
        stop_engines(engines)
        raise
    return engines


def stop_engines(engines: list) -> None:
    for engine in reversed(engines):
        engine.stop()


def _stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind like Ctrl-C: a requested stop, exit status 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdx launch", description="start local engines, then the router")
    parser.add_argument("--topology", "-t", required=True, help="YAML topology file")
    parser.add_argument("--log-dir", default="/tmp/pdx-launch", help="engine logs (default /tmp/pdx-launch)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for engines")
    parser.add_argument("--no-router", action="store_true", help="start the engines only; wait for Ctrl-C")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        topology = with_fleet_secret(load_topology(args.topology))
        if not args.no_router:  # before any engine starts: an exposed router without a token
            from pdx.router.cli import check_exposure

            check_exposure(topology.router, topology.router.host)
    except ConfigError as exc:
        print(f"pdx launch: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop_on_signal)  # engines are stopped in ``finally``
    engines: list = []
    try:
        engines = start_local_engines(topology, Path(args.log_dir), timeout_s=args.ready_timeout)
        r = topology.router
        if args.no_router:
            print("[pdx launch] engines running; Ctrl-C stops them", file=sys.stderr)
            signal.pause()
        else:
            print(f"[pdx launch] router on http://{r.host}:{r.port} ({topology.protocol} protocol)", file=sys.stderr)
            from pdx.router.cli import serve

            serve(topology)
    except (ConfigError, EngineError) as exc:
        print(f"pdx launch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if engines:
            print("[pdx launch] stopping engines", file=sys.stderr)
            stop_engines(engines)
    return 0
