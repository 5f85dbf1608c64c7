"""The router's view of its engines: membership, pair selection, learned prefixes."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdx.config.topology import Engine, Topology, protocol_of
from pdx.errors import RoutingError
from pdx.router import policies
from pdx.router.prefix import PrefixIndex, match_prefix
from pdx.router.protocols import create_protocol
from pdx.router.state import EngineState
from pdx.router.upstream import EnginePool

if TYPE_CHECKING:
    from pdx.router.request import RequestCtx

logger = logging.getLogger(__name__)


class Fleet:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.config = topology.router
        self.protocol = create_protocol(topology.protocol, topology.kv_secret)  # the first engine to join sets it
        self.prefix_index = PrefixIndex()
        self._engines: dict[str, EngineState] = {}
        self._counter = 0
        self._is_open = False

    # -- membership ---------------------------------------------------------------------
    def open(self) -> None:
        """Create the pools (needs the running event loop)."""
        self._is_open = True
        for engine in self.topology.engines:
            self.add(engine)

    def states(self) -> list[EngineState]:
        return list(self._engines.values())

    def get(self, engine_id: str) -> EngineState | None:
        return self._engines.get(engine_id)

    def check_compatible(self, engine: Engine) -> str | None:
        """Why ``engine`` cannot join this fleet, or None."""
        if engine.id in self._engines:
            return f"an engine with id {engine.id!r} is already registered"
        if any(s.engine.url == engine.url for s in self._engines.values()):
            return f"an engine at {engine.url} is already registered"
        if self._engines and protocol_of([engine]) != self.protocol.name:
            return (f"this fleet speaks the {self.protocol.name!r} protocol; "
                    f"the engine would speak {protocol_of([engine])!r}")
        return None

    def add(self, engine: Engine) -> EngineState:
        cfg = self.config
        pool = EnginePool(
            engine.id, engine.host, engine.port,
            max_connections=cfg.max_connections_per_engine, connect_timeout=cfg.timeouts.connect_s,
        )  # fmt: skip
        state = EngineState(
            engine, pool, failure_threshold=cfg.circuit_failure_threshold, cooldown_s=cfg.circuit_cooldown_s,
            client_auth=cfg.auth_token is None,
        )  # fmt: skip
        if not self._engines:
            self.protocol = create_protocol(protocol_of([engine]), self.topology.kv_secret)
        self._engines[engine.id] = state
        logger.info("engine %s (%s, %s) joined", engine.id, engine.role, engine.url)
        return state

    async def remove(self, engine_id: str) -> EngineState | None:
        """Take an engine out of rotation at once; its open requests finish."""
        state = self._engines.pop(engine_id, None)
        if state is not None:
            state.is_removed = True
            self.prefix_index.forget_engine(engine_id)
            state.pool.drain()
            logger.info("engine %s left", engine_id)
        return state

    async def aclose(self) -> None:
        for state in list(self._engines.values()):
            await state.pool.aclose()
        self._engines.clear()

    # -- selection ----------------------------------------------------------------------
    def _available(self, want_prefill: bool, excluded: set[str], now: float, *,
                   can_reuse_excluded: bool = True) -> list[EngineState]:
        found = [
            s for s in self._engines.values()
            if (s.engine.can_prefill if want_prefill else s.engine.can_decode) and s.is_available(now)
        ]  # fmt: skip
        if excluded:
            kept = [s for s in found if s.id not in excluded]
            if kept or not can_reuse_excluded:
                return kept
            return found  # every candidate failed once and there is no other way: try them again
        return found

    def pick_pair(self, ctx: RequestCtx, excluded: set[str]) -> tuple[EngineState | None, EngineState]:
        """(P, D) for one attempt; P is None when D serves the request alone."""
        now = time.monotonic()
        pol = self.config.policies
        decoders = self._available(False, excluded, now)
        if not decoders:
            raise RoutingError("no healthy decode engine is available; check GET /workers")
        counter = self._counter
        self._counter = counter + 1
        matched = match_prefix(ctx.keys, self.prefix_index) if ctx.keys else {}
        protocol = self.protocol
        d_matched = max((matched.get(s.id, 0) for s in decoders), default=0) * pol.chunk_size
        if not protocol.needs_prefill(ctx.num_tokens, d_matched, pol):
            d = self._pick(pol.decode, decoders, counter, matched, ctx.session_id, prefer_prefix=True)
            return None, d
        # a P that failed this request is not picked again while D can serve alone
        prefillers = self._available(True, excluded, now, can_reuse_excluded=protocol.is_prefill_required)
        if not prefillers:
            if protocol.is_prefill_required:
                raise RoutingError("no healthy prefill engine is available; check GET /workers")
            d = self._pick(pol.decode, decoders, counter, matched, ctx.session_id)
            return None, d  # vLLM D can prefill by itself (decode_only)
        p = self._pick(pol.prefill, prefillers, counter, matched, ctx.session_id)
        others = [s for s in decoders if s.id != p.id]
        if not others:
            return None, p  # a single "both" engine: serve locally, no transfer
        d = self._pick(pol.decode, others, counter, matched, ctx.session_id)
        return p, d

    @staticmethod
    def _pick(policy: str, candidates: Sequence[EngineState], counter: int, matched, session_id,
              prefer_prefix: bool = False) -> EngineState:
        if prefer_prefix and matched and policy != "session_affinity":
            policy = "prefix_aware"
        return policies.pick(policy, candidates, counter=counter, matched_chunks=matched, session_id=session_id)

    def record_prefix(self, keys: list[bytes], p: EngineState | None, d: EngineState) -> None:
        """After a success both engines hold the prompt's KV (P computed it, D received it)."""
        if not keys:
            return
        if p is not None:
            self.prefix_index.record(keys, p.id)
        self.prefix_index.record(keys, d.id)

    def readiness(self) -> tuple[bool, str]:
        now = time.monotonic()
        if not self._engines:
            return False, "no engines registered"
        if not self._available(False, set(), now):
            return False, "no healthy decode engine"
        if self.protocol.is_prefill_required and not self._available(True, set(), now):
            return False, "no healthy prefill engine"
        return True, "ok"
