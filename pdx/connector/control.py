"""The connector control channel: D's worker publishes its reserved blocks to P's worker.

One TCP connection per (D worker, P worker), JSON lines, asyncio at both ends.

    D -> P  hello     {token, engine}                      first line; P closes on a bad token
    D -> P  register  {seq, transfer_id, block_ids, ...}   D reserved these blocks for the transfer;
                      {..., layout: {..., fingerprint}}     P refuses it unless D's KV layout is P's
    D -> P  release   {seq, transfer_id, reason}           D no longer wants the KV (abort, timeout)
    P -> D  reply     {seq, ok, error}                     answer to register / release
    P -> D  failed    {transfer_id, reason}                P cannot complete the transfer

A ``release`` is answered only once P has no write to that transfer in flight,
so D may reuse the blocks as soon as the reply arrives. Every line from a peer
is validated (pydantic) before use; a malformed line closes the connection.

Bounds on P's port: a line is at most ``MAX_LINE`` bytes and nests at most
``MAX_DEPTH`` deep (checked before parsing); the hello must arrive within
``HELLO_TIMEOUT_S``; a connection that holds no registered transfer and sends
nothing for ``IDLE_TIMEOUT_S`` is closed (D reconnects on its next request).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pdx.errors import KVControlError as ControlError
from pdx.errors import LayoutError
from pdx.layout import LayoutKind, PagedKVLayout

logger = logging.getLogger(__name__)

MAX_LINE = 16 << 20  # bytes
MAX_DEPTH = 16  # JSON nesting of one line; a register is 4 deep
HELLO_TIMEOUT_S = 5.0  # P closes a connection whose hello takes longer
IDLE_TIMEOUT_S = 300.0  # P closes a connection silent this long while it holds no transfer
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
PROTOCOL_VERSION = 1


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hello(_Msg):
    op: Literal["hello"] = "hello"
    token: str
    engine: str = ""
    version: int = PROTOCOL_VERSION


class LayerDst(_Msg):
    region_id: int
    offset: int = Field(ge=0)  # byte offset of the layer's block 0 in the region


class LayoutMsg(_Msg):
    """A peer's ``PagedKVLayout``: ``describe()``, its fingerprint, and its local block stride."""

    kind: str = Field(max_length=32)
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    block_size: int = Field(gt=0)  # tokens per block
    dtype: str = Field(max_length=32)
    head_start: int = Field(ge=0)
    total_kv_heads: int = Field(gt=0)
    cpu_isa: str = Field(default="", max_length=16)
    extra: list[tuple[str, str]] = Field(default_factory=list, max_length=16)
    block_stride: int = Field(default=0, ge=0)  # bytes between blocks in the peer's memory; 0: dense
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")

    @classmethod
    def of(cls, layout: PagedKVLayout) -> LayoutMsg:
        d = layout.describe()
        d.pop("model_id")
        return cls(**d, block_stride=layout.block_stride, fingerprint=layout.fingerprint())

    def to_layout(self) -> PagedKVLayout:
        """Raises ``LayoutError`` for a malformed layout or one that does not match its fingerprint."""
        try:
            kind = LayoutKind(self.kind)
        except ValueError:
            raise LayoutError(f"unknown KV layout kind {self.kind!r}") from None
        layout = PagedKVLayout(
            kind, self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, self.dtype,
            head_start=self.head_start, total_kv_heads=self.total_kv_heads, block_stride=self.block_stride,
            cpu_isa=self.cpu_isa, extra=tuple((k, v) for k, v in self.extra),
        )  # fmt: skip
        if layout.fingerprint() != self.fingerprint:
            raise LayoutError(f"layout fingerprint {self.fingerprint} does not match its description")
        return layout


