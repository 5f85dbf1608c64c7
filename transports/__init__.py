"""pdx data plane: move bytes between registered memory of two endpoints.

``create_transport(name, **options)`` imports the implementation lazily, so
``import pdx.transports`` needs neither nixl, ucxx nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import TransportError, TransportUnavailable

if TYPE_CHECKING:
    from .base import Transport

# name -> "module:Class"; fastest first within each locality (used by ``auto``).
REGISTRY: dict[str, str] = {
    "loopback": ".loopback:LoopbackTransport",
    "shm": ".shm:ShmTransport",
    "tcp": ".tcp:TcpTransport",
    "nixl": ".nixl:NixlTransport",
    "ucx": ".ucx:UcxTransport",
    "cuda_ipc": ".cuda_ipc:CudaIpcTransport",
}


def transport_class(name: str) -> type[Transport]:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise TransportError(
            f"unknown transport {name!r}; choose one of {sorted(REGISTRY) + ['auto']}"
        ) from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name, __name__)
    except ImportError as exc:
        raise TransportUnavailable(f"transport {name!r} is not available here: {exc}") from exc
    return getattr(module, cls_name)


def create_transport(name: str, **options: Any) -> Transport:
    """Create a transport endpoint by registry name (or ``auto``)."""
    if name == "auto":
        from .auto import create_auto

        return create_auto(**options)
    return transport_class(name)(**options)


def available_transports() -> list[str]:
    """Registry names whose implementation imports and can run on this machine."""
    out = []
    for name in REGISTRY:
        try:
            cls = transport_class(name)
        except TransportError:
            continue
        is_available = getattr(cls, "is_available", None)
        if is_available is None or is_available():
            out.append(name)
    return out


__all__ = ["REGISTRY", "available_transports", "create_transport", "transport_class"]
