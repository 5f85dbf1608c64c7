"""Fixtures of the transport contract suite.

Every test that takes ``kind`` runs once per transport in ``transports.REGISTRY``
that imports and is available here, and once for ``auto`` (restrict with
``PDX_TEST_TRANSPORTS=tcp,shm``).
The target endpoint lives in a real separate process for every transport except
``loopback``; the leak check fails a test that leaves threads, fds, tasks,
registrations or /dev/shm entries (named ``pdx-<kind>-...``) behind, on either side.
A medium's once-per-process library runtime is not a leak: its threads are named by the
class attribute ``process_threads`` and its fds returned by the classmethod ``process_fds()``.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator

import pdx.transports as transports
import pytest
from pdx.transports._fds import open_fds
from pdx.transports.loop_thread import LoopThread
from pdx.transports.remote import LocalEndpoint, RemoteEndpoint

IN_PROCESS = {"loopback"}
MARKS = {"nixl": pytest.mark.nixl, "ucx": pytest.mark.ucx, "cuda_ipc": pytest.mark.gpu}


# Transports the suite leaves out unless PDX_TEST_TRANSPORTS names them: ucx in one process with
# nixl (loaded first) leaks an endpoint socket when an initiator dies mid-write (docs/transports.md).
OPT_IN = {"ucx"}


def transport_kinds() -> list[str]:
    kinds = [*transports.available_transports(), "auto"]
    wanted = os.environ.get("PDX_TEST_TRANSPORTS")
    if wanted:
        names = [w.strip() for w in wanted.split(",") if w.strip()]
        return [k for k in names if k in kinds]
    return [k for k in kinds if k not in OPT_IN]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kind" in metafunc.fixturenames:
        params = [pytest.param(k, marks=[MARKS[k]] if k in MARKS else [], id=k) for k in transport_kinds()]
        metafunc.parametrize("kind", params)


@pytest.fixture(scope="session")
def aio() -> Iterator[LoopThread]:
    """A background event loop, as the vLLM connector uses: ``aio.run(coro, timeout)``."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # started once per session by the first spawn; not a leak
    loop = LoopThread("pdx-test-loop")
    yield loop
    loop.stop()


class ProcessPool:
    """Idle endpoint processes, reused across tests (each test gets a fresh transport in one)."""

    def __init__(self) -> None:
        self.idle: list[RemoteEndpoint] = []
        self.owned: dict[int, set[str]] = {}  # id(endpoint) -> fds its spawn opened (pipes, sentinel)

    def take(self, kind: str, **options: object) -> RemoteEndpoint:
        while self.idle:
            ep = self.idle.pop()
            if ep.process is not None and ep.process.is_alive():
                ep.call("open", kind, options)
                ep.kind = kind
                return ep
            ep.stop()
        before = open_fds()
        ep = RemoteEndpoint.start(kind, **options)
        self.owned[id(ep)] = open_fds() - before
        return ep

    def give_back(self, ep: RemoteEndpoint) -> None:
        if len(self.idle) < 2 and ep.process is not None and ep.process.is_alive():
            self.idle.append(ep)
        else:
            ep.stop()

    def fds(self) -> set[str]:
        """fds ("N->target") this pool keeps open on purpose (pipes and sentinels of idle processes)."""
        return {fd for ep in self.idle for fd in self.owned.get(id(ep), set())}

    def stop(self) -> None:
        for ep in self.idle:
            ep.stop()
        self.idle.clear()


@pytest.fixture(scope="session")
def process_pool() -> Iterator[ProcessPool]:
    pool = ProcessPool()
    yield pool
    pool.stop()


def _process_threads(kind: str) -> tuple[str, ...]:
    """Names of process-wide threads a medium keeps for its library (``process_threads``; not leaks)."""
    try:
        return tuple(getattr(transports.transport_class(kind), "process_threads", ()))
    except transports.TransportError:
        return ()


def _process_fds(kind: str) -> frozenset[str]:
    """fds a medium's process-wide library runtime owns (``process_fds()``; opened once, not leaks).

    Asked after the test, so a runtime the test started is accepted; fds a transport opens
    beyond it (listeners, endpoints, registrations) are still leaks."""
    try:
        hook = getattr(transports.transport_class(kind), "process_fds", None)
    except transports.TransportError:
        return frozenset()
    return frozenset(hook()) if hook is not None else frozenset()