class Register(_Msg):
    op: Literal["register"] = "register"
    seq: int
    transfer_id: str = Field(min_length=8, max_length=64)
    block_ids: list[Annotated[int, Field(ge=0)]]  # D's blocks for the whole prompt, in order
    first_block: int = Field(ge=0)  # blocks before this index D already holds (local prefix hit)
    num_tokens: int = Field(gt=0)  # prompt tokens D expects
    layout: LayoutMsg  # D's KV layout; P refuses a transfer unless it equals its own
    layers: list[LayerDst]
    descriptor: str  # D's transport descriptor, base64


class Release(_Msg):
    op: Literal["release"] = "release"
    seq: int
    transfer_id: str = Field(min_length=8, max_length=64)
    reason: str = ""


class Reply(_Msg):
    op: Literal["reply"] = "reply"
    seq: int
    ok: bool
    error: str = ""


class Failed(_Msg):
    op: Literal["failed"] = "failed"
    transfer_id: str
    reason: str


ToPrefill = Annotated[Hello | Register | Release, Field(discriminator="op")]
ToDecode = Annotated[Reply | Failed, Field(discriminator="op")]
_to_prefill: TypeAdapter[Any] = TypeAdapter(ToPrefill)
_to_decode: TypeAdapter[Any] = TypeAdapter(ToDecode)


def _parse_line(line: bytes) -> Any:
    """One line from D, its nesting checked before any parser sees it (``ControlError``),
    then validated (``ValidationError``)."""
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH:  # only then scan (brackets in strings count too)
        raw = np.frombuffer(line, np.uint8)
        step = np.isin(raw, _OPENERS).astype(np.int32) - np.isin(raw, _CLOSERS)
        if int(np.cumsum(step).max()) > MAX_DEPTH:
            raise ControlError(f"line nests deeper than {MAX_DEPTH} levels")
    return _to_prefill.validate_json(line)


def encode(msg: _Msg) -> bytes:
    return msg.model_dump_json().encode() + b"\n"


