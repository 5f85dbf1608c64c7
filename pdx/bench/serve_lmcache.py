"""``pdx bench serve --compare-lmcache``: the same local fleet with LMCache in place of pdx's store.

``LMCacheFleet(topology_path, log_dir)`` has ``LocalFleet``'s interface (``start()``,
``stop()``, context manager, ``url``, ``engine_urls``, ``store_url``, ``topology``) and
starts, in order:

1. LMCache's multi-process server (``lmcache server``, from the optional venv that
   ``scripts/setup-lmcache.sh`` makes) on loopback: a CPU L1 of
   ``storage.capacity_gb`` GB (LRU), ``storage.connector.store.chunk_size`` tokens per
   chunk, engine-driven transfers through one shared-memory segment;
2. every engine with a ``local`` section with the spec ``pdx launch`` gives it (model,
   port, cores, KV-cache size, extra args and env) except its connector:
   ``LMCacheMPConnector`` (LMCache's own module, ``kv_both``) talking to that server;
   the engines import LMCache from the venv's site-packages (``PYTHONPATH``);
3. ``pdx route`` for the topology, as ``LocalFleet`` does.

``store_url`` is the server's HTTP address: its ``/metrics`` has the ``lmcache_mp_*``
counters (not ``pdx store``'s names). Engines' ``vllm:prompt_tokens_by_source_total
{source="external_kv_transfer"}`` counts the prompt tokens LMCache served. Only
role-``both`` engines are supported (LMCache's MP mode shares a prefix store; it does
not hand one request's KV from a prefill engine to a decode engine). Callers hold the
machine-wide engine lock around the fleet's life.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdx.bench.serve_fleet import READY_TIMEOUT_S, LocalFleet, _wait_until
from pdx.errors import ConfigError

logger = logging.getLogger(__name__)

CONNECTOR_MODULE = "lmcache.integration.vllm.lmcache_mp_connector"
VENV_ENV = "PDX_LMCACHE_VENV"  # overrides the venv's location


def lmcache_venv() -> Path:
    """The venv ``scripts/setup-lmcache.sh`` makes (``$PDX_LMCACHE_VENV`` or ``<repo>/.venv-lmcache``)."""
    default = Path(__file__).resolve().parents[2] / ".venv-lmcache"
    return Path(os.environ.get(VENV_ENV) or default)


def lmcache_site_packages(venv: Path) -> Path:
    """The venv's site-packages directory; ``ConfigError`` when LMCache is not installed there."""
    found = sorted(venv.glob("lib/python3*/site-packages/lmcache"))
    if not (venv / "bin" / "lmcache").exists() or not found:
        raise ConfigError(f"LMCache is not installed in {venv}: run scripts/setup-lmcache.sh")
    return found[0].parent


def lmcache_kv_transfer_config(mp_port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """``--kv-transfer-config`` of an engine that talks to the MP server at ``host:mp_port``."""
    return {
        "kv_connector": "LMCacheMPConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",  # as LocalFleet's engines: a chunk not loaded is recomputed
        "kv_connector_extra_config": {
            "lmcache.mp.host": f"tcp://{host}",
            "lmcache.mp.port": mp_port,
        },
    }


def lmcache_engine_spec(spec: Any, mp_port: int, site_packages: Path) -> Any:
    """``spec`` (a ``pdx.harness.process.EngineSpec``) with LMCache's connector and import path."""
    env = dict(spec.extra_env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site_packages), env.get("PYTHONPATH", "")) if p
    )
    return replace(
        spec,
        kv_transfer_config=lmcache_kv_transfer_config(mp_port, spec.host),
        nixl_side_channel_port=None,
        extra_env=tuple(sorted(env.items())),
    )


def server_command(
    venv: Path, port: int, http_port: int, l1_gb: float, chunk_size: int, num_engines: int = 1
) -> list[str]:
    """argv of LMCache's MP server: CPU L1 only, loopback, engine-driven SHM transfers.

    One store/retrieve worker thread per engine (with fewer, engines' transfers queue
    behind each other's on a shared thread).
    """
    return [
        str(venv / "bin" / "lmcache"), "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--http-host", "127.0.0.1", "--http-port", str(http_port),
        "--l1-size-gb", f"{l1_gb:g}", "--eviction-policy", "LRU",
        "--chunk-size", str(chunk_size),
        "--supported-transfer-mode", "engine_driven",
        "--shm-name", f"pdx-lmcache-{port}",
        "--max-workers", str(max(1, num_engines)),
    ]  # fmt: skip


class LMCacheFleet(LocalFleet):
    """LMCache MP server, engines (LMCacheMPConnector) and router of one topology, for one run."""

    def __init__(self, topology_path: str | Path, log_dir: str | Path) -> None:
        super().__init__(topology_path, with_store=False, log_dir=log_dir)
        self.venv = lmcache_venv()
        store = dict(self.storage.get("connector") or {}).get("store") or {}
        self.l1_gb = float(self.storage.get("capacity_gb", 2))
        self.chunk_size = int(store.get("chunk_size", 256))
        self.mp_port = 0
        self.http_port = 0

    @property
    def store_url(self) -> str | None:
        return f"http://127.0.0.1:{self.http_port}" if self._store is not None else None

    def _start(self, timeout_s: float) -> None:
        from pdx.harness.process import VllmEngine, free_port
        from pdx.launch import engine_spec, resolve_model_path

        site_packages = lmcache_site_packages(self.venv)
        local = [e for e in self.topology.engines if e.local is not None]
        not_both = [e.id for e in local if e.role != "both"]
        if not_both:
            raise ConfigError(f"LMCacheFleet runs role-both engines only; {not_both} are not")
        self.mp_port, self.http_port = free_port(), free_port()
        cmd = server_command(
            self.venv, self.mp_port, self.http_port, self.l1_gb, self.chunk_size, len(local)
        )
        env = {
            **os.environ,
            "LMCACHE_DISABLE_BANNER": "1",
            "LMCACHE_TRACK_USAGE": "false",
            "DO_NOT_TRACK": "1",
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logger.info("starting LMCache server: %s", " ".join(cmd))
        with open(self.log_dir / "lmcache-server.log", "ab") as log:
            self._store = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        _wait_until(f"{self.store_url}/metrics", self._store, "LMCache server", 120.0)
        model_dir = resolve_model_path(self.topology) if local else ""
        for engine in local:
            spec = lmcache_engine_spec(
                engine_spec(self.topology, engine, model_dir), self.mp_port, site_packages
            )
            self.engines.append(VllmEngine(spec, self.log_dir / f"{engine.id}.log"))
        self._start_engines_and_router(timeout_s)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> LMCacheFleet:
        super().start(timeout_s)
        return self

    def __enter__(self) -> LMCacheFleet:
        return self.start()
