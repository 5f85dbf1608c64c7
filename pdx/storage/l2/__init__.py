"""L2 adapters selected by URL; ``create_l2(url)`` imports the adapter lazily.

file:///var/cache/pdx              local disk (one file per chunk)
redis://127.0.0.1:6379/0           Redis or Valkey (``?prefix=pdx:`` names the key space)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pdx.errors import ConfigError

if TYPE_CHECKING:
    from pdx.storage.l2.base import L2Store

# scheme -> "module:Class"
REGISTRY: dict[str, str] = {
    "file": "pdx.storage.l2.disk:DiskL2",
    "redis": "pdx.storage.l2.redis_l2:RedisL2",
    "valkey": "pdx.storage.l2.redis_l2:RedisL2",
}


def create_l2(url: str) -> L2Store:
    scheme = urlsplit(url).scheme
    if scheme not in REGISTRY:
        raise ConfigError(f"unknown L2 URL scheme in {url!r}; use one of {sorted(REGISTRY)}")
    module_name, _, cls_name = REGISTRY[scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"L2 {scheme!r} needs a missing package: {exc}") from exc
    return getattr(module, cls_name)(url)
