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
import time
from typing import Any

import numpy as np

from transports._peer_wire import decode_descriptor, encode_descriptor
from transports.base import (
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
    TransferReport,
    TransferStatus,
    Transport,
)
from transports.errors import (
    ConnectError,
    DescriptorError,
    PeerLost,
    RegistrationError,
    TransferAborted,
    TransferError,
    TransferTimeout,
    TransportClosed,
    TransportUnavailable,
)

logger = logging.getLogger(__name__)

NOTIF_PREFIX = b"\x01"  # marks pdx notifications; anything else from the agent is ignored
MIN_SLEEP, MAX_BUSY_SLEEP, MAX_IDLE_SLEEP = 20e-6, 1e-3, 2e-3


def import_nixl() -> Any:
    """The nixl ``_api`` module (meta package first, then the cu12 wheel)."""
    try:
        from nixl import _api  # type: ignore[import-not-found]
    except ImportError:
        from nixl_cu12 import _api  # type: ignore[import-not-found,no-redef]
    return _api


def _mem_type(device: str) -> tuple[str, int]:
    if device == "cpu":
        return "DRAM", 0
    return "VRAM", int(device.partition(":")[2] or 0)


class _Request:
    """One NIXL transfer request (a group of segment rows of one post)."""

    __slots__ = ("handle", "rows", "state")

    def __init__(self, handle: Any, rows: np.ndarray) -> None:
        self.handle = handle
        self.rows = rows  # row indices into the posted SegmentPairs
        self.state = "PROC"  # PROC, DONE, ERR


