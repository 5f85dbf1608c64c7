"""Live state of each engine the router knows: pool, health, circuit breaker, load.

Health (periodic ``/health`` checks) and the circuit breaker (consecutive request
failures) are separate: an engine takes requests when it is healthy *and* its
circuit is closed, or half-open (one trial request after ``cooldown_s``).
"""

from __future__ import annotations

import logging
import time

from pdx.config.topology import Engine
from pdx.router.upstream import EnginePool

logger = logging.getLogger(__name__)


class EngineState:
    def __init__(
        self,
        engine: Engine,
        pool: EnginePool,
        *,
        failure_threshold: int,
        cooldown_s: float,
        client_auth: bool,
    ) -> None:
        self.engine = engine
        self.id = engine.id
        self.pool = pool
        self.is_healthy = False  # until a health check passes
        self.was_healthy = False
        self.is_removed = False
        self.num_check_ok = 0
        self.num_check_failed = 0
        self.in_flight = 0
        self.num_requests = 0
        self.num_failures = 0
        self.num_consecutive_failures = 0
        self.circuit_open_until = 0.0  # monotonic; 0: closed
        self.is_trial_in_flight = False
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        # figures scraped from the engine's /metrics (exported only once has_scraped_metrics)
        self.has_scraped_metrics = False
        self.num_running = 0.0
        self.num_waiting = 0.0
        self.kv_usage = 0.0  # 0..1
        self.kv_failed_transfers: float | None = None  # None: the engine does not count them
        self.prompt_tokens_by_source: dict[str, float] = {}
        # pre-encoded headers for every request to this engine
        self.auth_header = b"Authorization: Bearer " + engine.api_key.encode() + b"\r\n" if engine.api_key else b""
        self.forwards_client_auth = client_auth and not engine.api_key

    def is_circuit_open_now(self) -> bool:
        return self.circuit_open_until > 0.0 and time.monotonic() < self.circuit_open_until

    def is_available(self, now: float) -> bool:
        """Can take a new request now (healthy, circuit closed or ready for a trial)."""
        if not self.is_healthy or self.is_removed:
            return False
        if self.circuit_open_until == 0.0:
            return True
        return now >= self.circuit_open_until and not self.is_trial_in_flight

    def begin(self) -> None:
        self.in_flight += 1
        self.num_requests += 1
        if self.circuit_open_until:
            self.is_trial_in_flight = True

    def abandon(self) -> None:
        """End a leg the router cancelled (the other leg failed, the client left): no outcome counted."""
        self.in_flight -= 1
        self.is_trial_in_flight = False

    def end(self, ok: bool) -> None:
        """Record one leg's outcome (``ok``: 2xx or 4xx, the engine itself is fine)."""
        self.in_flight -= 1
        if ok:
            self.num_consecutive_failures = 0
            if self.circuit_open_until:
                logger.warning("engine %s: circuit closed after a good trial request", self.id)
            self.circuit_open_until = 0.0
            self.is_trial_in_flight = False
            return
        self.num_failures += 1
        self.num_consecutive_failures += 1
        if self.circuit_open_until or self.num_consecutive_failures >= self.failure_threshold:
            if not self.circuit_open_until:
                logger.warning("engine %s: circuit open after %d failures", self.id, self.num_consecutive_failures)
            self.circuit_open_until = time.monotonic() + self.cooldown_s
            self.is_trial_in_flight = False

    def record_check(self, ok: bool, *, unhealthy_after: int, healthy_after: int) -> None:
        if ok:
            self.num_check_ok += 1
            self.num_check_failed = 0
            if not self.is_healthy and self.num_check_ok >= healthy_after:
                self.is_healthy = True
                if self.was_healthy:
                    logger.warning("engine %s is healthy again", self.id)
                else:
                    logger.info("engine %s is healthy; in rotation", self.id)
                self.was_healthy = True
        else:
            self.num_check_failed += 1
            self.num_check_ok = 0
            if self.is_healthy and self.num_check_failed >= unhealthy_after:
                self.is_healthy = False
                logger.warning("engine %s is unhealthy; out of rotation", self.id)

    def describe(self) -> dict:
        e = self.engine
        return {
            "id": e.id,
            "url": e.url,
            "role": e.role,
            "kind": e.kind,
            "connector": e.connector,
            "bootstrap_port": e.bootstrap_port,
            "kv_port": e.kv_port,
            "healthy": self.is_healthy,
            "circuit_open": self.is_circuit_open_now(),
            "in_flight": self.in_flight,
            "num_requests": self.num_requests,
            "num_failures": self.num_failures,
        }
