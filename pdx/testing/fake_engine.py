"""Fake engines that speak the observed PD contracts (tests and ``pdx bench router``).

``FakeEngine`` is an ASGI app that behaves like a stock vLLM OpenAI server (with
the pdx connector or NixlConnector) or a stock SGLang PD server, as far as a
router can tell: routes, bodies, status codes, SSE framing, and the fields each
PD protocol exchanges (see docs/router.md and the protocol modules). It records
every request so tests can assert what the router sent.

With ``rendezvous`` set, P and D legs of one transfer (pdx transfer id or SGLang
bootstrap room) wait for each other, as real engines do: P cannot push KV until D
has reserved blocks, D cannot decode before the KV arrives. A router that sent the
legs one after the other would then time out, so concurrent dispatch is tested.

pdx legs are verified as ``PdxConnector`` verifies them (``pdx.connector.signing``,
with ``kv_secret``, by default ``FAKE_KV_SECRET``): params the router did not sign
are refused (``num_refused``) and the request is answered as a plain local one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from pdx.connector.figures import TransferFigures
from pdx.connector.protocol import STATS
from pdx.connector.signing import TransferRefused, TransferVerifier

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
FAKE_KV_SECRET = "pdx-fake-fleet-secret-0123456789"  # the fleet secret fakes verify with unless told another


class Rendezvous:
    """Meeting point for the two legs of one transfer (shared by in-process fakes)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._arrived: dict[tuple[str, str], asyncio.Event] = {}

    def _event(self, key: str, role: str) -> asyncio.Event:
        return self._arrived.setdefault((key, role), asyncio.Event())

    async def meet(self, key: str, role: str) -> bool:
        """Announce ``role`` for ``key`` and wait for the other role; False on timeout."""
        self._event(key, role).set()
        other = "decode" if role == "prefill" else "prefill"
        try:
            await asyncio.wait_for(self._event(key, other).wait(), self.timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    t: float  # time.monotonic() at arrival


@dataclass
class FakeEngine:
    name: str
    role: str = "decode"  # prefill | decode | both
    kind: str = "vllm"  # vllm | sglang
    connector: str = "pdx"  # vllm: pdx | nixl
    model: str = "tiny"
    rendezvous: Rendezvous | None = None
    num_chunks: int = 8  # SSE chunks in a streamed answer
    delay_s: float = 0.0  # before answering a generation request
    fail_status: int | None = None  # answer generation requests with this status
    is_healthy: bool = True
    hang: bool = False  # never answer generation requests (until the client goes away)
    track_aborts: bool = True  # watch for client disconnects (costs a task per request)
    requests: list[Recorded] = field(default_factory=list)
    num_aborted: int = 0  # generation requests whose client disconnected first
    tokens_by_source: dict[str, int] = field(default_factory=lambda: {"local_compute": 0, "external_kv_transfer": 0})
    kv_secret: str = FAKE_KV_SECRET  # verifies pdx legs, as PdxConnector's kv_secret
    num_refused: int = 0  # pdx legs whose params were not the router's (served locally)

    def __post_init__(self) -> None:
        self._completion_stream = self._build_stream()
        self._verifier = TransferVerifier(self.kv_secret)

    # -- canned bodies ------------------------------------------------------------------
    def _completion(self, text: str, kv_params: Any = None, chat: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return orjson.dumps({
            "id": f"cmpl-{self.name}", "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": self.model, "choices": [choice],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
            "kv_transfer_params": kv_params,
        })  # fmt: skip

    def _build_stream(self) -> list[bytes]:
        chunks = []
        for i in range(self.num_chunks):
            event = {"id": f"cmpl-{self.name}", "object": "text_completion", "created": 0, "model": self.model,
                     "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None, "logprobs": None}]}
            chunks.append(b"data: " + orjson.dumps(event) + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return chunks

    # -- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET":
            return await self._get(path, send)
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = orjson.loads(raw) if raw else {}
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Recorded(path, headers, body, time.monotonic()))
        if not self.track_aborts:
            return await self._generate(path, body, send)
        task = asyncio.ensure_future(self._generate(path, body, send))
        watcher = asyncio.ensure_future(receive())  # http.disconnect when the client leaves
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            self.num_aborted += 1
            await asyncio.gather(task, return_exceptions=True)
        else:
            watcher.cancel()
            task.result()

    async def _get(self, path: str, send: Any) -> None:
        if path == "/health":
            status = 200 if self.is_healthy else 503
            return await _reply(send, status, b"{}" if status == 200 else b'{"error":"unhealthy"}')
        if path == "/v1/models":
            return await _reply(send, 200, orjson.dumps({"object": "list", "data": [{"id": self.model}]}))
        if path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
            return await _reply(send, 200, orjson.dumps({"model_path": self.model, "disaggregation_mode": self.role}))
        if path == "/get_loads":
            return await _reply(send, 200, b'{"loads":[]}')
        if path == "/metrics":
            lines = [
                f"vllm:num_requests_running{{model_name=\"{self.model}\"}} 0.0",
                f"vllm:num_requests_waiting{{model_name=\"{self.model}\"}} 0.0",
                f"vllm:kv_cache_usage_perc{{model_name=\"{self.model}\"}} 0.0",
            ] + [f'vllm:prompt_tokens_by_source_total{{source="{s}"}} {n}.0' for s, n in self.tokens_by_source.items()]
            return await _reply(send, 200, ("\n".join(lines) + "\n").encode(), b"text/plain")
        return await _reply(send, 404, b'{"detail":"Not Found"}')

    async def _generate(self, path: str, body: dict, send: Any) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail_status is not None:
            err = {"error": {"message": f"{self.name} fails", "type": "InternalServerError", "code": self.fail_status}}
            return await _reply(send, self.fail_status, orjson.dumps(err))
        if body.get("model", self.model) != self.model:
            return await _reply(send, 404, b'{"error":{"message":"model not found","code":404}}')
        if self.kind == "sglang":
            return await self._sglang(path, body, send)
        kv = body.get("kv_transfer_params") or {}
        if self.connector == "pdx" and "pdx_transfer_id" in kv:
            try:
                self._verifier.verify(kv)
            except TransferRefused:
                self.num_refused += 1
                kv = {}  # as PdxConnector: a plain local request, no peer contacted
        out_params = None
        if self.connector == "nixl" and kv.get("do_remote_decode"):
            out_params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
                          "remote_engine_id": self.name, "remote_request_id": "r", "remote_host": "127.0.0.1",
                          "remote_port": 5600, "tp_size": 1}
            self.tokens_by_source["local_compute"] += 4
        elif self.connector == "nixl" and kv.get("do_remote_prefill"):
            self.tokens_by_source["external_kv_transfer"] += 4
        elif self.connector == "pdx" and "pdx_transfer_id" in kv:
            role = kv.get("pdx_role")
            if self.rendezvous is not None and not await self.rendezvous.meet(kv["pdx_transfer_id"], str(role)):
                return await _reply(send, 500, b'{"error":{"message":"KV transfer timed out","code":500}}')
            if role == "decode":
                self.tokens_by_source["external_kv_transfer"] += 4
                figures = TransferFigures(  # what PdxConnector's D reports, in its JSON shape
                    transfer_id=kv["pdx_transfer_id"], is_ok=True, error=None, nbytes=4096, num_tokens=4,
                    num_writes=2, transfer_ms=1.0, wait_ms=2.0, exposed_ms=0.5, t_done=time.time(),
                )  # fmt: skip
                out_params = {STATS: figures.to_dict()}
            else:
                self.tokens_by_source["local_compute"] += 4
        else:
            self.tokens_by_source["local_compute"] += 4
        chat = path == "/v1/chat/completions"
        if body.get("stream") is True:
            return await self._stream(send, out_params)
        await _reply(send, 200, self._completion("hello", out_params, chat))

    async def _stream(self, send: Any, out_params: Any = None) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        chunks = self._completion_stream
        last = len(chunks) - 2
        for i, chunk in enumerate(chunks):
            if i == last and out_params is not None:
                event = orjson.loads(chunk[6:])
                event["kv_transfer_params"] = out_params
                chunk = b"data: " + orjson.dumps(event) + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _sglang(self, path: str, body: dict, send: Any) -> None:
        room = body.get("bootstrap_room")
        if body.get("bootstrap_host") is None or not isinstance(room, int) or "bootstrap_port" not in body:
            return await _reply(send, 400, b'{"error":{"message":"missing bootstrap_host/port/room","code":400}}')
        if self.rendezvous is not None and not await self.rendezvous.meet(str(room), self.role):
            return await _reply(send, 500, b'{"error":{"message":"bootstrap timed out","code":500}}')
        if path == "/generate":
            lp = [[-0.5, 7, None], [-0.25, 8, None]] if self.role == "prefill" else [[-0.125, 9, None]]
            out = {"text": "" if self.role == "prefill" else "hello", "meta_info": {"input_token_logprobs": lp}}
            if body.get("stream") is True:
                return await self._stream(send)
            return await _reply(send, 200, orjson.dumps(out))
        if body.get("stream") is True:
            return await self._stream(send)
        await _reply(send, 200, self._completion("hello", None, path == "/v1/chat/completions"))


async def _reply(send: Any, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
