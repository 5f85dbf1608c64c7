"""Client side of a two-leg prefill/decode request, for tests and benchmarks.

Two protocols, both over stock vLLM OpenAI servers:

- **NIXL (stock vLLM, pull)**: P gets the request with ``max_tokens=1``,
  ``stream=false`` and ``kv_transfer_params={"do_remote_decode": true, ...}``; its
  response's ``kv_transfer_params`` go unchanged, with the original request, to D.
- **pdx (push)**: P and D get the request *at the same time* with one shared
  transfer id (``pdx.connector.protocol``); D's leg names P's connector control
  address. D's response is the answer.

These are what a router does, reduced to the calls; ``pdx route`` is the
production path.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from pdx.errors import EngineError
from pdx.router.protocols.nixl import PREFILL_PARAMS as NIXL_PREFILL_PARAMS

TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def prefill_leg(body: dict[str, Any], kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
    """The P leg of ``body``: one output token, not streamed, with ``kv_transfer_params``."""
    leg = copy.deepcopy(body)
    leg["max_tokens"] = 1
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    leg["stream"] = False
    leg.pop("stream_options", None)
    leg["kv_transfer_params"] = kv_transfer_params
    return leg


def with_params(body: dict[str, Any], kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
    leg = copy.deepcopy(body)
    leg["kv_transfer_params"] = kv_transfer_params
    return leg


async def post_json(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body``; the parsed JSON answer, ``EngineError`` on any non-200."""
    response = await client.post(url, json=body, timeout=TIMEOUT)
    if response.status_code != 200:
        raise EngineError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


async def stream_sse(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """POST a streaming ``body``; yield each SSE ``data:`` event as JSON until ``[DONE]``."""
    async with client.stream("POST", url, json=body, timeout=TIMEOUT) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise EngineError(f"{url} answered {response.status_code}: {text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


async def nixl_decode_leg(
    client: httpx.AsyncClient, prefill_url: str, body: dict[str, Any], path: str = "/v1/completions"
) -> dict[str, Any]:
    """Run the NIXL P leg; return D's body (``body`` with P's ``kv_transfer_params``)."""
    answer = await post_json(client, prefill_url + path, prefill_leg(body, NIXL_PREFILL_PARAMS))
    params = answer.get("kv_transfer_params")
    if not params:
        raise EngineError(
            f"{prefill_url} returned no kv_transfer_params: is it started with a "
            "kv_producer NixlConnector --kv-transfer-config?"
        )
    return with_params(body, params)


async def nixl_completion(
    client: httpx.AsyncClient,
    prefill_url: str,
    decode_url: str,
    body: dict[str, Any],
    path: str = "/v1/completions",
) -> dict[str, Any]:
    """A non-streaming request through a stock NIXL 1P1D pair; D's answer."""
    decode_body = await nixl_decode_leg(client, prefill_url, body, path)
    return await post_json(client, decode_url + path, decode_body)


def pdx_legs(
    body: dict[str, Any], prefill_kv_host: str, prefill_kv_port: int, transfer_id: str | None = None, *,
    kv_secret: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(P body, D body) for one pdx request sharing ``transfer_id`` (new if None), signed with the
    fleet secret as the router signs them (engines serve unsigned legs locally)."""
    from pdx.connector import protocol, signing

    tid = transfer_id or protocol.new_transfer_id()
    prefill_body = prefill_leg(body, signing.sign(protocol.prefill_params(tid), kv_secret))
    decode_body = with_params(body, signing.sign(protocol.decode_params(tid, prefill_kv_host, prefill_kv_port),
                                                 kv_secret))
    return prefill_body, decode_body


async def pdx_completion(
    client: httpx.AsyncClient,
    prefill_url: str,
    decode_url: str,
    prefill_kv_port: int,
    body: dict[str, Any],
    path: str = "/v1/completions",
    prefill_kv_host: str = "127.0.0.1",
    *,
    kv_secret: str,
) -> dict[str, Any]:
    """A non-streaming request through a pdx 1P1D pair (both legs at once); D's answer."""
    prefill_body, decode_body = pdx_legs(body, prefill_kv_host, prefill_kv_port, kv_secret=kv_secret)
    answers = await asyncio.gather(
        post_json(client, prefill_url + path, prefill_body),
        post_json(client, decode_url + path, decode_body),
    )
    return answers[1]
