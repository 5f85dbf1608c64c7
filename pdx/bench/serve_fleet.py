"""``pdx bench serve --launch``: a local vLLM CPU fleet (store, engines, router) for one run.

``LocalFleet(topology_path, with_store)`` starts, in order:

1. with ``with_store`` and a ``storage:`` section: ``pdx store`` (``socket``,
   ``capacity_gb``, ``http_port`` from that section) as a child process;
2. every engine with a ``local`` section, as ``pdx launch`` would (same specs),
   plus, with the store, the keys of ``storage.connector`` that the installed
   PdxConnector accepts in its ``kv_connector_extra_config``. Keys it does not
   accept are dropped with a warning: the engines then serve from their private
   prefix caches only (the store runs, but no engine talks to it);
3. ``pdx route`` for the topology, as a child process, waiting for ``/ready``.

``stop()`` ends all of them (router, engines, store), idempotently. Callers hold
the machine-wide engine lock around the fleet's life.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdx.errors import EngineError

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:  # noqa: S310 (loopback)
            return int(resp.status)
    except OSError:
        return 0


def _wait_until(url: str, proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"{what} exited with code {proc.returncode} before {url} answered")
        if _status(url) == 200:
            return
        time.sleep(0.5)
    raise EngineError(f"{what} did not answer {url} within {timeout_s:.0f} s")


def connector_store_extras(storage: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``storage.connector`` keys the installed PdxConnector accepts, and those it does not."""
    from pdx.connector.config import _ExtraConfig

    wanted = dict(storage.get("connector") or {})
    known = set(_ExtraConfig.model_fields)
    return {k: v for k, v in wanted.items() if k in known}, sorted(
        k for k in wanted if k not in known
    )


class LocalFleet:
    """Store (optional), engines and router of one topology, owned for one run."""

    def __init__(self, topology_path: str | Path, with_store: bool, log_dir: str | Path) -> None:
        from pdx.config import load_topology
        from pdx.launch import with_fleet_secret

        self.topology = with_fleet_secret(load_topology(str(topology_path)))
        self.topology_path = str(topology_path)
        self.with_store = with_store
        self.log_dir = Path(log_dir)
        self.storage: dict[str, Any] = dict(self.topology.storage)
        self.engines: list[Any] = []
        self._store: subprocess.Popen | None = None
        self._router: subprocess.Popen | None = None
        self.store_connected = False  # the engines' connector was configured with the store

    @property
    def url(self) -> str:
        r = self.topology.router
        return f"http://{r.host}:{r.port}"

    @property
    def engine_urls(self) -> list[str]:
        return [e.url for e in self.topology.engines]

    @property
    def store_url(self) -> str | None:
        if not (self.with_store and self.storage.get("http_port")):
            return None
        return f"http://127.0.0.1:{int(self.storage['http_port'])}"

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            env = {**os.environ, "PDX_KV_SECRET": self.topology.kv_secret or ""}  # the router's fleet secret
            return subprocess.Popen([sys.executable, "-c", argv[0], *argv[1:]], stdin=subprocess.DEVNULL, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> LocalFleet:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        from pdx.harness.process import VllmEngine
        from pdx.launch import engine_spec, resolve_model_path

        extras: dict[str, Any] = {}
        if self.with_store and self.storage:
            s = self.storage
            argv = [
                "import sys; from pdx.storage.cli import main; sys.exit(main(sys.argv[1:]))",
                "--socket",
                str(s.get("socket", "/tmp/pdx-bench-store.sock")),
                "--capacity-gb",
                str(s.get("capacity_gb", 2)),
                "--http-port",
                str(s.get("http_port", 8300)),
            ]
            self._store = self._spawn(argv, "store")
            _wait_until(f"{self.store_url}/metrics", self._store, "pdx store", 60.0)
            extras, dropped = connector_store_extras(s)
            if dropped:
                logger.warning("the installed PdxConnector does not accept %s: engines use their private "
                               "prefix caches only", dropped)  # fmt: skip
            self.store_connected = bool(extras)
        local = [e for e in self.topology.engines if e.local is not None]
        model_dir = resolve_model_path(self.topology) if local else ""
        for engine in local:
            spec = engine_spec(self.topology, engine, model_dir)
            if (
                extras
                and spec.kv_transfer_config
                and spec.kv_transfer_config.get("kv_connector") == "PdxConnector"
            ):
                kv = dict(spec.kv_transfer_config)
                kv.setdefault("kv_load_failure_policy", "recompute")  # a chunk not loaded is recomputed
                kv["kv_connector_extra_config"] = {
                    **kv.get("kv_connector_extra_config", {}),
                    **extras,
                }
                spec = replace(spec, kv_transfer_config=kv)
            self.engines.append(VllmEngine(spec, self.log_dir / f"{engine.id}.log"))
        self._start_engines_and_router(timeout_s)

    def _start_engines_and_router(self, timeout_s: float) -> None:
        """Start ``self.engines`` together, then ``pdx route`` for the topology."""
        from pdx.harness.process import start_engines

        start_engines(self.engines, timeout_s)
        route = ["import sys; from pdx.router.cli import route_main; sys.exit(route_main(sys.argv[1:]))",
                 "--topology", self.topology_path]  # fmt: skip
        self._router = self._spawn(route, "router")
        _wait_until(f"{self.url}/ready", self._router, "pdx route", 60.0)

    def stop(self) -> None:
        """End router, engines and store. Idempotent."""
        for proc in (self._router,):
            _end(proc)
        self._router = None
        for engine in reversed(self.engines):
            engine.stop()
        self.engines = []
        _end(self._store)
        self._store = None

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _end(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5.0)
