"""Typed requests and replies of the store's engine protocol, validated on receipt.

Every frame (``protocol.py``) carries one JSON object. A client sends a request, named
by ``op``, and reads one reply: the request's own reply type (``ok: true``) or an
``ErrorReply`` (``ok: false`` and ``error``). Both ends validate what they receive with
the models below (pydantic: a discriminated union, ``extra="forbid"``, bounded sizes),
so a malformed or unknown request gets an ``ErrorReply`` naming the field, never a
crash. Chunk keys are ``bytes`` in Python and hex strings on the wire; one request
carries a whole batch of keys. Senders build messages with ``model_construct`` (their
own values, not re-checked); receivers validate.

    request                                   reply
    Hello    version, token (remote only)     Welcome (node) / RemoteWelcome (remote)
    Lookup   keys, budget_s                   LookupReply    num_chunks (L1 + L2 run), num_l1
    Acquire  keys, budget_s                   AcquireReply   lease, chunks [[offset, nbytes, checksum]]
    Release  lease, copy_s                    Done
    Reserve  keys, sizes                      ReserveReply   lease, offsets [offset | null (skip)]
    Commit   lease, checksums, copy_s         CommitReply    num_committed
    Abort    lease                            Done
    Pin / Unpin  keys                         CountReply     num_chunks
    Clear    l2                               CountReply     num_chunks (removed from L1)
    Stats                                     StatsReply     stats

A request with ``noreply`` set gets no reply, not even an error (``Release``/``Abort``
sent after a block ends). Pydantic validates a 256-key lookup faster than ``json.loads``
parses it, so the hot ops use it too.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
)

from pdx.errors import StoreBadRequest, StoreProtocolError

VERSION = 1
MAX_KEYS = 1 << 18  # chunk keys in one request (about 18 MB of hex, under protocol.MAX_FRAME)
MAX_KEY_BYTES = 64  # a chunk key digest
MAX_TOKEN = 4096  # characters of a remote auth token



def _keys_from_hex(value: Any) -> list[bytes]:
    # one pass of bytes.fromhex, which the server needs anyway, instead of a regex per key
    if not isinstance(value, list) or len(value) > MAX_KEYS:
        raise ValueError(f"'keys' must be a list of at most {MAX_KEYS} hex strings")
    try:
        keys = [k if isinstance(k, bytes) else bytes.fromhex(k) for k in value]
    except (TypeError, ValueError):
        raise ValueError("'keys' must be hex strings") from None
    if keys and (max(map(len, keys)) > MAX_KEY_BYTES or min(map(len, keys)) == 0):
        raise ValueError(f"'keys' must be hex strings of 1 to {MAX_KEY_BYTES} bytes")
    return keys


# chunk keys: bytes in Python, hex strings on the wire
Keys = Annotated[
    list[bytes],
    PlainValidator(_keys_from_hex),
    PlainSerializer(lambda keys: [k.hex() for k in keys], return_type=list[str]),
]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_wire(self) -> bytes:
        """The frame body: this message as compact JSON."""
        return self.model_dump_json().encode()


# -- replies -------------------------------------------------------------------------------
class ErrorReply(Message):
    ok: Literal[False] = False
    error: str  # what was wrong and what to do
    is_unavailable: bool = False  # the store (its L2) failed, not the request: HTTP 503, not 400


class OkReply(Message):
    ok: Literal[True] = True


class Welcome(OkReply):
    arena: str  # the node's shared-memory arena (``SharedArena.attach``)
    arena_bytes: int = Field(gt=0)
    has_l2: bool  # calls may spend an L2 budget
    version: int
    verify_loads: bool = False  # remote peers can write the arena: check every load's checksum


class RemoteWelcome(OkReply):
    version: int
    transport: str  # kind of the store's transport endpoint
    descriptor: str  # its descriptor, base64
    region: int  # the arena's region id on that transport
    arena_bytes: int = Field(gt=0)
    has_l2: bool


class LookupReply(OkReply):
    num_chunks: int = Field(ge=0)  # leading keys stored, L1 then L2
    num_l1: int = Field(ge=0)  # of which in L1


class AcquireReply(OkReply):
    lease: int | None  # None: nothing stored, nothing leased
    chunks: list[tuple[int, int, int]]  # (offset, nbytes, checksum) of the leading stored chunks

    def to_wire(self) -> bytes:
        # xxh3 checksums are u64: pydantic-core serializes ints past 2^63 on a slow path,
        # json.dumps does a 256-chunk reply in half the time. All fields are JSON types.
        return json.dumps(self.__dict__, separators=(",", ":")).encode()


class ReserveReply(OkReply):
    lease: int | None  # None: no slot handed out
    offsets: list[int | None]  # one per key; None = skip (stored, being saved, no room)


class CommitReply(OkReply):
    num_committed: int = Field(ge=0)


class CountReply(OkReply):
    num_chunks: int = Field(ge=0)


class StatsReply(OkReply):
    stats: dict[str, Any]


class Done(OkReply):
    pass


Reply = OkReply | ErrorReply
R = TypeVar("R", bound=OkReply)


# -- requests ------------------------------------------------------------------------------
class Request(Message):
    reply: ClassVar[type[OkReply]] = Done  # what a store answers on success
    needs_conn: ClassVar[bool] = False  # owns leases: only over an engine connection, not HTTP
    noreply: bool = False


class Hello(Request):
    reply: ClassVar[type[OkReply]] = Welcome
    op: Literal["hello"] = "hello"
    version: int
    token: Annotated[str, Field(max_length=MAX_TOKEN)] | None = None  # remote clients


class Lookup(Request):
    reply: ClassVar[type[OkReply]] = LookupReply
    op: Literal["lookup"] = "lookup"
    keys: Keys
    budget_s: float | None = Field(default=None, allow_inf_nan=False)  # None: the store's cap


class Acquire(Request):
    reply: ClassVar[type[OkReply]] = AcquireReply
    needs_conn: ClassVar[bool] = True
    op: Literal["acquire"] = "acquire"
    keys: Keys
    budget_s: float | None = Field(default=None, allow_inf_nan=False)


class Release(Request):
    needs_conn: ClassVar[bool] = True
    op: Literal["release"] = "release"
    lease: int
    copy_s: Seconds = 0.0  # the client's copy time, for the load GB/s figures


class Reserve(Request):
    reply: ClassVar[type[OkReply]] = ReserveReply
    needs_conn: ClassVar[bool] = True
    op: Literal["reserve"] = "reserve"
    keys: Keys
    sizes: Annotated[list[Annotated[int, Field(gt=0)]], Field(max_length=MAX_KEYS)]  # bytes per key

    def model_post_init(self, _: Any) -> None:
        if len(self.sizes) != len(self.keys):
            raise ValueError(f"'sizes' must be one positive int per key ({len(self.keys)})")


class Commit(Request):
    reply: ClassVar[type[OkReply]] = CommitReply
    needs_conn: ClassVar[bool] = True
    op: Literal["commit"] = "commit"
    lease: int
    checksums: Annotated[list[int | None], Field(max_length=MAX_KEYS)]  # one per reserved slot
    copy_s: Seconds = 0.0


class Abort(Request):
    needs_conn: ClassVar[bool] = True
    op: Literal["abort"] = "abort"
    lease: int


class Pin(Request):
    reply: ClassVar[type[OkReply]] = CountReply
    op: Literal["pin"] = "pin"
    keys: Keys


class Unpin(Request):
    reply: ClassVar[type[OkReply]] = CountReply
    op: Literal["unpin"] = "unpin"
    keys: Keys


class Clear(Request):
    reply: ClassVar[type[OkReply]] = CountReply
    op: Literal["clear"] = "clear"
    l2: bool = False  # also clear the L2 tier


class Stats(Request):
    reply: ClassVar[type[OkReply]] = StatsReply
    op: Literal["stats"] = "stats"


AnyRequest = Annotated[
    Hello | Lookup | Acquire | Release | Reserve | Commit | Abort | Pin | Unpin | Clear | Stats,
    Field(discriminator="op"),
]
_requests: TypeAdapter[Any] = TypeAdapter(AnyRequest)


def parse_request(body: bytes | dict[str, Any]) -> Request:
    """One request from a frame body (or a decoded object).

    Raises ``StoreProtocolError`` if the body is not a JSON object, ``StoreBadRequest``
    (naming the field) if it is not a valid request."""
    try:
        if isinstance(body, dict):
            return _requests.validate_python(body)  # type: ignore[no-any-return]
        return _requests.validate_json(body)  # type: ignore[no-any-return]
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if not err.get("loc") and err.get("type") in ("json_invalid", "dict_type", "model_type"):
            raise StoreProtocolError(f"frame is not a JSON object: {err.get('msg')}") from None
        raise StoreBadRequest(describe(exc)) from None


def parse_reply(body: bytes, expected: type[R]) -> R | ErrorReply:
    """One reply to a request whose success reply is ``expected``; ``ValidationError`` if malformed."""
    return _reply_adapter(expected).validate_json(body)  # type: ignore[no-any-return]


def describe(exc: ValidationError) -> str:
    """The first problem of a failed validation, as one line naming the field."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    kind = err.get("type", "")
    if kind == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        return f"unknown op {tag!r}; expected one of {sorted(_OPS)}"
    if kind == "union_tag_not_found":
        return f"a request needs an 'op', one of {sorted(_OPS)}"
    op, fields = (loc[0], loc[1:]) if loc else ("?", [])
    if fields[:1] == ["keys"] and kind == "value_error":
        return f"bad {op!r} request: {(err.get('ctx') or {}).get('error')}"
    where = ".".join(fields) or "request"
    return f"bad {op!r} request: {where}: {err.get('msg')}"


_OPS = frozenset(
    t.model_fields["op"].default
    for t in (Hello, Lookup, Acquire, Release, Reserve, Commit, Abort, Pin, Unpin, Clear, Stats)
)


@cache
def _reply_adapter(expected: type[OkReply]) -> TypeAdapter[Any]:
    return TypeAdapter(Annotated[expected | ErrorReply, Field(discriminator="ok")])  # type: ignore[arg-type]


def is_noreply(body: bytes) -> bool:
    """Whether a request that failed validation asked for no reply (answering it would put
    a reply the client never reads ahead of its next one)."""
    import json

    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # callers check the depth first; this is a backstop
        return False
    return isinstance(obj, dict) and obj.get("noreply") is True