class Connection:
    """P's end of one D connection; ``send`` may be called from the server's loop only."""

    def __init__(self, writer: asyncio.StreamWriter, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self.engine = ""
        self.transfer_ids: set[str] = set()  # registered over this connection

    async def send(self, msg: _Msg) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(encode(msg))
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass


class ControlHandler:
    """What P's worker does with D's messages. Raise ``ControlError`` to answer ok=false."""

    async def on_register(self, conn: Connection, msg: Register) -> None:
        raise NotImplementedError

    async def on_release(self, conn: Connection, msg: Release) -> None:
        raise NotImplementedError

    async def on_disconnect(self, conn: Connection) -> None:
        """The connection closed (D died or went away)."""


class ControlServer:
    """P's control server. ``start`` binds; ``aclose`` closes it and every connection."""

    def __init__(
        self, host: str, port: int, token: str, handler: ControlHandler,
        hello_timeout_s: float = HELLO_TIMEOUT_S, idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.host, self.port, self._token = host, port, token
        self._handler = handler
        self.hello_timeout_s = hello_timeout_s
        self.idle_timeout_s = idle_timeout_s  # 0: never
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[Connection] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("pdx control server listening on %s:%d", self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        conn = Connection(writer, f"{peername[0]}:{peername[1]}" if peername else "?")
        try:
            try:
                async with asyncio.timeout(self.hello_timeout_s):
                    hello = _parse_line(await reader.readuntil(b"\n"))
            except TimeoutError:
                logger.warning("pdx control: %s sent no hello within %g s; closing", conn.peer, self.hello_timeout_s)
                return
            if not isinstance(hello, Hello) or not hmac.compare_digest(
                hello.token.encode(), self._token.encode()
            ):
                logger.warning("pdx control: rejected %s (bad hello or auth token)", conn.peer)
                return
            if hello.version != PROTOCOL_VERSION:
                logger.warning("pdx control: %s speaks version %d, not %d", conn.peer, hello.version, PROTOCOL_VERSION)
                return
            conn.engine = hello.engine
            self._conns.add(conn)
            await conn.send(Reply(seq=0, ok=True))
            while True:
                msg = _parse_line(await self._next_line(reader, conn))
                try:
                    if isinstance(msg, Register):
                        await self._handler.on_register(conn, msg)
                    elif isinstance(msg, Release):
                        await self._handler.on_release(conn, msg)
                    else:
                        raise ControlError(f"unexpected {msg.op!r}")
                except ControlError as exc:
                    await conn.send(Reply(seq=msg.seq, ok=False, error=str(exc)))
                else:
                    await conn.send(Reply(seq=msg.seq, ok=True))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass  # the peer went away, or the server is closing
        except (ValidationError, ControlError) as exc:
            logger.warning("pdx control: malformed message from %s: %s", conn.peer, exc)
        except TimeoutError:
            logger.info("pdx control: closing %s, idle for %g s with no transfer", conn.peer, self.idle_timeout_s)
        finally:
            self._conns.discard(conn)
            writer.close()
            await self._handler.on_disconnect(conn)

    async def _next_line(self, reader: asyncio.StreamReader, conn: Connection) -> bytes:
        """The next line; ``TimeoutError`` once the connection has been idle for the idle timeout
        with no transfer registered over it (one with transfers waits as long as they last)."""
        while True:
            if self.idle_timeout_s <= 0:
                return await reader.readuntil(b"\n")
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    return await reader.readuntil(b"\n")
            except TimeoutError:
                if not conn.transfer_ids:
                    raise

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.writer.close()


class ControlClient:
    """D's end: one connection to one P. ``request`` sends and awaits the reply.

    ``on_failed(transfer_id, reason)`` runs for P's ``failed`` messages and, with
    reason "connection lost", for every transfer when the connection drops.
    """

    def __init__(
        self, host: str, port: int, token: str, engine: str,
        on_failed: Callable[[str, str], Awaitable[None] | None],
    ) -> None:
        self.host, self.port, self._token, self._engine = host, port, token, engine
        self._on_failed = on_failed
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._task: asyncio.Task[None] | None = None
        self.transfer_ids: set[str] = set()
        self.is_closed = False

    async def connect(self, timeout: float = 5.0) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=MAX_LINE), timeout
        )
        self._reader, self._writer = reader, writer
        writer.write(encode(Hello(token=self._token, engine=self._engine)))
        await writer.drain()
        try:
            first = _to_decode.validate_json(await asyncio.wait_for(reader.readuntil(b"\n"), timeout))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ControlError(
                f"prefill control server {self.host}:{self.port} closed the connection: "
                "check that both engines use the same auth_token"
            ) from exc
        if not (isinstance(first, Reply) and first.ok):
            raise ControlError(f"prefill control server {self.host}:{self.port} refused hello")
        self._task = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                msg = _to_decode.validate_json(await self._reader.readuntil(b"\n"))
                if isinstance(msg, Reply):
                    fut = self._pending.pop(msg.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    await _maybe_await(self._on_failed(msg.transfer_id, msg.reason))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValidationError) as exc:
            logger.debug("pdx control: connection to %s:%d ended: %r", self.host, self.port, exc)
        finally:
            await self._lost()

    async def _lost(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ControlError("control connection lost"))
        self._pending.clear()
        for tid in list(self.transfer_ids):
            await _maybe_await(self._on_failed(tid, "connection to the prefill engine lost"))
        if self._writer is not None:
            self._writer.close()

    async def request(self, msg_factory: Callable[[int], _Msg], timeout: float) -> Reply:
        if self.is_closed or self._writer is None:
            raise ControlError("control connection is closed")
        seq = next(self._seq)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        self._writer.write(encode(msg_factory(seq)))
        try:
            await self._writer.drain()
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ControlError(f"no reply from {self.host}:{self.port} within {timeout}s") from None
        except (ConnectionError, OSError) as exc:
            raise ControlError(f"control connection lost: {exc}") from exc
        finally:
            self._pending.pop(seq, None)

    async def aclose(self) -> None:
        self.transfer_ids.clear()
        if self._task is not None:
            self._task.cancel()
        await self._lost()


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value
