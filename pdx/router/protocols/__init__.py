"""The three PD protocols the router speaks: one ``PDProtocol`` (``base.py``) per fleet kind.

==========  ==========================  ==========================================
protocol    fleet                       dispatch
==========  ==========================  ==========================================
``pdx``     vLLM + PdxConnector         P and D concurrently, one shared transfer id
``nixl``    vLLM + stock NixlConnector  P (max_tokens=1) first, then D with P's params
``sglang``  stock SGLang PD             P and D concurrently, shared bootstrap room
==========  ==========================  ==========================================

Each module builds the leg bodies from the client's parsed JSON body (a dict it
never mutates); ``pdx.router.proxy`` does the I/O. ``create_protocol(name)`` is
the only place a protocol name is looked at; it imports the implementation lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from pdx.errors import ConfigError

if TYPE_CHECKING:
    from pdx.router.protocols.base import PDProtocol

_REGISTRY = {
    "pdx": ("pdx.router.protocols.pdx", "PdxProtocol"),
    "nixl": ("pdx.router.protocols.nixl", "NixlProtocol"),
    "sglang": ("pdx.router.protocols.sglang", "SglangProtocol"),
}


def create_protocol(name: str, kv_secret: str | None = None) -> PDProtocol:
    """The protocol a fleet speaks (``pdx.config.topology.protocol_of``); ConfigError names the choices.

    ``kv_secret`` is the fleet secret (topology ``kv_secret``): the ``pdx`` protocol signs
    every leg's transfer params with it and refuses to start without one.
    """
    try:
        module, cls = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown PD protocol {name!r}; use one of {sorted(_REGISTRY)}") from None
    if name == "pdx":
        return getattr(import_module(module), cls)(kv_secret)
    return getattr(import_module(module), cls)()
