"""The three systems ``pdx bench pd`` compares, each started and stopped by the benchmark.

- ``single``: one engine, core 0.
- ``vllm-nixl``: stock vLLM ``NixlConnector`` 1P1D (P core 0, D core 1); the client
  runs P with ``max_tokens=1`` and then streams from D with P's ``kv_transfer_params``.
- ``pdx``: ``PdxConnector`` 1P1D on the chosen transport; the client sends both
  legs at once with one transfer id (``pdx.connector.protocol``) and streams from D.
  D appends one JSON line per transfer to a stats file (``exposed_ms``,
  ``transfer_ms``, ``t_done``), which gives the exposed-transfer fraction; P appends
  when each transfer's last layer finished its attention (``t_attention_done``).

Every system uses the same model, dtype, block size and engine settings.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from pdx.errors import EngineError
from pdx.harness import pd_client
from pdx.harness.process import EngineSpec, VllmEngine, free_port, start_engines

MAX_TOKENS = 16


@dataclass(frozen=True)
class Timing:
    ttft_s: float  # send to D's first streamed token
    e2e_s: float  # send to the end of the stream
    transfer_id: str | None = None  # pdx only
    prefill_leg_s: float | None = None  # vllm-nixl: send to P's answer (P's prefill, 1 token)


def request_body(prompt: list[int], stream: bool = True) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
    }


async def _stream_timed(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> Timing:
    ttft = None
    async for event in pd_client.stream_sse(client, url + "/v1/completions", body):
        if event.get("choices"):
            if ttft is None:
                ttft = time.perf_counter() - t0
    if ttft is None:
        raise EngineError(f"{url} streamed no tokens")
    return Timing(ttft, time.perf_counter() - t0)


@dataclass
class System:
    """A fleet of engines plus the client protocol that drives it."""

    name: str
    engines: list[VllmEngine]
    decode: VllmEngine  # the engine that streams the answer (and shows decode metrics)
    prefill: VllmEngine | None = None
    stats_path: Path | None = None  # pdx: D's per-transfer JSON lines
    prefill_stats_path: Path | None = None  # pdx: P's per-transfer JSON lines
    prefill_kv_port: int | None = None  # pdx: P's connector control port
    kv_secret: str = field(default="", repr=False)  # pdx: the fleet secret the legs are signed with
    transfer_ids: list[str] = field(default_factory=list)

    def start(self) -> None:
        start_engines(self.engines)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    async def request(self, client: httpx.AsyncClient, prompt: list[int]) -> Timing:
        body = request_body(prompt)
        t0 = time.perf_counter()
        if self.prefill is None:
            return await _stream_timed(client, self.decode.url, body, t0)
        if self.prefill_kv_port is None:  # stock NIXL: P first, then D
            decode_body = await pd_client.nixl_decode_leg(client, self.prefill.url, body)
            prefill_leg_s = time.perf_counter() - t0
            timing = await _stream_timed(client, self.decode.url, decode_body, t0)
            return replace(timing, prefill_leg_s=prefill_leg_s)
        # pdx: both legs at once, one transfer id
        tid = secrets.token_hex(16)
        prefill_body, decode_body = pd_client.pdx_legs(body, "127.0.0.1", self.prefill_kv_port, tid,
                                                       kv_secret=self.kv_secret)
        prefill_task = asyncio.ensure_future(
            pd_client.post_json(client, self.prefill.url + "/v1/completions", prefill_body)
        )
        try:
            timing = await _stream_timed(client, self.decode.url, decode_body, t0)
        finally:
            await asyncio.gather(prefill_task, return_exceptions=True)
        prefill_task.result()  # surface a failed P leg
        self.transfer_ids.append(tid)
        return replace(timing, transfer_id=tid)

    def transfer_figures(self) -> dict[str, dict[str, Any]]:
        """pdx: D's per-transfer figures by transfer id, with P's ``t_attention_done`` added
        (empty for other systems)."""
        out: dict[str, dict[str, Any]] = {}
        for record in _json_lines(self.stats_path):
            out[str(record.get("transfer_id"))] = record
        for record in _json_lines(self.prefill_stats_path):
            tid = str(record.get("transfer_id"))
            if tid in out and "t_attention_done" in record:
                out[tid]["t_attention_done"] = record["t_attention_done"]
        return out


def _json_lines(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spec(base: EngineSpec, name: str, cpu: str, **changes: Any) -> EngineSpec:
    return replace(base, name=name, port=free_port(), cpu_bind=cpu, **changes)


def make_single(base: EngineSpec, log_dir: Path) -> System:
    engine = VllmEngine(_spec(base, "single", "0"), log_path=log_dir / "single.log")
    return System("single", [engine], decode=engine)


def make_vllm_nixl(base: EngineSpec, log_dir: Path, num_threads: int | None = None) -> System:
    kv: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
    if num_threads is not None:  # UCX backend threads per engine (vLLM's default: 4)
        kv["kv_connector_extra_config"] = {"num_threads": num_threads}
    prefill = VllmEngine(
        _spec(base, "nixl-prefill", "0", kv_transfer_config={**kv, "kv_role": "kv_producer"},
              nixl_side_channel_port=free_port()),
        log_path=log_dir / "nixl-prefill.log",
    )  # fmt: skip
    decode = VllmEngine(
        _spec(base, "nixl-decode", "1", kv_transfer_config={**kv, "kv_role": "kv_consumer"},
              nixl_side_channel_port=free_port()),
        log_path=log_dir / "nixl-decode.log",
    )  # fmt: skip
    return System("vllm-nixl", [prefill, decode], decode=decode, prefill=prefill)


def make_pdx(base: EngineSpec, log_dir: Path, transport: str) -> System:
    control_port = free_port()
    token = secrets.token_hex(16)
    kv_secret = secrets.token_hex(32)
    stats_path = log_dir / "pdx-transfers.jsonl"
    prefill_stats_path = log_dir / "pdx-prefill-transfers.jsonl"
    stats_path.unlink(missing_ok=True)
    prefill_stats_path.unlink(missing_ok=True)
    kv = {"kv_connector": "PdxConnector", "kv_connector_module_path": "pdx.engines.vllm"}
    extra = {"transport": transport, "auth_token": token, "kv_secret": kv_secret}
    prefill_kv = {**kv, "kv_role": "kv_producer",
                  "kv_connector_extra_config": {**extra, "control_port": control_port,
                                                "stats_path": str(prefill_stats_path)}}  # fmt: skip
    decode_kv = {**kv, "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
                 "kv_connector_extra_config": {**extra, "stats_path": str(stats_path)}}  # fmt: skip
    # NIXL/UCX transports also need a side channel; harmless for the others.
    prefill = VllmEngine(
        _spec(base, "pdx-prefill", "0", kv_transfer_config=prefill_kv,
              nixl_side_channel_port=free_port()),
        log_path=log_dir / "pdx-prefill.log",
    )  # fmt: skip
    decode = VllmEngine(
        _spec(base, "pdx-decode", "1", kv_transfer_config=decode_kv,
              nixl_side_channel_port=free_port()),
        log_path=log_dir / "pdx-decode.log",
    )  # fmt: skip
    return System(
        "pdx",
        [prefill, decode],
        decode=decode,
        prefill=prefill,
        stats_path=stats_path,
        prefill_stats_path=prefill_stats_path,
        prefill_kv_port=control_port,
        kv_secret=kv_secret,
    )
