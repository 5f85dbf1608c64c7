"""Notifications: the message a target receives once every byte of a transfer is in place.

Transports push into a ``NotificationBox`` from any thread; the target takes each
notification exactly once (``wait``, ``wait_blocking``, ``pop_all``).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Notification:
    peer: str  # the sender endpoint's name
    payload: bytes


class NotificationBox:
    """Thread-safe notification queue that asyncio code can wait on without polling.

    Transports push from any thread (receiver threads, progress threads); every
    notification is handed out exactly once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[Notification] = collections.deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._cond = threading.Condition(self._lock)

    def push(self, note: Notification) -> None:
        with self._lock:
            self._items.append(note)
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_set_if_pending, fut)
            except RuntimeError:  # loop closed
                pass

    def pop_all(self) -> list[Notification]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            return items

    def _take(self, peer: str | None, payload: bytes | None) -> Notification | None:
        for i, n in enumerate(self._items):
            if (peer is None or n.peer == peer) and (payload is None or n.payload == payload):
                del self._items[i]
                return n
        return None

    async def wait(
        self, timeout: float | None = None, peer: str | None = None, payload: bytes | None = None
    ) -> Notification:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                note = self._take(peer, payload)
                if note is not None:
                    return note
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no matching notification arrived in time")
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no matching notification arrived within {timeout}s") from None

    def wait_blocking(
        self, timeout: float | None = None, peer: str | None = None, payload: bytes | None = None
    ) -> Notification:
        """The same as ``wait`` for threads that have no event loop."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._has(peer, payload), timeout)
            if not ok:
                raise TimeoutError(f"no matching notification arrived within {timeout}s")
            note = self._take(peer, payload)
            assert note is not None
            return note

    def _has(self, peer: str | None, payload: bytes | None) -> bool:
        return any(
            (peer is None or n.peer == peer) and (payload is None or n.payload == payload)
            for n in self._items
        )


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
