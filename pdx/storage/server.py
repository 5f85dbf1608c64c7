"""The ``pdx store`` server: owns the L1 arena, the chunk index, leases and L2.

One asyncio loop serves engines on a unix socket (``protocol.py``) and operators
over HTTP (``http_api.py``). Chunk bytes never pass through this process on the L1
path: engines copy them straight into or out of the shared arena at the offsets
handed out here, under leases that keep those slots from being evicted or reused.
Write-through to L2 and promotion from it live in ``tier.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from pdx.errors import StorageError, StoreProtocolError
from pdx.storage.allocator import SlabAllocator
from pdx.storage.arena import SharedArena, sweep_stale_arenas
from pdx.storage.config import StoreConfig
from pdx.storage.index import ChunkIndex, Entry, ReserveStatus

# replies are built with model_construct: the store's own values; the client validates them
from pdx.storage.messages import (
    VERSION,
    Abort,
    Acquire,
    AcquireReply,
    Clear,
    Commit,
    CommitReply,
    CountReply,
    Done,
    ErrorReply,
    Hello,
    Lookup,
    LookupReply,
    Pin,
    Release,
    Reply,
    Request,
    Reserve,
    ReserveReply,
    Stats,
    StatsReply,
    Unpin,
    Welcome,
)
from pdx.storage.metrics import StoreCounters
from pdx.storage.protocol import ConnectionTimeout, send_reply, serve_requests
from pdx.storage.tier import L2Tier

if TYPE_CHECKING:
    from pdx.storage.remote_server import RemoteFrontend

logger = logging.getLogger(__name__)

LEASE_SWEEP_S = 1.0


class Lease:
    __slots__ = ("id", "is_write", "entries", "deadline", "conn")

    def __init__(
        self, id: int, is_write: bool, entries: list[Entry], deadline: float, conn: set[int]
    ):
        self.id = id
        self.is_write = is_write
        self.entries = entries
        self.deadline = deadline  # loop time
        self.conn = conn  # the owning connection's lease-id set


class StoreServer:
    def __init__(self, config: StoreConfig):
        self.config = config
        self.counters = StoreCounters()
        self.arena: SharedArena | None = None
        self.index: ChunkIndex | None = None
        self.tier: L2Tier | None = None  # write-through and promotion, when --l2 is set
        self.http_port: int | None = None
        self.remote: RemoteFrontend | None = None  # the door for other nodes (--remote-listen)
        self._leases: dict[int, Lease] = {}
        self._lease_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self._servers: list[asyncio.Server] = []
        self._conn_writers: set[asyncio.StreamWriter] = set()
        self._is_socket_owner = False  # the socket file is ours to remove

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        from pdx.storage.http_api import start_http

        cfg = self.config
        l2 = None
        if cfg.l2_url:  # first: a bad URL fails before anything is created
            from pdx.storage.l2 import create_l2

            l2 = create_l2(cfg.l2_url)
        try:
            _claim_socket_path(cfg.socket)
        except BaseException:
            if l2 is not None:
                l2.close()
            raise
        sweep_stale_arenas()
        allocator = SlabAllocator(cfg.capacity_bytes, min(cfg.slab_bytes, cfg.capacity_bytes))
        self.arena = SharedArena.create(allocator.capacity, prefault=cfg.prefault)
        self.index = ChunkIndex(allocator)
        if l2 is not None:
            self.tier = L2Tier(l2, self.index, self.arena, self.counters, cfg)
        self._tasks.append(asyncio.create_task(self._sweep_leases()))
        self._servers.append(await asyncio.start_unix_server(self._on_client, path=cfg.socket))
        self._is_socket_owner = True
        if cfg.remote_listen:
            from pdx.storage.remote_server import RemoteFrontend

            self.remote = RemoteFrontend(self, cfg)
            await self.remote.start()
        if cfg.http_port >= 0:
            http = await start_http(self, cfg.http_host, cfg.http_port)
            self._servers.append(http)
            self.http_port = http.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop serving, end all leases, close L2, unlink the socket and the arena. Idempotent."""
        for srv in self._servers:
            srv.close()
        for writer in list(self._conn_writers):
            writer.close()
        if self.remote is not None:
            await self.remote.aclose()  # before the arena goes: its transport stops writing into it
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._servers.clear()
        if self.tier is not None:
            await self.tier.aclose()
            self.tier = None
        for lease_id in list(self._leases):
            self._end_lease(lease_id)
        if self.arena is not None:
            self.arena.close()
        if self._is_socket_owner:
            self._is_socket_owner = False
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass

    # -- engine connections --------------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: set[int] = set()  # lease ids owned by this connection
        self._conn_writers.add(writer)
        cfg = self.config
        try:
            await serve_requests(reader, writer, lambda request: self.dispatch(request, conn),
                                 cfg.idle_timeout_s, first_timeout_s=cfg.hello_timeout_s)  # fmt: skip
        except StoreProtocolError as exc:
            logger.warning("store client sent a malformed frame: %s", exc)
            await send_reply(writer, ErrorReply(error=f"malformed frame: {exc}"))
        except ConnectionTimeout as exc:
            logger.info("closing a silent store connection: %s", exc)
            await send_reply(writer, ErrorReply(error=f"closed: {exc}"))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("client connection ended: %s", exc)
        finally:
            for lease_id in list(conn):
                self._end_lease(lease_id)
            self._conn_writers.discard(writer)
            writer.close()

    async def dispatch(self, request: Request, conn: set[int] | None) -> Reply:
        """Answer one validated request; ``conn`` is the connection's lease ids (None: HTTP)."""
        if request.needs_conn and conn is None:
            return ErrorReply(error=f"{request.op!r} needs an engine connection")  # type: ignore[attr-defined]
        op = request.op  # type: ignore[attr-defined]
        try:
            return await self._answer(request, conn)
        except ValueError as exc:
            return ErrorReply(error=f"bad {op!r} request: {exc}")
        except StorageError as exc:  # L2 failed under an operator's clear
            return ErrorReply(error=f"{op!r} failed: {exc}", is_unavailable=True)

    async def _answer(self, request: Request, conn: set[int] | None) -> Reply:
        assert self.index is not None and self.arena is not None
        match request:
            case Lookup(budget_s=budget_s):
                return await self.lookup(request.keys, self._budget(budget_s))
            case Acquire(budget_s=budget_s):
                assert conn is not None
                return await self.acquire(request.keys, self._budget(budget_s), conn)
            case Reserve(sizes=sizes):
                assert conn is not None
                return self.reserve(request.keys, sizes, conn)
            case Release(lease=lease_id) | Abort(lease=lease_id) | Commit(lease=lease_id):
                assert conn is not None
                if lease_id not in conn:  # ended by TTL, or another connection's lease
                    return ErrorReply(error=f"no open lease {lease_id} on this connection")
                if isinstance(request, Commit):
                    return CommitReply.model_construct(num_committed=self.commit(lease_id, request.checksums, request.copy_s))
                self._end_lease(lease_id, copy_s=request.copy_s if isinstance(request, Release) else 0.0)
                return Done.model_construct()
            case Pin() | Unpin():
                fn = self.index.pin if isinstance(request, Pin) else self.index.unpin
                return CountReply(num_chunks=sum(fn(k) for k in request.keys))
            case Clear(l2=l2):
                return CountReply(num_chunks=await self.clear(l2))
            case Stats():
                return StatsReply(stats=self.stats())
            case Hello():
                # remote peers can write anywhere in the arena (docs/storage.md): local loads verify
                return Welcome(arena=self.arena.name, arena_bytes=self.arena.nbytes, has_l2=self.tier is not None,
                               version=VERSION, verify_loads=self.remote is not None)  # fmt: skip
        raise AssertionError(f"no handler for {type(request).__name__}")

    def _budget(self, budget_s: float | None) -> float:
        cap = self.config.max_budget_s
        return cap if budget_s is None else min(max(budget_s, 0.0), cap)

    # -- operations ----------------------------------------------------------------------
    async def lookup(self, keys: list[bytes], budget_s: float) -> LookupReply:
        """Leading run of keys stored in L1, then L2; L2 hits start promoting at once.

        A zero budget answers from L1 alone, as ``acquire`` does (no L2 call, no L2 error)."""
        assert self.index is not None
        num_l1 = self.index.lookup_prefix(keys)
        num = num_l1
        if self.tier is not None and num_l1 < len(keys) and budget_s > 0:
            num += await self.tier.contains_prefix(keys[num_l1:], budget_s)
        self.counters.lookup_chunks += len(keys)
        self.counters.lookup_hits += num
        return LookupReply.model_construct(num_chunks=num, num_l1=num_l1)

    async def acquire(self, keys: list[bytes], budget_s: float, conn: set[int]) -> AcquireReply:
        """Read-lease the leading run of stored chunks, promoting L2 hits within the budget."""
        assert self.index is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        entries: list[Entry] = []
        try:
            for key in keys:
                entry = self.index.acquire(key)
                if entry is None and self.tier is not None and loop.time() < deadline:
                    entry = await self.tier.promoted(key, deadline)
                if entry is None:
                    break
                if entry.is_from_l2 and entry.num_reads == 1:  # first read since promotion
                    self.counters.hits_l2 += 1
                else:
                    self.counters.hits_l1 += 1
                entries.append(entry)
        except BaseException:
            for entry in entries:
                self.index.release(entry)
            raise
        self.counters.misses += len(keys) - len(entries)
        if not entries:
            return AcquireReply.model_construct(lease=None, chunks=[])
        lease = self._new_lease(False, entries, conn)
        return AcquireReply.model_construct(lease=lease.id, chunks=[(e.offset, e.nbytes, e.checksum) for e in entries])

    def reserve(self, keys: list[bytes], sizes: list[int], conn: set[int]) -> ReserveReply:
        assert self.index is not None
        offsets: list[int | None] = []
        entries: list[Entry] = []
        for key, nbytes in zip(keys, sizes, strict=True):
            status, entry = self.index.reserve(key, nbytes)
            if entry is not None:
                entries.append(entry)
                offsets.append(entry.offset)
                continue
            offsets.append(None)
            if status is ReserveStatus.NO_SPACE:
                self.counters.reserve_no_space += 1
            elif status is ReserveStatus.TOO_LARGE:
                self.counters.reserve_too_large += 1
        lease_id = self._new_lease(True, entries, conn).id if entries else None
        return ReserveReply.model_construct(lease=lease_id, offsets=offsets)

    def commit(self, lease_id: int, checksums: list[int | None], copy_s: float) -> int:
        """Publish the lease's chunks that have a checksum; free the others."""
        assert self.index is not None
        lease = self._leases.pop(lease_id, None)
        if lease is None or not lease.is_write:
            raise ValueError(f"no open write lease {lease_id} (expired or already ended)")
        lease.conn.discard(lease_id)
        if len(checksums) != len(lease.entries):
            for entry in lease.entries:
                self.index.abort(entry)
            raise ValueError(f"{len(checksums)} checksums for {len(lease.entries)} reserved chunks")
        num, nbytes = 0, 0
        for entry, value in zip(lease.entries, checksums, strict=True):
            if value is None or not self.index.commit(entry, int(value)):
                self.index.abort(entry)
                continue
            num += 1
            nbytes += entry.nbytes
            if self.tier is not None:
                self.tier.enqueue_write(entry.key)
        self.counters.record_copy("save", nbytes, copy_s)
        return num

    async def clear(self, include_l2: bool) -> int:
        assert self.index is not None
        num = self.index.clear()
        if include_l2 and self.tier is not None:
            await self.tier.clear()
        return num

    def stats(self) -> dict[str, Any]:
        assert self.index is not None and self.arena is not None
        return {
            **self.counters.as_dict(),
            "evictions": self.index.num_evictions,
            "evicted_bytes": self.index.evicted_bytes,
            "capacity_bytes": self.index.allocator.capacity,
            "used_bytes": self.index.allocator.used_bytes,
            "stored_bytes": self.index.stored_bytes,
            "num_chunks": self.index.num_chunks,
            "num_pinned": self.index.num_pinned,
            "num_leases": len(self._leases),
            "l2_queue_depth": 0 if self.tier is None else self.tier.queue_depth,
            "remote_clients": 0 if self.remote is None else self.remote.num_clients,
            "l2_url": self.config.l2_url,
            "arena": self.arena.name,
        }

    # -- leases --------------------------------------------------------------------------
    def _new_lease(self, is_write: bool, entries: list[Entry], conn: set[int]) -> Lease:
        deadline = asyncio.get_running_loop().time() + self.config.lease_ttl_s
        lease = Lease(next(self._lease_ids), is_write, entries, deadline, conn)
        self._leases[lease.id] = lease
        conn.add(lease.id)
        return lease

    def _end_lease(self, lease_id: int, copy_s: float = 0.0) -> None:
        assert self.index is not None
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        lease.conn.discard(lease_id)
        for entry in lease.entries:
            if lease.is_write:
                self.index.abort(entry)
            else:
                self.index.release(entry)
        if not lease.is_write and copy_s > 0:
            self.counters.record_copy("load", sum(e.nbytes for e in lease.entries), copy_s)

    async def _sweep_leases(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LEASE_SWEEP_S)
            now = loop.time()
            for lease in [x for x in self._leases.values() if x.deadline < now]:
                logger.warning(
                    "lease %d expired after %.0f s; ending it", lease.id, self.config.lease_ttl_s
                )
                self.counters.leases_expired += 1
                self._end_lease(lease.id)


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket file; refuse if a live store answers there."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"a store is already serving on {path}; stop it or pick another --socket")
