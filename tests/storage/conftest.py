"""Fixtures: real ``pdx store`` processes and a real ``redis-server`` on loopback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.helpers import RedisProc, StoreProc, pdx_arenas


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator:
    procs: list[StoreProc] = []

    def start(**kwargs) -> StoreProc:
        proc = StoreProc(tmp_path, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:  # every store still running must shut down cleanly and leave nothing
        if proc.proc.poll() is None:
            assert proc.stop() == 0, proc.log_path.read_text()
            assert proc.arena not in pdx_arenas()
            assert not os.path.exists(proc.socket)


@pytest.fixture
def store(store_factory) -> StoreProc:
    return store_factory()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProc]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("redis")
    server = RedisProc(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def client_factory() -> Iterator:
    from pdx.storage.client import StoreClient, create_client

    clients: list[StoreClient] = []

    def make(address: str, **kwargs) -> StoreClient:
        kwargs.setdefault("l2_budget_s", 2.0)  # room for a promotion on a busy test box
        c = create_client(address, **kwargs)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
