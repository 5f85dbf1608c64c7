"""NIXL over UCX: one-sided writes and reads between registered DRAM (or VRAM) of two agents.

One ``nixl_agent`` per transport endpoint, named after it. The descriptor is the
agent's metadata (taken after registration, so it names every region) plus the
region table. ``connect`` loads the peer's metadata and opens the UCX
connection eagerly, so an unreachable peer fails there and not on the first post.

A post becomes one NIXL transfer request per (local memory type, remote memory
type) group of its segments; almost always that is one request. NIXL reports
success or failure per request, not per descriptor, so when a request fails
**every segment of that request** is reported failed (the other groups keep
their own outcome). The notification rides on the request itself when there is
one group, and is sent with ``send_notif`` after all groups finished otherwise,
so the target never sees it before the bytes.

One poller thread per transport drives completion and notifications: it calls
``check_xfer_state`` on in-flight requests and ``get_new_notifs``, sleeping on a
short ladder (20 us doubling to 1 ms while work is in flight, 2 ms when idle),
and wakes waiting coroutines with ``call_soon_threadsafe``. Every pdx
notification is sent with a one-byte prefix so an empty payload still arrives.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np

from ._nixl_transfer import (
    NOTIF_PREFIX,
    NixlTransfer,
    _bare,
    _descs,
    _group_rows,
    _lookup,
    _mem_type,
    _Request,
)
from ._peer_wire import decode_descriptor, encode_descriptor
from .base import (
    LOCAL_OFFSET,
    LOCAL_REGION,
    NBYTES,
    REMOTE_OFFSET,
    REMOTE_REGION,
    MemoryRegion,
    Notification,
    Peer,
    SegmentPairs,
    Transfer,
    TransferStatus,
    Transport,
)
from .errors import (
    ConnectError,
    DescriptorError,
    PeerLost,
    RegistrationError,
    TransferAborted,
    TransferError,
    TransportClosed,
    TransportUnavailable,
)

logger = logging.getLogger(__name__)

TABLE_SLOTS = 8192  # region ids the live-region table holds; beyond that the check is skipped
MIN_SLEEP, MAX_BUSY_SLEEP, MAX_IDLE_SLEEP = 20e-6, 1e-3, 2e-3
CONNECT_TIMEOUT = 10.0


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def import_nixl() -> Any:
    """The nixl ``_api`` module (meta package first, then the cu12 wheel)."""
    try:
        from nixl import _api  # type: ignore[import-not-found]
    except ImportError:
        from nixl_cu12 import _api  # type: ignore[import-not-found,no-redef]
    return _api


class NixlTransport(Transport):
    """NIXL agent endpoint. Options: ``backends`` (default ``("UCX",)``), ``timeout`` (seconds a
    transfer may take when ``wait`` is given none; default 60)."""

    kind = "nixl"
    supports_read = True
    devices = ("cpu", "cuda")

    @classmethod
    def is_available(cls) -> bool:
        try:
            import_nixl()
        except ImportError:
            return False
        return True

    def __init__(self, name: str | None = None, *, backends: tuple[str, ...] = ("UCX",),
                 timeout: float = 60.0, progress_thread: bool = False) -> None:
        super().__init__(name)
        try:
            api = import_nixl()
        except ImportError as exc:
            raise TransportUnavailable(
                f"nixl is not installed ({exc}); pip install --no-deps nixl-cu12==1.5.1"
            ) from exc
        self.timeout = timeout
        config = api.nixl_agent_config(
            backends=list(backends), sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            # NIXL's progress thread spins (no delay): a core per agent even when idle. The poller
            # below already drives UCX progress through check_xfer_state / get_new_notifs.
            enable_prog_thread=progress_thread,
        )
        try:
            self._agent = api.nixl_agent(self.name, config)
        except Exception as exc:
            raise TransportUnavailable(f"cannot start a NIXL agent: {exc}") from exc
        if not self._agent.backends:
            raise TransportUnavailable(f"none of the NIXL backends {backends} loaded here")
        self._lock = threading.RLock()
        self._reg: dict[int, Any] = {}  # region_id -> nixlRegDList
        self._peers: dict[str, Peer] = {}
        self._inflight: set[NixlTransfer] = set()
        self._zombies: list[_Request] = []  # handles NIXL could not release yet
        self._live: dict[str, set[int]] = {}  # peer -> ids its table listed at connect
        self._wake = threading.Event()
        self._stop = False
        # Live-region table: [count, ids...], read by initiators at connect (one NIXL READ), so a
        # descriptor listing a region released since is caught. A second one receives peers' tables.
        self._table = np.zeros(TABLE_SLOTS + 1, dtype=np.int64)
        self._scratch = np.zeros(TABLE_SLOTS + 1, dtype=np.int64)
        self._table_reg = [self._agent.register_memory([(a.ctypes.data, a.nbytes, 0, "")], "DRAM")
                           for a in (self._table, self._scratch)]
        self._poller = threading.Thread(target=self._poll_loop, name=f"pdx-nixl-{self.name}", daemon=True)
        self._poller.start()

    # -- memory -------------------------------------------------------------------------
    def _register(self, region: MemoryRegion) -> None:
        mem, devid = _mem_type(region.device)
        try:
            with self._lock:
                self._reg[region.region_id] = self._agent.register_memory(
                    [(region.addr, region.nbytes, devid, "")], mem
                )
        except Exception as exc:
            raise RegistrationError(f"NIXL could not register {region.nbytes} bytes of {mem}: {exc}") from _bare(exc)
        self._write_table(extra=region.region_id)

    def _write_table(self, extra: int | None = None, drop: int | None = None) -> None:
        ids = [rid for rid in self.regions if rid != drop] + ([extra] if extra is not None else [])
        if len(ids) > TABLE_SLOTS:
            self._table[0] = -1
            return
        self._table[1 : 1 + len(ids)] = ids
        self._table[0] = len(ids)

    def _deregister(self, region: MemoryRegion) -> None:
        reg = self._reg.pop(region.region_id, None)
        if reg is not None:
            try:
                with self._lock:
                    self._agent.deregister_memory(reg)
            except Exception:
                logger.warning("NIXL failed to deregister region %d", region.region_id, exc_info=True)
        self._write_table(drop=region.region_id)
        super()._deregister(region)

    # -- descriptors and peers ------------------------------------------------------------
    def descriptor(self) -> bytes:
        self._check_open()
        with self._lock:
            meta = self._agent.get_agent_metadata()
        rows = [(r.region_id, r.nbytes, r.addr, r.device) for r in self.regions.values()]
        table = [self._table.ctypes.data, self._table.nbytes]
        return encode_descriptor(self.kind, self.name, rows, blob=meta, extra={"table": table})

    async def connect(self, descriptor: bytes) -> Peer:
        self._check_open()
        desc = decode_descriptor(descriptor, self.kind)
        if desc.name == self.name:
            remote = self.name  # NIXL loopback: the agent addresses itself
        else:
            try:
                with self._lock:
                    remote = self._agent.add_remote_agent(desc.blob)
            except Exception as exc:
                if type(exc).__name__ == "nixlBackendError":  # UCX could not reach the agent it names
                    raise ConnectError(
                        f"cannot reach NIXL agent {desc.name} (stale descriptor, or the peer is gone): {exc}"
                    ) from _bare(exc)
                raise DescriptorError(f"NIXL rejected the metadata in the descriptor of {desc.name}: {exc}") from _bare(exc)
            remote = remote.decode() if isinstance(remote, bytes) else str(remote)
            if remote != desc.name:
                raise DescriptorError(f"descriptor names {desc.name!r} but carries metadata of {remote!r}")
            try:
                with self._lock:
                    self._agent.make_connection(remote)
            except Exception as exc:
                raise ConnectError(f"cannot connect to NIXL agent {remote}: {exc}") from _bare(exc)
            await self._read_table(remote, desc.extra.get("table"))
        peer = Peer(desc.name, desc.regions, state=remote)
        self._peers[desc.name] = peer
        return peer

    async def _read_table(self, remote: str, table: Any) -> None:
        """Learn which of the descriptor's regions the target still has (one small READ)."""
        self._live.pop(remote, None)
        if not (isinstance(table, list) and len(table) == 2 and all(isinstance(v, int) for v in table)
                and table[1] == self._scratch.nbytes):
            raise DescriptorError(f"nixl descriptor of {remote} has no valid region table")
        with self._lock:
            ldesc = self._agent.get_xfer_descs(_descs(np.array([self._scratch.ctypes.data]),
                                                      np.array([self._scratch.nbytes]), 0), "DRAM")
            rdesc = self._agent.get_xfer_descs(_descs(np.array([table[0]]), np.array([table[1]]), 0), "DRAM")
            try:
                handle = self._agent.initialize_xfer("READ", ldesc, rdesc, remote, b"")
                state = self._agent.transfer(handle)
            except Exception as exc:
                raise ConnectError(f"cannot read the region table of NIXL agent {remote}: {exc}") from None
        deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT
        delay = MIN_SLEEP
        while state == "PROC" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BUSY_SLEEP)
            with self._lock:
                state = self._agent.check_xfer_state(handle)
        req = _Request(handle, np.zeros(0, dtype=np.int64))
        req.state = state
        with self._lock:
            self._release_handle(req)
        if state != "DONE":
            raise ConnectError(f"cannot read the region table of NIXL agent {remote} (state {state})")
        count = int(self._scratch[0])
        if 0 <= count <= TABLE_SLOTS:
            self._live[remote] = set(self._scratch[1 : 1 + count].tolist())

    async def disconnect(self, peer: Peer) -> None:
        if self._peers.pop(peer.name, None) is None:
            return
        with self._lock:
            for tr in list(self._inflight):
                if tr._peer is peer:
                    tr._finish(TransferStatus.FAILED, f"peer {peer.name} was disconnected", PeerLost, abort=True)
        await self._settle_zombies()
        with self._lock:
            if peer.state != self.name:
                try:
                    self._agent.remove_remote_agent(peer.state)
                except Exception:
                    logger.debug("remove_remote_agent(%s) failed", peer.state, exc_info=True)

    # -- transfers ------------------------------------------------------------------------
    async def post_write(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        return self._post("WRITE", peer, pairs, notif)

    async def post_read(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        return self._post("READ", peer, pairs, notif)

    def _post(self, op: str, peer: Peer, pairs: SegmentPairs, notif: bytes | None) -> NixlTransfer:
        self._validate(peer, pairs)
        if self._peers.get(peer.name) is not peer:
            raise TransportClosed(f"peer {peer.name} is not connected to {self.name}; connect again")
        transfer = NixlTransfer(self, peer, pairs, notif, asyncio.get_running_loop())
        if len(pairs) == 0:
            transfer._late_notif = notif
            with self._lock:
                self._inflight.add(transfer)
                transfer._settle(self._agent)
            return transfer
        t = pairs.table
        posted = np.arange(len(t))
        live = self._live.get(peer.state)
        if live is not None and not set(peer.regions) <= live:
            gone = np.isin(t[:, REMOTE_REGION], np.array(sorted(set(peer.regions) - live), dtype=np.int64))
            if gone.any():  # released at the target since its descriptor was taken: never post those
                transfer._prefailed, posted = np.flatnonzero(gone), np.flatnonzero(~gone)
                t, notif = t[posted], None  # a partly failed transfer does not notify
        local = {rid: (r.addr, r.device) for rid, r in self.regions.items()}
        remote = {rid: (int(r.extra["addr"]), r.device) for rid, r in peer.regions.items()}
        l_addr, l_dev = _lookup(t[:, LOCAL_REGION], local)
        r_addr, r_dev = _lookup(t[:, REMOTE_REGION], remote)
        groups = _group_rows(l_dev, r_dev) if len(t) else []
        msg = b"" if notif is None else NOTIF_PREFIX + notif
        if len(groups) > 1 and notif is not None:
            transfer._late_notif, msg = notif, b""
        with self._lock:
            try:
                for (ldev, rdev), rows in groups:
                    lmem, ldid = _mem_type(ldev)
                    rmem, rdid = _mem_type(rdev)
                    ldesc = _descs(l_addr[rows] + t[rows, LOCAL_OFFSET], t[rows, NBYTES], ldid)
                    rdesc = _descs(r_addr[rows] + t[rows, REMOTE_OFFSET], t[rows, NBYTES], rdid)
                    handle = self._agent.initialize_xfer(
                        op, self._agent.get_xfer_descs(ldesc, lmem), self._agent.get_xfer_descs(rdesc, rmem),
                        peer.state, msg,
                    )
                    req = _Request(handle, posted[rows])
                    transfer._requests.append(req)
                    req.state = self._agent.transfer(handle)
            except Exception as exc:
                kind: type[TransferError] = PeerLost if "DISCONNECT" in str(exc).upper() else TransferError
                self._inflight.add(transfer)
                transfer._finish(TransferStatus.FAILED, f"NIXL could not post the {op.lower()} to "
                                 f"{peer.name}: {exc}", kind, abort=True)
                return transfer
            self._inflight.add(transfer)
            for req in transfer._requests:
                if req.state != "PROC":
                    self._release_handle(req)
            transfer._settle(self._agent)
        self._wake.set()
        return transfer

    def _release_handle(self, req: _Request) -> None:
        """Release the handle of a settled request."""
        if req.handle is None:
            return
        try:
            req.handle.release()
        except Exception:
            logger.warning("NIXL refused to release a settled transfer handle of %s", self.name)
        req.handle = None  # the handle keeps the agent (and its UCX context) alive

    def _reap_zombies(self, force: bool = False) -> None:
        """Release abandoned requests NIXL has settled (all of them when ``force``).

        Cancelling an active UCX request on release proved fragile (the peer may abort
        with an endpoint timeout), so aborted requests are left to finish first."""
        still = []
        for req in self._zombies:
            try:
                state = self._agent.check_xfer_state(req.handle) if req.handle is not None else "ERR"
            except Exception:
                state = "ERR"
            if state == "PROC" and not force:
                still.append(req)
            else:
                self._release_handle(req)
        self._zombies = still

    # -- poller ---------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        sleep = MIN_SLEEP
        while not self._stop:
            try:
                progressed = self._poll_once()
            except Exception:
                logger.exception("nixl poller of %s failed", self.name)
                progressed = False
            if progressed:
                sleep = MIN_SLEEP
            else:
                sleep = min(sleep * 2, MAX_BUSY_SLEEP if self._inflight else MAX_IDLE_SLEEP)
            if self._wake.wait(sleep):
                self._wake.clear()
                sleep = MIN_SLEEP

    def _poll_once(self) -> bool:
        with self._lock:
            if self._stop:
                return False
            try:
                notifs = self._agent.get_new_notifs()
            except Exception:  # a disconnected peer surfaces here too; its transfers report it
                logger.debug("get_new_notifs failed on %s", self.name, exc_info=True)
                notifs = {}
            progressed = False
            for tr in list(self._inflight):
                progressed |= tr._advance(self._agent)
            if self._zombies:
                self._reap_zombies()
        for sender, msgs in notifs.items():
            sender = sender.decode() if isinstance(sender, bytes) else str(sender)
            for m in msgs:
                kind, body = m[:1], bytes(m[1:])
                if kind == NOTIF_PREFIX:
                    self.notifications.push(Notification(sender, body))
                progressed = True
        return progressed

    def pop_notifications(self) -> list[Notification]:
        self._poll_once()
        return super().pop_notifications()

    # -- lifetime -------------------------------------------------------------------------
    async def _settle_zombies(self, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self._zombies and asyncio.get_running_loop().time() < deadline:
            with self._lock:
                self._reap_zombies()
            await asyncio.sleep(MAX_BUSY_SLEEP)

    async def aclose(self) -> None:
        if self._closed:
            return
        with self._lock:
            for tr in list(self._inflight):
                tr._finish(TransferStatus.ABORTED, "transport closed", TransferAborted, abort=True)
        await self._settle_zombies()  # before the memory they read from is deregistered
        for peer in list(self._peers.values()):
            await self.disconnect(peer)
        await super().aclose()  # deregisters every region
        self._stop = True
        self._wake.set()
        self._poller.join(5.0)  # it sleeps at most MAX_IDLE_SLEEP between checks
        with self._lock:
            self._reap_zombies(force=True)
            for reg in self._table_reg:
                self._agent.deregister_memory(reg)
        self._agent = None


