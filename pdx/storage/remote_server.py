"""The store's door for engines on other nodes: its arena on a transport, a TCP control port.

``pdx store --remote-listen HOST:PORT`` registers the whole L1 arena as one region on a
pdx transport (``tcp`` by default, ``nixl`` or ``auto``) and serves the engine protocol
(``protocol.py``) on a TCP port. A remote client's first frame is a hello with the auth
token; the reply carries the transport kind, its descriptor and the arena's region id.
After that the client sends the engine ops (``lookup``, ``acquire``, ``release``,
``reserve``, ``commit``, ``abort``, ``stats``) and moves chunk bytes itself, one-sided:
reads of the slots ``acquire`` leased, writes into the slots ``reserve`` handed out.

What the store adds for remote clients:

- ``commit`` checks every chunk's xxh3 against the bytes that landed before publishing it;
  a chunk that differs (a torn or misdirected write) is freed, not stored (counted).
- Leases belong to the control connection, as on the unix socket: a client that dies or
  drops the connection ends its reads at once and frees its reserved slots
  ``WRITE_GRACE_S`` later (bytes of a write it was cut off in may still be landing).
- A bad token, a frame that is not JSON, nests too deep or is too large, or a hello that
  is not first gets an error reply naming the problem, then the connection is closed; bad
  fields of an op get an error reply and the connection stays. A connection with no hello
  within ``--hello-timeout-s``, or silent for ``--idle-timeout-s`` after it, is closed.
- The port never runs without a token (``--remote-token``): an empty one is a start-up error.

The transport's data port accepts only peers that present the descriptor's per-start
nonce, which is handed out after the token check. The transport is one-sided: a peer
holding the descriptor can read and write any byte of the arena over it, not only the
slots it leased, and the store cannot see its segments. What the store does instead:
``commit`` verifies the reserved slots (above), and while the port is open the node's own
clients verify every chunk they load (``Welcome.verify_loads``), so a chunk overwritten
behind the store's back is a miss, never served. Give the token only to engines you trust
to read every chunk in the store.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
from typing import TYPE_CHECKING, Any

from pdx.errors import ConfigError, StoreBadRequest, StoreProtocolError
from pdx.storage.checksum import checksum
from pdx.storage.messages import (
    VERSION,
    Abort,
    Acquire,
    Commit,
    CommitReply,
    ErrorReply,
    Hello,
    Lookup,
    Release,
    RemoteWelcome,
    Reply,
    Request,
    Reserve,
    Stats,
    parse_request,
)
from pdx.storage.protocol import (
    ConnectionTimeout,
    check_depth,
    read_body_within,
    send_reply,
    serve_requests,
)

if TYPE_CHECKING:
    from pdx.storage.config import StoreConfig
    from pdx.storage.server import StoreServer
    from pdx.transports.base import MemoryRegion, Transport

logger = logging.getLogger(__name__)

REMOTE_OPS = (Lookup, Acquire, Release, Reserve, Commit, Abort, Stats)  # requests served to remote clients
WRITE_GRACE_S = 2.0  # reserved slots of a lost connection are freed this much later
AUTO_MEDIA = ("nixl", "tcp")  # media of ``--remote-transport auto`` that reach other hosts


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); ValueError naming the flag."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--remote-listen must be HOST:PORT (port 0 = any free port), got {value!r}")
    return host, int(port)


class RemoteFrontend:
    """Owned by ``StoreServer``: started after the arena exists, closed before it goes."""

    def __init__(self, server: StoreServer, config: StoreConfig) -> None:
        assert config.remote_listen is not None
        self.server = server
        self.host, self.port = parse_listen(config.remote_listen)
        self.kind = config.remote_transport
        if not config.auth_token:
            raise ConfigError("--remote-listen needs a token: set --remote-token or PDX_STORE_REMOTE_TOKEN")
        self._token = config.auth_token
        self._hello_timeout_s = config.hello_timeout_s
        self._idle_timeout_s = config.idle_timeout_s
        self._advertise = config.remote_advertise
        self._data_port = config.remote_data_port
        self.transport: Transport | None = None
        self.region: MemoryRegion | None = None
        self._descriptor = ""  # base64 of the transport descriptor
        self._listener: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def num_clients(self) -> int:
        return len(self._writers)

    async def start(self) -> None:
        from pdx.transports import create_transport
        from pdx.transports.errors import TransportError

        assert self.server.arena is not None and self.server.arena.array is not None
        tcp = {"host": self.host, "port": self._data_port, "advertise_host": self._advertise}
        if self.kind == "tcp":
            options: dict[str, Any] = tcp
        elif self.kind == "auto":
            options = {"media": AUTO_MEDIA, "tcp": tcp}
        else:
            options = {}
        try:
            self.transport = create_transport(self.kind, **options)
        except TransportError as exc:
            raise ConfigError(f"--remote-transport {self.kind}: {exc}") from exc
        try:
            self.region = self.transport.register(self.server.arena.array)
            self._descriptor = base64.b64encode(self.transport.descriptor()).decode()
            self._listener = await asyncio.start_server(self._on_client, self.host, self.port)
        except BaseException:
            await self.aclose()
            raise
        self.port = self._listener.sockets[0].getsockname()[1]
        logger.info("remote clients: %s:%d, %s transport", self.host, self.port, self.kind)

    async def aclose(self) -> None:
        """Close the port and every client connection, release the region. Idempotent."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        transport, self.transport = self.transport, None
        if transport is not None:
            await transport.aclose()  # releases the region
        self.region = None

    # -- connections -----------------------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counters = self.server.counters
        conn: set[int] = set()  # lease ids owned by this connection
        peer = writer.get_extra_info("peername")
        try:
            body = await read_body_within(reader, self._hello_timeout_s, "hello")
            if body is None:
                return
            check_depth(body)
            error = self._check_hello(body)
            if error is not None:
                counters.remote_refused += 1
                logger.warning("remote store client %s refused: %s", peer, error)
                await send_reply(writer, ErrorReply(error=error))
                return
            self._writers.add(writer)
            await send_reply(writer, self._welcome())
            await serve_requests(reader, writer, lambda request: self._dispatch(request, conn), self._idle_timeout_s)
        except StoreProtocolError as exc:
            counters.remote_refused += 1
            logger.warning("remote store client %s sent a malformed frame: %s", peer, exc)
            await send_reply(writer, ErrorReply(error=f"malformed frame: {exc}"))
        except ConnectionTimeout as exc:
            logger.info("closing remote store connection %s: %s", peer, exc)
            await send_reply(writer, ErrorReply(error=f"closed: {exc}"))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("remote store client %s gone: %r", peer, exc)
        finally:
            loop = asyncio.get_running_loop()
            for lease_id in list(conn):
                lease = self.server._leases.get(lease_id)
                if lease is not None and lease.is_write:  # bytes of a cut-off write may still land
                    loop.call_later(WRITE_GRACE_S, self.server._end_lease, lease_id)
                else:
                    self.server._end_lease(lease_id)
            self._writers.discard(writer)
            writer.close()

    def _check_hello(self, body: bytes) -> str | None:
        try:
            hello = parse_request(body)
        except StoreBadRequest as exc:
            return f"the first frame must be a hello: {exc}"
        if not isinstance(hello, Hello):
            return f"the first frame must be a hello, got op {hello.op!r}"  # type: ignore[attr-defined]
        if hello.version != VERSION:
            return f"client speaks protocol v{hello.version}, store v{VERSION}"
        if hello.token is None or not hmac.compare_digest(hello.token.encode(), self._token.encode()):
            return "bad auth token; use the store's --remote-token (PDX_STORE_REMOTE_TOKEN)"
        return None

    def _welcome(self) -> RemoteWelcome:
        assert self.server.arena is not None and self.region is not None
        return RemoteWelcome(version=VERSION, transport=self.kind, descriptor=self._descriptor,
                             region=self.region.region_id, arena_bytes=self.server.arena.nbytes,
                             has_l2=self.server.tier is not None)  # fmt: skip

    async def _dispatch(self, request: Request, conn: set[int]) -> Reply:
        if not isinstance(request, REMOTE_OPS):
            op = request.op  # type: ignore[attr-defined]
            served = sorted(t.model_fields["op"].default for t in REMOTE_OPS)
            return ErrorReply(error=f"op {op!r} is not served to remote clients ({served})")
        counters = self.server.counters
        lease = self.server._leases.get(request.lease) if isinstance(request, Release | Commit) else None
        if lease is not None and lease.id not in conn:
            lease = None  # another connection's: dispatch refuses it
        if isinstance(request, Release) and lease is not None and not lease.is_write:
            counters.remote_loaded_chunks += len(lease.entries)
            counters.remote_loaded_bytes += sum(e.nbytes for e in lease.entries)
        if isinstance(request, Commit) and lease is not None and lease.is_write:
            if len(request.checksums) != len(lease.entries):
                return ErrorReply(error=f"bad 'commit' request: 'checksums' must be one int or null "
                                        f"per reserved chunk ({len(lease.entries)})")  # fmt: skip
            verified = await self._verified(lease.entries, request.checksums)
            saved_bytes = counters.saved_bytes
            reply = await self.server.dispatch(request.model_copy(update={"checksums": verified}), conn)
            if isinstance(reply, CommitReply):
                counters.remote_saved_chunks += reply.num_committed
            counters.remote_saved_bytes += counters.saved_bytes - saved_bytes
            return reply
        return await self.server.dispatch(request, conn)

    async def _verified(self, entries: list[Any], checksums: list[int | None]) -> list[int | None]:
        """The client's checksums, with None where the landed bytes differ (those slots are freed)."""
        arena = self.server.arena
        assert arena is not None and arena.array is not None
        array = arena.array
        rows = [(e.offset, e.nbytes, c) for e, c in zip(entries, checksums, strict=True)]

        def check() -> list[int | None]:
            return [None if c is None or checksum(array[o : o + n]) != int(c) else int(c) for o, n, c in rows]

        out = await asyncio.to_thread(check)
        num_bad = sum(c is not None and v is None for c, v in zip(checksums, out, strict=True))
        if num_bad:
            self.server.counters.remote_save_corrupt += num_bad
            logger.warning("%d remotely written chunk(s) did not match their checksum; not stored", num_bad)
        return out

