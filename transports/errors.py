"""Errors of the data plane.

Every error a transport raises derives from ``TransportError``::

    TransportError
    ├── TransportUnavailable      the medium cannot be used here (package missing, no CUDA, no peer path)
    ├── TransportClosed           the transport (or a region/peer of it) was already closed/released
    ├── RegistrationError         memory cannot be registered, or is not registered with this transport
    ├── DescriptorError           a peer descriptor is malformed, from another transport, or stale
    ├── ConnectError              the peer cannot be reached
    ├── SegmentError              a segment pair is invalid (unknown region, out of range, size mismatch)
    └── TransferError             a posted transfer did not complete; ``.report`` says which segments failed
        ├── TransferTimeout       it did not complete in time
        ├── TransferAborted       it was aborted locally
        └── PeerLost              the peer went away (process died, connection reset)

Errors raised by backend libraries are mapped at the edge (``raise ... from exc``);
messages say what was wrong and what to do. Outside the tree the data plane raises
only builtins for the caller's own mistakes: ``ValueError`` for a bad option,
``TimeoutError`` from ``wait_notification``. (``wire.ProtocolError`` and a broken
ucx exchange's ``ConnectionError`` never leave the transport: they end a connection
and surface as ``PeerLost``; ``remote.RemoteError`` belongs to the test endpoints.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .transfer import TransferReport


class TransportError(Exception):
    """Base of every data-plane error."""


class TransportUnavailable(TransportError):
    """The transport cannot run here (optional package or hardware missing)."""


class TransportClosed(TransportError):
    """An operation on a transport, region or peer that was already closed."""


class RegistrationError(TransportError):
    """Memory could not be registered, or a segment names memory that is not registered."""


class DescriptorError(TransportError):
    """A peer descriptor is malformed, belongs to another transport, or is stale."""


class ConnectError(TransportError):
    """The peer named by a descriptor cannot be reached."""


class SegmentError(TransportError):
    """A segment pair is invalid: unknown region, out of range, or size mismatch."""


class TransferError(TransportError):
    """A posted transfer did not complete successfully."""

    def __init__(self, message: str, report: TransferReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class TransferTimeout(TransferError):
    """A transfer did not complete within its deadline."""


class TransferAborted(TransferError):
    """A transfer was aborted by its initiator."""


class PeerLost(TransferError):
    """The peer process or connection went away."""
