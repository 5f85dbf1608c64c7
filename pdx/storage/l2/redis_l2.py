"""Redis/Valkey L2 (``redis://host:port/db?prefix=pdx:chunk:&ttl_s=3600``): one string per chunk.

The shared tier across nodes when a Redis or Valkey fleet already exists. A value
is written with ``SET header`` + ``APPEND payload`` inside MULTI/EXEC, so readers
never see half a value and the client never concatenates a copy of the chunk.
Timeouts are short and there is a single immediate retry (it reconnects pooled
connections after a Redis restart); a Redis that is gone costs about one
connect timeout per call and raises ``StoreUnavailable``. ``ttl_s`` expires values
(otherwise size Redis with ``maxmemory`` and an eviction policy such as allkeys-lru).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pdx.errors import ConfigError, StoreUnavailable
from pdx.storage.l2.base import L2Store

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "pdx:chunk:"
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 0.5


class RedisL2(L2Store):
    def __init__(self, url: str):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"redis L2 URL must name a host: {url!r}")
        query = parse_qs(parts.query)
        self.url = url
        self.prefix = query.pop("prefix", [DEFAULT_PREFIX])[0]
        try:
            self.ttl_s = int(query.pop("ttl_s", ["0"])[0]) or None
        except ValueError:
            raise ConfigError(f"ttl_s in {url!r} must be whole seconds") from None
        base_url = urlunsplit(("redis", parts.netloc, parts.path, "", ""))
        self._errors = (redis.exceptions.RedisError,)  # unreachable, timeout, and refusals (OOM, READONLY)
        self._redis: Any = redis.Redis.from_url(
            base_url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )

    def _name(self, key: bytes) -> str:
        return self.prefix + key.hex()

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except self._errors as exc:
            raise StoreUnavailable(f"redis L2 {self.url} failed to {what}: {exc}") from exc

    def _write(self, key: bytes, header: bytes, payload: memoryview) -> None:
        pipe = self._redis.pipeline(transaction=True)
        name = self._name(key)
        pipe.set(name, header, ex=self.ttl_s)
        pipe.append(name, payload)
        self._call("write", pipe.execute)

    def _read(self, key: bytes) -> bytes | None:
        return self._call("read", self._redis.get, self._name(key))

    def _exists(self, keys: Sequence[bytes]) -> list[bool]:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._name(key))
        return [bool(n) for n in self._call("check keys", pipe.execute)]

    def _delete(self, key: bytes) -> None:
        try:
            self._redis.delete(self._name(key))
        except self._errors:
            pass

    def _clear(self) -> int:
        def _clear() -> int:
            n = 0
            batch: list[bytes] = []
            for name in self._redis.scan_iter(match=self.prefix + "*", count=1000):
                batch.append(name)
                if len(batch) >= 500:
                    n += self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                n += self._redis.unlink(*batch)
            return n

        return self._call("clear", _clear)

    def close(self) -> None:
        redis_client, self._redis = getattr(self, "_redis", None), None
        if redis_client is not None:
            redis_client.close()
            redis_client.connection_pool.disconnect()
