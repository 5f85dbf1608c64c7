"""Errors of pdx's control plane (config, router, engines, storage).

Data-plane errors live in ``pdx.transports.errors``; pdx wraps them where they cross
into the control plane (``raise KVTransferError(...) from exc``)::

    PdxError
    ├── ConfigError               a topology/config file or option is invalid (names file, line, field)
    ├── LayoutError               two KV layouts cannot be copied directly, or a layout is malformed
    ├── KVTransferError           moving KV between engines failed (wraps a transports error)
    │   ├── KVControlError        the connector control channel refused a request or lost its peer
    │   │   └── KVLayoutMismatch  prefill and decode keep their KV in different layouts (names both)
    │   └── KVMessageError        a peer's data-plane message is malformed (size, version, range); dropped
    ├── RoutingError              no healthy engine (pair) can take the request
    ├── EngineError               an engine answered with an error or cannot be reached
    │   ├── UpstreamError         the router's connection to an engine failed (refused, reset, timeout, bad HTTP)
    │   ├── LegFailed             one leg of a request failed; the router retries on another pair
    │   └── EngineRejected        an engine answered 4xx; the client gets that answer, never retried
    └── StorageError              the storage tier failed (callers fall back to recompute)
        ├── StoreUnavailable      the store server or an L2 backend did not answer in time
        ├── StoreProtocolError    a store peer sent a frame that is not the protocol (connection closed)
        │   └── StoreBadRequest   a store request failed validation (an error reply names the field)
        └── ChunkCorrupt          a stored chunk failed its header or checksum check (a miss)

Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class PdxError(Exception):
    """Base of every pdx control-plane error."""


class ConfigError(PdxError):
    """A configuration file or option is invalid."""


class LayoutError(PdxError):
    """A KV layout is malformed, or two layouts cannot be copied directly."""


class KVTransferError(PdxError):
    """Moving KV cache between engines failed."""


class KVControlError(KVTransferError):
    """The connector control channel refused a request (auth, mismatch, expired) or lost its peer."""


class KVLayoutMismatch(KVControlError):
    """A prefill and a decode engine keep their KV cache in different layouts; they cannot pair."""


class KVMessageError(KVTransferError):
    """A peer's data-plane message (e.g. a layer-landed notification) is malformed; it is dropped."""


class RoutingError(PdxError):
    """No healthy engine, or pair of engines, can take the request."""


class EngineError(PdxError):
    """An engine answered with an error or could not be reached."""


class UpstreamError(EngineError):
    """The router's connection to an engine failed: refused, reset, timed out, bad HTTP, aborted."""

    def __init__(self, message: str, *, is_timeout: bool = False, is_sent: bool = True) -> None:
        super().__init__(message)
        self.is_timeout = is_timeout
        self.is_sent = is_sent  # False: nothing reached the engine, a retry is always safe


class LegFailed(EngineError):
    """One leg failed in a way another pair may not: retry with ``engine_id`` excluded."""

    def __init__(self, engine_id: str, message: str, *, is_timeout: bool = False) -> None:
        super().__init__(message)
        self.engine_id = engine_id
        self.is_timeout = is_timeout


class EngineRejected(EngineError):
    """An engine answered with a client error (4xx): the client gets it unchanged, no retry."""

    def __init__(self, status: int, body: bytes, content_type: bytes) -> None:
        super().__init__(f"engine answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class StorageError(PdxError):
    """The storage tier failed; callers fall back to recomputing."""


class StoreUnavailable(StorageError):
    """The store server or an L2 backend cannot be reached or did not answer in time."""


class StoreProtocolError(StorageError):
    """A store peer sent a frame that is not the store protocol; the connection is closed."""


class StoreBadRequest(StoreProtocolError):
    """A store request failed validation; it is answered with an error naming the field."""


class ChunkCorrupt(StorageError):
    """A stored chunk failed its header or checksum check; it is treated as a miss."""
