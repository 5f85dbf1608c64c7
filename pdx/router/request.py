"""One client generation request as the router sees it once it is parsed and validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class RequestCtx:
    route: str  # "/v1/completions", "/v1/chat/completions" or "/generate"
    route_bytes: bytes  # the same, encoded
    body: dict[str, Any]  # the client's parsed JSON body; never mutated
    is_stream: bool
    request_id: str
    client_auth: bytes | None  # the client's Authorization value
    keys: list[bytes]  # prefix chunk keys
    num_tokens: int
    session_id: str | None
    t0: float  # time.perf_counter() at arrival
