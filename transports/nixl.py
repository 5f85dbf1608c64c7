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

The agent and everything that touches it (lock, in-flight transfers, abandoned
requests, the poller thread that drives completion and notifications) belong to
one ``NixlAgent`` (``_nixl_agent.py``); transfers (``_nixl_transfer.py``) are
handed it. Every pdx notification is sent with a one-byte prefix so an empty
payload still arrives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from ._nixl_agent import (
    MAX_BUSY_SLEEP,
    MIN_SLEEP,
    NOTIF_PREFIX,
    NixlAgent,
    NixlRequest,
    bare,
    import_nixl,
    mem_type,
    xfer_rows,
)
from ._nixl_transfer import NixlTransfer, group_rows, lookup
from .base import MemoryRegion, Peer, Transport
from .descriptor import decode_descriptor, encode_descriptor
from .errors import (
    ConnectError,
    DescriptorError,
    PeerLost,
    RegistrationError,
    TransferAborted,
    TransferError,
    TransportClosed,
)
from .notifications import Notification
from .segments import LOCAL_OFFSET, LOCAL_REGION, NBYTES, REMOTE_OFFSET, REMOTE_REGION, SegmentPairs
from .transfer import Transfer, TransferStatus

logger = logging.getLogger(__name__)

TABLE_SLOTS = 8192  # region ids the live-region table holds; beyond that the check is skipped
CONNECT_TIMEOUT = 10.0


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
        self.timeout = timeout
        self._nixl = NixlAgent(self.name, backends, progress_thread, self._deliver)
        self._reg: dict[int, Any] = {}  # region_id -> nixlRegDList
        self._peers: dict[str, Peer] = {}
        self._live: dict[str, set[int]] = {}  # peer -> ids its table listed at connect
        # Live-region table: [count, ids...], read by initiators at connect (one NIXL READ), so a
        # descriptor listing a region released since is caught. A second one receives peers' tables.
        self._table = np.zeros(TABLE_SLOTS + 1, dtype=np.int64)
        self._scratch = np.zeros(TABLE_SLOTS + 1, dtype=np.int64)
        self._table_reg = [self._nixl.agent.register_memory([(a.ctypes.data, a.nbytes, 0, "")], "DRAM")
                           for a in (self._table, self._scratch)]
        self._nixl.start()

    def _deliver(self, sender: str, payload: bytes) -> None:
        self.notifications.push(Notification(sender, payload))  # looked up at delivery: ``auto`` shares its box

    # -- memory -------------------------------------------------------------------------
    def _register(self, region: MemoryRegion) -> None:
        mem, devid = mem_type(region.device)
        try:
            with self._nixl.lock:
                self._reg[region.region_id] = self._nixl.agent.register_memory(
                    [(region.addr, region.nbytes, devid, "")], mem
                )
        except Exception as exc:
            raise RegistrationError(f"NIXL could not register {region.nbytes} bytes of {mem}: {exc}") from bare(exc)
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
                with self._nixl.lock:
                    self._nixl.agent.deregister_memory(reg)
            except Exception:
                logger.warning("NIXL failed to deregister region %d", region.region_id, exc_info=True)
        self._write_table(drop=region.region_id)
        super()._deregister(region)

    # -- descriptors and peers ------------------------------------------------------------
    def descriptor(self) -> bytes:
        self._check_open()
        with self._nixl.lock:
            meta = self._nixl.agent.get_agent_metadata()
        table = [self._table.ctypes.data, self._table.nbytes]
        return encode_descriptor(self, {"table": table}, blob=meta, with_addr=True)

    async def connect(self, descriptor: bytes) -> Peer:
        self._check_open()
        desc = decode_descriptor(descriptor, self.kind, with_addr=True)
        if desc.name == self.name:
            remote = self.name  # NIXL loopback: the agent addresses itself
        else:
            try:
                with self._nixl.lock:
                    remote = self._nixl.agent.add_remote_agent(desc.blob)
            except Exception as exc:
                if type(exc).__name__ == "nixlBackendError":  # UCX could not reach the agent it names
                    raise ConnectError(
                        f"cannot reach NIXL agent {desc.name} (stale descriptor, or the peer is gone): {exc}"
                    ) from bare(exc)
                raise DescriptorError(f"NIXL rejected the metadata in the descriptor of {desc.name}: {exc}") from bare(exc)
            remote = remote.decode() if isinstance(remote, bytes) else str(remote)
            if remote != desc.name:
                raise DescriptorError(f"descriptor names {desc.name!r} but carries metadata of {remote!r}")
            try:
                with self._nixl.lock:
                    self._nixl.agent.make_connection(remote)
            except Exception as exc:
                raise ConnectError(f"cannot connect to NIXL agent {remote}: {exc}") from bare(exc)
            await self._read_table(remote, desc.address.get("table"))
        peer = Peer(desc.name, desc.regions, state=remote)
        self._peers[desc.name] = peer
        return peer

    async def _read_table(self, remote: str, table: Any) -> None:
        """Learn which of the descriptor's regions the target still has (one small READ)."""
        self._live.pop(remote, None)
        if not (isinstance(table, list) and len(table) == 2 and all(isinstance(v, int) for v in table)
                and table[1] == self._scratch.nbytes):
            raise DescriptorError(f"nixl descriptor of {remote} has no valid region table")
        with self._nixl.lock:
            ldesc = self._nixl.agent.get_xfer_descs(xfer_rows(np.array([self._scratch.ctypes.data]),
                                                      np.array([self._scratch.nbytes]), 0), "DRAM")
            rdesc = self._nixl.agent.get_xfer_descs(xfer_rows(np.array([table[0]]), np.array([table[1]]), 0), "DRAM")
            try:
                handle = self._nixl.agent.initialize_xfer("READ", ldesc, rdesc, remote, b"")
                state = self._nixl.agent.transfer(handle)
            except Exception as exc:
                raise ConnectError(f"cannot read the region table of NIXL agent {remote}: {exc}") from None
        deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT
        delay = MIN_SLEEP
        while state == "PROC" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BUSY_SLEEP)
            with self._nixl.lock:
                state = self._nixl.agent.check_xfer_state(handle)
        req = NixlRequest(handle, np.zeros(0, dtype=np.int64))
        req.state = state
        with self._nixl.lock:
            self._nixl.release_handle(req)
        if state != "DONE":
            raise ConnectError(f"cannot read the region table of NIXL agent {remote} (state {state})")
        count = int(self._scratch[0])
        if 0 <= count <= TABLE_SLOTS:
            self._live[remote] = set(self._scratch[1 : 1 + count].tolist())

    async def disconnect(self, peer: Peer) -> None:
        if self._peers.pop(peer.name, None) is None:
            return
        for tr in list(self._nixl.inflight):
            if tr.peer is peer:
                tr.cancel(TransferStatus.FAILED, PeerLost, f"peer {peer.name} was disconnected")
        await self._nixl.settle_zombies()
        with self._nixl.lock:
            if peer.state != self.name:
                try:
                    self._nixl.agent.remove_remote_agent(peer.state)
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
        transfer = NixlTransfer(self._nixl, peer, pairs, self.timeout)
        if len(pairs) == 0:
            transfer.late_notif = notif
            with self._nixl.lock:
                self._nixl.inflight.add(transfer)
                transfer.settle_if_finished()
            return transfer
        t = pairs.table
        posted = np.arange(len(t))
        live = self._live.get(peer.state)
        if live is not None and not set(peer.regions) <= live:
            gone = np.isin(t[:, REMOTE_REGION], np.array(sorted(set(peer.regions) - live), dtype=np.int64))
            if gone.any():  # released at the target since its descriptor was taken: never post those
                transfer.prefailed, posted = np.flatnonzero(gone), np.flatnonzero(~gone)
                t, notif = t[posted], None  # a partly failed transfer does not notify
        local = {rid: (r.addr, r.device) for rid, r in self.regions.items()}
        remote = {rid: (int(r.addr or 0), r.device) for rid, r in peer.regions.items()}
        l_addr, l_dev = lookup(t[:, LOCAL_REGION], local)
        r_addr, r_dev = lookup(t[:, REMOTE_REGION], remote)
        groups = group_rows(l_dev, r_dev) if len(t) else []
        msg = b"" if notif is None else NOTIF_PREFIX + notif
        if len(groups) > 1 and notif is not None:
            transfer.late_notif, msg = notif, b""
        with self._nixl.lock:
            try:
                for (ldev, rdev), rows in groups:
                    lmem, ldid = mem_type(ldev)
                    rmem, rdid = mem_type(rdev)
                    ldesc = xfer_rows(l_addr[rows] + t[rows, LOCAL_OFFSET], t[rows, NBYTES], ldid)
                    rdesc = xfer_rows(r_addr[rows] + t[rows, REMOTE_OFFSET], t[rows, NBYTES], rdid)
                    handle = self._nixl.agent.initialize_xfer(
                        op, self._nixl.agent.get_xfer_descs(ldesc, lmem), self._nixl.agent.get_xfer_descs(rdesc, rmem),
                        peer.state, msg,
                    )
                    req = NixlRequest(handle, posted[rows])
                    transfer.requests.append(req)
                    req.state = self._nixl.agent.transfer(handle)
            except Exception as exc:
                kind: type[TransferError] = PeerLost if "DISCONNECT" in str(exc).upper() else TransferError
                transfer.cancel(TransferStatus.FAILED, kind, f"NIXL could not post the {op.lower()} to "
                                f"{peer.name}: {exc}")
                return transfer
            self._nixl.inflight.add(transfer)
            for req in transfer.requests:
                if req.state != "PROC":
                    self._nixl.release_handle(req)
            transfer.settle_if_finished()
        self._nixl.wake()
        return transfer

    def pop_notifications(self) -> list[Notification]:
        self._nixl.poll_once()
        return super().pop_notifications()

    # -- lifetime -------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        for tr in list(self._nixl.inflight):
            tr.cancel(TransferStatus.ABORTED, TransferAborted, "transport closed")
        await self._nixl.settle_zombies()  # before the memory they read from is deregistered
        for peer in list(self._peers.values()):
            await self.disconnect(peer)
        await super().aclose()  # deregisters every region
        self._nixl.close(self._table_reg)
