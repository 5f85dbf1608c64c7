"""Periodic engine checks: ``GET /health`` for rotation, ``GET /metrics`` for load and KV figures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from pdx.config.topology import Health
from pdx.engines.metrics import MetricSamples, parse_prometheus_text
from pdx.errors import UpstreamError
from pdx.router.state import EngineState

logger = logging.getLogger(__name__)

# engine metric sample name -> EngineState attribute (vLLM first, then SGLang names)
_GAUGES = {
    "vllm:num_requests_running": "num_running",
    "vllm:num_requests_waiting": "num_waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",  # a fraction, 0..1, despite the name
    "sglang:num_running_reqs": "num_running",
    "sglang:num_queue_reqs": "num_waiting",
    "sglang:token_usage": "kv_usage",
}
_PROMPT_TOKENS = frozenset({"vllm:prompt_tokens_by_source_total", "vllm:prompt_tokens_by_source"})
# Exact counter samples only: a counter also exposes ``<name>_created`` (a Unix
# timestamp), and vLLM's nixl_num_failed_notifications is already included in
# nixl_num_failed_transfers.
_FAILED_TRANSFERS = frozenset({"vllm:nixl_num_failed_transfers_total"})

async def check_engine(state: EngineState, cfg: Health) -> bool:
    try:
        resp = await state.pool.request(b"GET", b"/health", headers=state.auth_header, timeout=cfg.timeout_s)
        await resp.read(cfg.timeout_s)
        ok = resp.status == 200
    except UpstreamError:
        ok = False
    state.record_check(ok, unhealthy_after=cfg.unhealthy_after, healthy_after=cfg.healthy_after)
    if ok and cfg.scrape_metrics:
        await scrape_engine(state, cfg.timeout_s)
    return ok


async def scrape_engine(state: EngineState, timeout_s: float) -> None:
    try:
        resp = await state.pool.request(b"GET", b"/metrics", headers=state.auth_header, timeout=timeout_s)
        text = (await resp.read(timeout_s)).decode(errors="replace")
        if resp.status != 200:
            return
        samples = parse_prometheus_text(text)
    except (UpstreamError, ValueError) as exc:
        logger.debug("engine %s: cannot read /metrics: %s", state.id, exc)
        return
    read_engine_figures(state, samples)


def read_engine_figures(state: EngineState, samples: MetricSamples) -> None:
    """Set ``state``'s load and KV figures from one scrape of the engine's ``/metrics``."""
    by_source: dict[str, float] = {}
    failed: float | None = None
    for s in samples.samples:
        attr = _GAUGES.get(s.name)
        if attr is not None:
            setattr(state, attr, s.value)
        elif s.name in _PROMPT_TOKENS:
            source = dict(s.labels).get("source", "")
            by_source[source] = by_source.get(source, 0.0) + s.value
        elif s.name in _FAILED_TRANSFERS:
            failed = (failed or 0.0) + s.value
    state.prompt_tokens_by_source = by_source
    state.kv_failed_transfers = failed
    state.has_scraped_metrics = True


async def run_checks(engines: Callable[[], Iterable[EngineState]], cfg: Health) -> None:
    """Check every engine each ``interval_s`` until cancelled."""
    while True:
        states = list(engines())
        if states:
            await asyncio.gather(*(check_engine(s, cfg) for s in states), return_exceptions=True)
        await asyncio.sleep(cfg.interval_s)