def _shm_entries(kind: str) -> set[str]:
    """/dev/shm objects of this transport kind (transports name theirs ``pdx-<kind>-...``)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(f"pdx-{kind}-")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def leak_check(aio: LoopThread, process_pool: ProcessPool, request: pytest.FixtureRequest) -> Iterator[None]:
    kind = getattr(request.module, "TRANSPORT_KIND", "none")  # a module about one medium names it
    if hasattr(request.node, "callspec"):
        kind = request.node.callspec.params.get("kind", kind)
    threads = set(threading.enumerate())
    fds = open_fds()
    shm = _shm_entries(kind)
    shared = _process_threads(kind)
    yield
    deadline = time.monotonic() + 5
    while True:  # threads finishing their last socket call may need a moment to exit
        gc.collect()  # library handles (ucxx endpoints) close their sockets when collected
        extra_threads = [
            t.name for t in threading.enumerate() if t not in threads and t.is_alive() and t.name not in shared
        ]
        kept = process_pool.fds()
        extra_fds = sorted(open_fds() - fds - kept - _process_fds(kind))
        if (not extra_threads and not extra_fds) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    tasks = aio.run(_other_tasks())
    new_shm = sorted(_shm_entries(kind) - shm)
    assert not extra_threads, f"threads left running: {extra_threads}"
    assert not extra_fds, f"file descriptors left open: {extra_fds}"
    assert not tasks, f"asyncio tasks left running: {tasks}"
    assert not new_shm, f"shared-memory segments left in /dev/shm: {new_shm}"


async def _other_tasks() -> list[str]:
    import asyncio

    me = asyncio.current_task()
    return [repr(t) for t in asyncio.all_tasks() if t is not me]


class Endpoints:
    """Starts target endpoints for a test and checks each for leaks at the end."""

    def __init__(self, kind: str, aio: LoopThread, pool: ProcessPool) -> None:
        self.kind = kind
        self.aio = aio
        self.pool = pool
        self.started: list[RemoteEndpoint | LocalEndpoint] = []

    def start(self, **options: object) -> RemoteEndpoint | LocalEndpoint:
        ep: RemoteEndpoint | LocalEndpoint
        if self.kind in IN_PROCESS:
            ep = LocalEndpoint(self.kind, self.aio, **options)
        else:
            ep = self.pool.take(self.kind, **options)
        self.started.append(ep)
        return ep

    def finish(self) -> None:
        reports = []
        for ep in self.started:
            if isinstance(ep, LocalEndpoint):
                reports.append(ep.close())
            elif ep.process is not None and ep.process.is_alive():
                try:
                    reports.append(ep.close())
                except Exception:
                    ep.stop()
                    raise
                self.pool.give_back(ep)
            else:
                ep.stop()
        for report in reports:
            assert report["regions"] == 0, f"target kept {report['regions']} registered regions after aclose"
            assert report["tasks"] == 0, f"target left {report['tasks']} asyncio tasks"
            threads = [t for t in report["threads"] if t not in _process_threads(self.kind)]
            assert not threads, f"target left threads running: {threads}"
            assert not report["fds"], f"target left file descriptors open: {report['fds']}"


@pytest.fixture
def endpoints(kind: str, aio: LoopThread, process_pool: ProcessPool) -> Iterator[Endpoints]:
    eps = Endpoints(kind, aio, process_pool)
    try:
        yield eps
    finally:
        eps.finish()


@pytest.fixture
def target(endpoints: Endpoints) -> RemoteEndpoint | LocalEndpoint:
    """The target endpoint (separate process except for loopback)."""
    return endpoints.start()


@pytest.fixture
def initiator(kind: str, aio: LoopThread) -> Iterator[transports.base.Transport]:
    """The initiator endpoint, in this process, on the background loop."""
    t = aio.run(_create(kind))
    yield t
    aio.run(t.aclose())
    assert not t.regions, "initiator kept registered regions after aclose"


async def _create(kind: str, **options: object) -> transports.base.Transport:
    return transports.create_transport(kind, **options)


@pytest.fixture
def start_target() -> Iterator:
    """``start_target(kind, **options)``: a dedicated target process with its own options;
    at teardown it must report no regions, threads or fds left."""
    started: list[RemoteEndpoint] = []

    def start(kind: str, **options: object) -> RemoteEndpoint:
        ep = RemoteEndpoint.start(kind, **options)
        started.append(ep)
        return ep

    yield start
    for ep in started:
        report = ep.close()
        ep.stop()
        assert report["regions"] == 0 and not report["threads"] and not report["fds"], report


@pytest.fixture
def open_initiator(aio: LoopThread) -> Iterator:
    """``open_initiator(kind, **options)``: an initiator in this process with its own options."""
    opened: list[transports.base.Transport] = []

    def open_(kind: str, **options: object) -> transports.base.Transport:
        t = aio.run(_create(kind, **options))
        opened.append(t)
        return t

    yield open_
    for t in opened:
        aio.run(t.aclose())