class NixlTransfer(Transfer):
    def __init__(self, transport: NixlTransport, peer: Peer, pairs: SegmentPairs, notif: bytes | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.num_segments = len(pairs)
        self.nbytes = pairs.nbytes
        self._transport = transport
        self._peer = peer
        self._requests: list[_Request] = []
        self._late_notif: bytes | None = None  # sent after all requests finish (multi-group posts)
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()
        self._t0 = time.perf_counter()
        self.report: TransferReport | None = None
        self._error_kind: type[TransferError] = TransferError

    def poll(self) -> TransferStatus:
        return TransferStatus.PENDING if self.report is None else self.report.status

    async def wait(self, timeout: float | None = None) -> TransferReport:
        if timeout is None:
            timeout = self._transport.timeout
        if self.report is None:
            try:
                await asyncio.wait_for(asyncio.shield(self._future), timeout)
            except asyncio.TimeoutError:
                self._finish(TransferStatus.FAILED, "timed out", TransferTimeout, abort=True,
                             message=f"nixl transfer to {self._peer.name} did not complete within {timeout}s")
        report = self.report
        assert report is not None
        if report.status is TransferStatus.DONE:
            return report
        raise self._error_kind(report.error or "transfer failed", report)

    def abort(self) -> None:
        self._finish(TransferStatus.ABORTED, "aborted by the initiator", TransferAborted, abort=True)

    # -- called with the transport lock held ----------------------------------------------
    def _advance(self, agent: Any) -> bool:
        """Check in-flight requests; finish the transfer once all settled. True if anything changed."""
        changed = False
        for req in self._requests:
            if req.state == "PROC":
                state = agent.check_xfer_state(req.handle)
                if state != "PROC":
                    req.state = state
                    changed = True
                    self._transport._release_handle(req)
        if changed:
            self._settle(agent)
        return changed

    def _settle(self, agent: Any) -> None:
        """Finish the transfer if no request is in flight any more."""
        if self.report is not None or any(r.state == "PROC" for r in self._requests):
            return
        failed = [r for r in self._requests if r.state != "DONE"]
        if failed:
            rows = np.sort(np.concatenate([r.rows for r in failed]))
            self._finish(TransferStatus.FAILED, "NIXL reported the transfer failed (peer unreachable or gone)",
                         PeerLost, failed_rows=rows)
            return
        if self._late_notif is not None:
            try:
                agent.send_notif(self._peer.state, NOTIF_PREFIX + self._late_notif)
            except Exception as exc:  # the bytes landed, but the target will not hear of it
                self._finish(TransferStatus.FAILED, f"notification failed: {exc}", PeerLost)
                return
        self._finish(TransferStatus.DONE, None, TransferError)

    def _finish(self, status: TransferStatus, error: str | None, kind: type[TransferError], *,
                abort: bool = False, failed_rows: np.ndarray | None = None, message: str | None = None) -> None:
        with self._transport._lock:
            if self.report is not None:
                return
            if abort:
                for req in self._requests:
                    if req.state == "PROC":
                        req.state = "ERR"
                        self._transport._release_handle(req)
            if status is not TransferStatus.DONE and failed_rows is None:
                failed_rows = np.arange(self.num_segments)
            failed = tuple(failed_rows.tolist()) if failed_rows is not None else ()
            self.report = TransferReport(status, self.num_segments, self.nbytes, failed,
                                         message or error, time.perf_counter() - self._t0)
            self._error_kind = kind
            self._transport._inflight.discard(self)
        try:
            self._loop.call_soon_threadsafe(_resolve, self._future)
        except RuntimeError:  # the posting loop is closed
            pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
                 timeout: float = 60.0) -> None:
        super().__init__(name)
        try:
            api = import_nixl()
        except ImportError as exc:
            raise TransportUnavailable(
                f"nixl is not installed ({exc}); pip install --no-deps nixl-cu12==1.5.1"
            ) from exc
        self.timeout = timeout
        config = api.nixl_agent_config(
            backends=list(backends), sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
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
        self._wake = threading.Event()
        self._stop = False
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
            raise RegistrationError(f"NIXL could not register {region.nbytes} bytes of {mem}: {exc}") from exc

    def _deregister(self, region: MemoryRegion) -> None:
        reg = self._reg.pop(region.region_id, None)
        if reg is not None:
            try:
                with self._lock:
                    self._agent.deregister_memory(reg)
            except Exception:
                logger.warning("NIXL failed to deregister region %d", region.region_id, exc_info=True)
        super()._deregister(region)

    # -- descriptors and peers ------------------------------------------------------------
    def descriptor(self) -> bytes:
        self._check_open()
        with self._lock:
            meta = self._agent.get_agent_metadata()
        rows = [(r.region_id, r.nbytes, r.addr, r.device) for r in self.regions.values()]
        return encode_descriptor(self.kind, self.name, rows, blob=meta)

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
                raise DescriptorError(f"NIXL rejected the metadata in the descriptor of {desc.name}: {exc}") from exc
            remote = remote.decode() if isinstance(remote, bytes) else str(remote)
            if remote != desc.name:
                raise DescriptorError(f"descriptor names {desc.name!r} but carries metadata of {remote!r}")
            try:
                with self._lock:
                    self._agent.make_connection(remote)
            except Exception as exc:
                raise ConnectError(f"cannot connect to NIXL agent {remote}: {exc}") from exc
        peer = Peer(desc.name, desc.regions, state=remote)
        self._peers[desc.name] = peer
        return peer

    async def disconnect(self, peer: Peer) -> None:
        if self._peers.pop(peer.name, None) is None:
            return
        with self._lock:
            for tr in list(self._inflight):
                if tr._peer is peer:
                    tr._finish(TransferStatus.FAILED, f"peer {peer.name} was disconnected", PeerLost, abort=True)
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
        local = {rid: (r.addr, r.device) for rid, r in self.regions.items()}
        remote = {rid: (int(r.extra["addr"]), r.device) for rid, r in peer.regions.items()}
        l_addr, l_dev = _lookup(t[:, LOCAL_REGION], local)
        r_addr, r_dev = _lookup(t[:, REMOTE_REGION], remote)
        groups = _group_rows(l_dev, r_dev)
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
                    req = _Request(handle, rows)
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
        try:
            req.handle.release()
        except Exception:  # still active and not cancellable: retry later
            self._zombies.append(req)

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
            notifs = self._agent.get_new_notifs()
            progressed = False
            for tr in list(self._inflight):
                progressed |= tr._advance(self._agent)
            if self._zombies:
                zombies, self._zombies = self._zombies, []
                for req in zombies:
                    self._release_handle(req)
        for sender, msgs in notifs.items():
            sender = sender.decode() if isinstance(sender, bytes) else str(sender)
            for m in msgs:
                if m[:1] == NOTIF_PREFIX:
                    self.notifications.push(Notification(sender, bytes(m[1:])))
                    progressed = True
        return progressed

    def pop_notifications(self) -> list[Notification]:
        self._poll_once()
        return super().pop_notifications()

    # -- lifetime -------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        with self._lock:
            for tr in list(self._inflight):
                tr._finish(TransferStatus.ABORTED, "transport closed", TransferAborted, abort=True)
        for peer in list(self._peers.values()):
            await self.disconnect(peer)
        await super().aclose()  # deregisters every region
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._poller.join, 5.0)
        with self._lock:
            for req in self._zombies:
                try:
                    req.handle.release()
                except Exception:
                    logger.warning("NIXL kept a transfer handle of %s it could not cancel", self.name)
            self._zombies.clear()
        self._agent = None


def _lookup(ids: np.ndarray, table: dict[int, tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (base address, device) of the region each row names."""
    if len(ids) and (ids == ids[0]).all():
        addr, dev = table[int(ids[0])]
        return np.full(len(ids), addr, dtype=np.int64), np.full(len(ids), dev, dtype=object)
    uniq, inv = np.unique(ids, return_inverse=True)
    addrs = np.array([table[int(u)][0] for u in uniq], dtype=np.int64)
    devs = np.array([table[int(u)][1] for u in uniq], dtype=object)
    return addrs[inv], devs[inv]


def _group_rows(l_dev: np.ndarray, r_dev: np.ndarray) -> list[tuple[tuple[str, str], np.ndarray]]:
    if (l_dev == l_dev[0]).all() and (r_dev == r_dev[0]).all():
        return [((l_dev[0], r_dev[0]), np.arange(len(l_dev)))]
    keys = np.array([f"{a}|{b}" for a, b in zip(l_dev, r_dev, strict=True)], dtype=object)
    out = []
    for key in dict.fromkeys(keys.tolist()):
        a, _, b = key.partition("|")
        out.append(((a, b), np.flatnonzero(keys == key)))
    return out


def _descs(addr: np.ndarray, nbytes: np.ndarray, devid: int) -> np.ndarray:
    out = np.empty((len(addr), 3), dtype=np.uint64)  # NIXL's Nx3 (addr, len, device id) form
    out[:, 0] = addr
    out[:, 1] = nbytes
    out[:, 2] = devid
    return out
