"""Open-loop load at a fixed QPS against an OpenAI ``/v1/completions`` endpoint (httpx, async).

``run_load`` sends requests at arrival times drawn from a seeded Poisson process
(or evenly spaced) for ``duration_s`` seconds or ``max_requests`` requests,
whichever ends first, then waits at most ``drain_s`` for answers still streaming
and cancels the rest (they count as errors). A closed-loop workload
(multi-round-chat) gives each arrival to the next idle user; when every user
waits for an answer, the arrival waits for the first user to become idle.

Every request streams (``"stream": true``, ``"ignore_eos": true``,
``"stream_options": {"include_usage": true}``) so that:

- TTFT is from sending the request to the first streamed chunk with a choice;
- inter-token latencies are the gaps between successive chunks with a choice
  (vLLM streams one token per chunk);
- output tokens are the final usage's ``completion_tokens`` (or the chunk count
  when the server sends no usage).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    qps: float = 1.0
    duration_s: float = 30.0  # no new request after this
    max_requests: int = 10_000
    arrival: str = "poisson"  # poisson | uniform
    drain_s: float = 60.0  # wait this long for answers still streaming at the end
    seed: int = 0
    request_timeout_s: float = 300.0


@dataclass(frozen=True)
class RequestRecord:
    """What one request measured. Times in seconds; ``t_sent`` from the run's start."""

    user: int  # chat user, -1 for workloads without users
    t_sent: float
    num_prompt_tokens: int
    num_output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: tuple[float, ...] = ()  # gaps between successive streamed tokens
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None


def arrival_gaps(load: LoadSpec) -> np.ndarray:
    """Seconds between successive arrivals (enough for ``duration_s``, at most ``max_requests``)."""
    count = min(load.max_requests, int(load.qps * load.duration_s * 3) + 16)
    if load.arrival == "uniform":
        return np.full(count, 1.0 / load.qps)
    if load.arrival != "poisson":
        raise ValueError(f"unknown arrival process {load.arrival!r} (poisson or uniform)")
    return np.random.default_rng([load.seed, 7]).exponential(1.0 / load.qps, size=count)


async def send_completion(
    client: Any,
    url: str,
    model: str,
    prompt: tuple[int, ...],
    max_tokens: int,
    t0: float,
    user: int,
) -> RequestRecord:
    """Stream one completion for a token-id prompt; errors become a record, never raise."""
    body = {
        "model": model, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    t_sent = time.perf_counter()
    base = RequestRecord(user=user, t_sent=t_sent - t0, num_prompt_tokens=len(prompt))
    arrivals: list[float] = []
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                return _replace(base, error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("choices"):
                    arrivals.append(time.perf_counter())
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except Exception as exc:  # a failed request is a figure, not a crash
        return _replace(base, error=f"{type(exc).__name__}: {exc}"[:300])
    t_end = time.perf_counter()
    if not arrivals:
        return _replace(base, error="stream ended without a token")
    return _replace(
        base,
        num_output_tokens=usage_tokens if usage_tokens is not None else len(arrivals),
        ttft_s=arrivals[0] - t_sent,
        e2e_s=t_end - t_sent,
        itl_s=tuple(b - a for a, b in zip(arrivals, arrivals[1:], strict=False)),
    )


def _replace(record: RequestRecord, **changes: Any) -> RequestRecord:
    from dataclasses import replace

    return replace(record, **changes)


async def run_load(
    workload: Any,
    client: Any,
    url: str,
    model: str,
    load: LoadSpec,
    max_tokens: int,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Drive ``workload`` against ``url`` per ``load``; one record per request sent."""
    gaps = arrival_gaps(load)
    records: list[RequestRecord] = []
    idle: asyncio.Queue[int] = asyncio.Queue()
    for user in range(getattr(workload, "num_users", 0)):
        idle.put_nowait(user)
    tasks: set[asyncio.Task] = set()
    t0 = time.perf_counter()
    deadline = t0 + load.duration_s

    async def one(user: int, prompt: tuple[int, ...]) -> None:
        t_sent = time.perf_counter() - t0
        try:
            record = await send_completion(client, url, model, prompt, max_tokens, t0, user)
        except asyncio.CancelledError:
            records.append(
                RequestRecord(user, t_sent, len(prompt), error="cancelled after the drain time")
            )
            raise
        records.append(record)
        if record.is_ok:
            workload.on_answer(user)
        if workload.is_closed_loop:
            idle.put_nowait(user)
        if on_done is not None:
            on_done(record)

    t_next = t0
    for gap in gaps:
        t_next += float(gap)
        if t_next >= deadline:
            break
        await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
        user = -1
        if workload.is_closed_loop:
            try:
                user = await asyncio.wait_for(idle.get(), max(0.0, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                break
        request = workload.next_request(user)
        task = asyncio.create_task(one(request.user, request.prompt))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=load.drain_s)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning(
                "%d requests still open after %.0f s of drain; cancelled",
                len(pending),
                load.drain_s,
            )
            await asyncio.gather(*pending, return_exceptions=True)
    return sorted(records, key=lambda r: r.t_sent)
