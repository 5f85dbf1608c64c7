"""The NIXL agent of one nixl transport and all state that touches it, in one owner.

``NixlAgent`` holds the ``nixl_agent``, the lock every call into it takes (NIXL's
strict thread-sync mode is not enough for pdx's check-then-act sequences), the
in-flight transfers, the abandoned requests ("zombies") and the poller thread.
The poller drives completion and notifications: ``check_xfer_state`` on in-flight
requests and ``get_new_notifs``, sleeping on a short ladder (20 us doubling to
1 ms while work is in flight, 2 ms when idle).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import TransportUnavailable

if TYPE_CHECKING:
    from ._nixl_transfer import NixlTransfer

logger = logging.getLogger(__name__)

NOTIF_PREFIX = b"\x01"  # marks pdx notifications; other messages between agents are control
MIN_SLEEP, MAX_BUSY_SLEEP, MAX_IDLE_SLEEP = 20e-6, 1e-3, 2e-3


def import_nixl() -> Any:
    """The nixl ``_api`` module (meta package first, then the cu12 wheel)."""
    try:
        from nixl import _api  # type: ignore[import-not-found]
    except ImportError:
        from nixl_cu12 import _api  # type: ignore[import-not-found,no-redef]
    return _api


def bare(exc: BaseException) -> BaseException:
    """``exc`` without its traceback: NIXL's frames would keep the agent (and its UCX fds) alive."""
    return exc.with_traceback(None)


def mem_type(device: str) -> tuple[str, int]:
    """NIXL memory type and device id of a pdx device string."""
    if device == "cpu":
        return "DRAM", 0
    return "VRAM", int(device.partition(":")[2] or 0)


def xfer_rows(addr: np.ndarray, nbytes: np.ndarray, devid: int) -> np.ndarray:
    out = np.empty((len(addr), 3), dtype=np.uint64)  # NIXL's Nx3 (addr, len, device id) form
    out[:, 0] = addr
    out[:, 1] = nbytes
    out[:, 2] = devid
    return out


class NixlRequest:
    """One NIXL transfer request (a group of segment rows of one post)."""

    __slots__ = ("handle", "rows", "state")

    def __init__(self, handle: Any, rows: np.ndarray) -> None:
        self.handle = handle
        self.rows = rows  # row indices into the posted SegmentPairs
        self.state = "PROC"  # PROC, DONE, ERR


class NixlAgent:
    """A started ``nixl_agent`` plus its lock, in-flight transfers, zombies and poller.

    ``on_notification(sender, payload)`` is called from the poller for every pdx notification.
    """

    def __init__(self, name: str, backends: tuple[str, ...], progress_thread: bool,
                 on_notification: Callable[[str, bytes], None]) -> None:
        try:
            api = import_nixl()
        except ImportError as exc:
            raise TransportUnavailable(
                f"nixl is not installed ({exc}); pip install --no-deps nixl-cu12==1.5.1"
            ) from exc
        config = api.nixl_agent_config(
            backends=list(backends), sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            # NIXL's progress thread spins (no delay): a core per agent even when idle. The poller
            # below already drives UCX progress through check_xfer_state / get_new_notifs.
            enable_prog_thread=progress_thread,
        )
        try:
            self.agent: Any = api.nixl_agent(name, config)
        except Exception as exc:
            raise TransportUnavailable(f"cannot start a NIXL agent: {exc}") from exc
        if not self.agent.backends:
            raise TransportUnavailable(f"none of the NIXL backends {backends} loaded here")
        self.name = name
        self.lock = threading.RLock()
        self.inflight: set[NixlTransfer] = set()
        self._zombies: list[NixlRequest] = []  # abandoned requests NIXL could not release yet
        self._on_notification = on_notification
        self._wake = threading.Event()
        self._stop = False
        self._poller = threading.Thread(target=self._poll_loop, name=f"pdx-nixl-{name}", daemon=True)

    def start(self) -> None:
        self._poller.start()

    def wake(self) -> None:
        """Make the poller look now (a transfer was posted)."""
        self._wake.set()

    # -- requests (call with ``lock`` held) -------------------------------------------------
    def release_handle(self, req: NixlRequest) -> None:
        """Release the handle of a settled request."""
        if req.handle is None:
            return
        try:
            req.handle.release()
        except Exception:
            logger.warning("NIXL refused to release a settled transfer handle of %s", self.name)
        req.handle = None  # the handle keeps the agent (and its UCX context) alive

    def abandon(self, requests: list[NixlRequest]) -> None:
        """Give up on requests still in flight; they are released once NIXL settles them.

        Cancelling an active UCX request on release proved fragile (the peer may abort
        with an endpoint timeout), so aborted requests are left to finish first."""
        with self.lock:
            for req in requests:
                if req.state == "PROC":
                    req.state = "ERR"
                    self._zombies.append(req)

    def _reap_zombies(self, force: bool = False) -> None:
        """Release abandoned requests NIXL has settled (all of them when ``force``)."""
        still = []
        for req in self._zombies:
            try:
                state = self.agent.check_xfer_state(req.handle) if req.handle is not None else "ERR"
            except Exception:
                state = "ERR"
            if state == "PROC" and not force:
                still.append(req)
            else:
                self.release_handle(req)
        self._zombies = still

    async def settle_zombies(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) until NIXL settled every abandoned request."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._zombies and asyncio.get_running_loop().time() < deadline:
            with self.lock:
                self._reap_zombies()
            await asyncio.sleep(MAX_BUSY_SLEEP)

    # -- poller -----------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        sleep = MIN_SLEEP
        while not self._stop:
            try:
                progressed = self.poll_once()
            except Exception:
                logger.exception("nixl poller of %s failed", self.name)
                progressed = False
            if progressed:
                sleep = MIN_SLEEP
            else:
                sleep = min(sleep * 2, MAX_BUSY_SLEEP if self.inflight else MAX_IDLE_SLEEP)
            if self._wake.wait(sleep):
                self._wake.clear()
                sleep = MIN_SLEEP

    def poll_once(self) -> bool:
        """Advance in-flight transfers and deliver new notifications; True if anything happened."""
        with self.lock:
            if self._stop:
                return False
            try:
                notifs = self.agent.get_new_notifs()
            except Exception:  # a disconnected peer surfaces here too; its transfers report it
                logger.debug("get_new_notifs failed on %s", self.name, exc_info=True)
                notifs = {}
            progressed = False
            for tr in list(self.inflight):
                progressed |= tr.progress()
            if self._zombies:
                self._reap_zombies()
        for sender, msgs in notifs.items():
            sender = sender.decode() if isinstance(sender, bytes) else str(sender)
            for m in msgs:
                if m[:1] == NOTIF_PREFIX:
                    self._on_notification(sender, bytes(m[1:]))
                progressed = True
        return progressed

    # -- lifetime ---------------------------------------------------------------------------
    def close(self, registrations: list[Any]) -> None:
        """Stop the poller, release every request and deregister ``registrations``; then drop the agent."""
        self._stop = True
        self._wake.set()
        if self._poller.is_alive():
            self._poller.join(5.0)  # it sleeps at most MAX_IDLE_SLEEP between checks
        with self.lock:
            self._reap_zombies(force=True)
            for reg in registrations:
                self.agent.deregister_memory(reg)
        self.agent = None
