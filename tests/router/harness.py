"""Run fake engines and the router in a background event loop, on real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import uvicorn
from pdx.transports.loop_thread import LoopThread

from pdx.config import parse_topology
from pdx.router.app import RouterApp
from pdx.router.server import CoalescingHttpToolsProtocol, uvicorn_options
from pdx.testing.fake_engine import FAKE_KV_SECRET, FakeEngine, Rendezvous


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Harness:
    """Fakes + router served by uvicorn in one background thread; ``stop()`` ends it all."""

    def __init__(self) -> None:
        self._loop_thread = LoopThread("pdx-test-router")
        self.loop = self._loop_thread.loop
        self._servers: list[uvicorn.Server] = []
        self._tasks: list[Any] = []
        self._by_url: dict[str, tuple[uvicorn.Server, Any]] = {}

    def shutdown(self, url: str) -> None:
        """Stop the server at ``url``: its port refuses connections from now on."""
        server, task = self._by_url.pop(url)
        server.should_exit = True
        task.result(10)

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return self._loop_thread.run(coro, timeout)

    def serve(self, app: Any) -> str:
        """Serve ``app`` on a fresh loopback port; return its base URL."""
        sock = _bound_socket()
        options = uvicorn_options(app.config) if isinstance(app, RouterApp) else {"http": CoalescingHttpToolsProtocol}
        config = uvicorn.Config(app, log_level="error", access_log=False, lifespan="on", **options)
        server = uvicorn.Server(config)
        self._servers.append(server)
        self._tasks.append(asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), self.loop))
        port = sock.getsockname()[1]
        self._by_url[f"http://127.0.0.1:{port}"] = (server, self._tasks[-1])
        deadline = 100
        while not server.started and deadline:
            threading.Event().wait(0.02)
            deadline -= 1
        assert server.started, "server did not start"
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        for task in self._tasks:
            try:
                task.result(10)
            except Exception:  # noqa: BLE001 - best effort in teardown
                pass
        self._loop_thread.stop()


def fleet_yaml(engines: list[tuple[FakeEngine, str]], router: str = "", model: str = "tiny") -> str:
    lines = [f"model: {{name: {model}}}", "engines:"]
    for i, (fake, url) in enumerate(engines):
        entry = f"  - {{id: {fake.name}, url: '{url}', role: {fake.role}, kind: {fake.kind}"
        if fake.kind == "vllm":
            entry += f", connector: {fake.connector}"
            if fake.connector == "pdx" and fake.role != "decode":
                entry += f", kv_port: {5700 + i}"
        elif fake.role == "prefill":
            entry += f", bootstrap_port: {8998 + i}"
        lines.append(entry + "}")
    lines.append(f"kv_secret: {FAKE_KV_SECRET}")
    lines.append("router:")
    lines.append("  health: {interval_s: 0.2, timeout_s: 1, unhealthy_after: 1, healthy_after: 1}")
    lines.append("  retries: {max_retries: 2, backoff_ms: 1}")
    lines.append("  timeouts: {connect_s: 1, prefill_s: 5, decode_first_byte_s: 5, idle_s: 5}")
    if router:
        lines.append(router)
    return "\n".join(lines) + "\n"


def start_fleet(
    h: Harness, fakes: list[FakeEngine], router: str = "", rendezvous: bool = True
) -> tuple[str, RouterApp]:
    """Serve ``fakes`` and a router in front of them; return the router's URL and app."""
    shared = Rendezvous(timeout_s=2.0) if rendezvous else None
    urls = []
    for fake in fakes:
        fake.rendezvous = shared
        urls.append(h.serve(fake))
    topology = parse_topology(fleet_yaml(list(zip(fakes, urls, strict=True)), router))
    app = RouterApp(topology)
    url = h.serve(app)
    for _ in range(250):  # the first health round puts the engines in rotation
        if all(s.is_healthy for s in app.fleet.states()):
            break
        threading.Event().wait(0.02)
    return url, app
