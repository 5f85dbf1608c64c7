"""PdxConnector's failure contract on real engines: leases, aborts, a dead prefill, overload.

Collected by ``test_pdx_connector.py`` (they share its ``pdx_pair``: P with a
short lease, D with a short receive timeout and a small KV cache). Each case
ends with both engines holding no KV blocks (vLLM's ``kv_cache_usage_perc``
back to 0). The case that kills P must run last.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import threading

import pytest

from tests.e2e.harness import (
    MAX_TOKENS,
    PROMPTS,
    Output,
    assert_outputs_match,
    completion_body,
    make_prompts,
)
from tests.e2e.pdx_helpers import KV_SECRET, LEASE_S, RECV_TIMEOUT_S, kv_usage, wait_blocks_free

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

def _legs(pair, prompt, tid=None, stream=False):
    from pdx.harness.pd_client import pdx_legs

    body = completion_body(prompt)
    body["stream"] = stream
    return pdx_legs(body, "127.0.0.1", pair.extras["control_port"], tid or secrets.token_hex(16),
                    kv_secret=KV_SECRET)


def _post(url, body):
    import httpx

    from pdx.harness.pd_client import post_json

    async def run():
        async with httpx.AsyncClient() as client:
            return await post_json(client, url + "/v1/completions", body)

    return asyncio.run(run())


def case_lease_frees_prefill_blocks_when_the_decoder_never_comes(pdx_pair):
    pair = pdx_pair
    p_body, _ = _legs(pair, PROMPTS[4])
    answer = _post(pair.prefill.url, p_body)
    assert answer["kv_transfer_params"]["pdx_role"] == "prefill"
    assert kv_usage(pair.prefill) > 0, "P must hold the blocks for the decoder"
    wait_blocks_free(pair, timeout_s=LEASE_S + 20)


def case_decoder_abort_frees_both_sides(pdx_pair):
    pair = pdx_pair
    import httpx

    from pdx.harness.pd_client import stream_sse

    p_body, d_body = _legs(pair, PROMPTS[4], stream=True)

    async def abort_decode():
        async with httpx.AsyncClient() as client:
            async def consume():
                async for _ in stream_sse(client, pair.decode.url + "/v1/completions", d_body):
                    pass
            with pytest.raises(asyncio.TimeoutError):  # D waits for KV that P has not computed
                await asyncio.wait_for(consume(), 2.0)

    asyncio.run(abort_decode())
    wait_blocks_free(pair, timeout_s=10)
    answer = _post(pair.prefill.url, p_body)  # P computes for a transfer D gave up on
    assert len(answer["choices"][0]["token_ids"]) == 1
    # Freed because D released the transfer, well before P's lease would have.
    wait_blocks_free(pair, timeout_s=LEASE_S - 3)


def case_32_concurrent_long_prompts_with_a_small_decoder_cache_all_finish(pdx_pair):
    pair = pdx_pair
    import httpx

    from pdx.harness.pd_client import pdx_completion

    prompts = make_prompts((1000,) * 32, seed=32)

    async def run():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*[
                pdx_completion(client, pair.prefill.url, pair.decode.url, pair.extras["control_port"],
                               completion_body(p), kv_secret=KV_SECRET) for p in prompts])

    answers = asyncio.run(asyncio.wait_for(run(), 600))
    assert all(len(a["choices"][0]["token_ids"]) == MAX_TOKENS for a in answers)
    wait_blocks_free(pair, timeout_s=LEASE_S + 20)


def case_killed_prefill_decoder_recomputes_and_answers(pdx_pair, single_reference):
    pair = pdx_pair
    _, d_body = _legs(pair, PROMPTS[3])
    before = pair.decode.scrape_metrics()

    async def run():
        import httpx

        from pdx.harness.pd_client import post_json

        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(post_json(client, pair.decode.url + "/v1/completions", d_body))
            await asyncio.sleep(3.0)  # D has reserved its blocks and registered them at P
            assert not task.done()
            os.killpg(pair.prefill.pid, signal.SIGKILL)
            answer = await asyncio.wait_for(task, RECV_TIMEOUT_S + 30)
            return answer

    answer = asyncio.run(run())
    pair.prefill.stop()
    assert pair.prefill.shm_segments and not [p for p in pair.prefill.shm_segments if os.path.exists(p)]
    assert_outputs_match([single_reference[3]], [Output.from_response(answer)])
    after = pair.decode.scrape_metrics()
    name = "prompt_tokens_by_source"
    assert after.sum(name, source="local_compute") - before.sum(name, source="local_compute") == len(PROMPTS[3])
    assert kv_usage(pair.decode) == 0


def case_unreachable_prefill_is_recomputed_or_fails_by_policy(pdx_pair, single_reference):
    """D's leg names a control port nobody listens on: the load fails at once."""
    from pdx.errors import EngineError
    from pdx.harness.process import free_port

    body = completion_body(PROMPTS[2])
    from pdx.connector import protocol, signing

    body["kv_transfer_params"] = signing.sign(
        protocol.decode_params(secrets.token_hex(16), "127.0.0.1", free_port()), KV_SECRET)  # as the router would
    if pdx_pair.extras["policy"] == "recompute":
        answer = _post(pdx_pair.decode.url, body)
        assert_outputs_match([single_reference[2]], [Output.from_response(answer)])
    else:
        try:
            answer = _post(pdx_pair.decode.url, body)
        except EngineError as exc:  # vLLM answers a failed generation with an HTTP error
            assert " 500" in str(exc) or " 400" in str(exc), exc
        else:
            assert answer["choices"][0]["finish_reason"] == "error", answer
    wait_blocks_free(pdx_pair, timeout_s=10)


class _RogueP:
    """A listening socket posing as a prefill connector: records every connection it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # one entry per accepted connection
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def case_client_named_peer_is_never_contacted(pdx_pair, single_reference):
    """Trust boundaries, finding 1: a client of D names its own "P"; D never connects to it.

    Unsigned, tampered (a router-signed D leg with another peer) and replayed params are
    each served locally; the rogue socket gets no connection (no hello, no registration),
    D holds no blocks, and a routed request afterwards still equals a single engine.
    """
    from pdx.connector import protocol, signing

    pair = pdx_pair
    rogue = _RogueP()
    name = "prompt_tokens_by_source"
    try:
        prompts = [list(range(100, 400)), list(range(500, 800))]  # 300 ids: the reproduction (two: no cache hit)
        unsigned = {"pdx_transfer_id": "ab" * 16, "pdx_role": "decode", "pdx_peer": f"127.0.0.1:{rogue.port}"}
        signed = signing.sign(protocol.decode_params(secrets.token_hex(16), "127.0.0.1", pair.extras["control_port"]),
                              KV_SECRET)
        tampered = {**signed, "pdx_peer": f"127.0.0.1:{rogue.port}"}
        before = pair.decode.scrape_metrics()
        for prompt, params in zip(prompts, (unsigned, tampered), strict=True):
            body = {**completion_body(prompt), "max_tokens": 1, "kv_transfer_params": params}
            answer = _post(pair.decode.url, body)  # answered, computed locally
            assert answer["choices"][0]["finish_reason"] == "length", answer
            assert not (answer.get("kv_transfer_params") or {}).get("pdx_transfer_stats")
        after = pair.decode.scrape_metrics()
        assert after.sum(name, source="local_compute") - before.sum(name, source="local_compute") == 600
        assert after.sum(name, source="external_kv_transfer") == before.sum(name, source="external_kv_transfer")
        # an unsigned P leg holds nothing for anyone
        p_body = {**completion_body(prompts[0]), "max_tokens": 1,
                  "kv_transfer_params": {"pdx_transfer_id": "cd" * 16, "pdx_role": "prefill"}}
        _post(pair.prefill.url, p_body)
        wait_blocks_free(pair, timeout_s=LEASE_S / 2)  # a held (leased) block would stay LEASE_S
        assert rogue.received == [], f"D connected to the client's peer: {rogue.received!r:.200}"
    finally:
        rogue.close()
    # a replayed router-signed D leg (same transfer id on the same D) is served locally too
    p_leg, d_leg = _legs(pair, PROMPTS[1])
    first = asyncio.run(_both(pair, p_leg, d_leg))
    assert_outputs_match([single_reference[1]], [Output.from_response(first)])
    before = pair.decode.scrape_metrics()
    again = _post(pair.decode.url, d_leg)
    assert_outputs_match([single_reference[1]], [Output.from_response(again)])
    assert not (again.get("kv_transfer_params") or {}).get("pdx_transfer_stats")  # no transfer was tried
    after = pair.decode.scrape_metrics()
    assert after.sum(name, source="external_kv_transfer") == before.sum(name, source="external_kv_transfer")
    wait_blocks_free(pair, timeout_s=LEASE_S + 20)


async def _both(pair, p_leg, d_leg):
    import httpx

    from pdx.harness.pd_client import post_json

    async with httpx.AsyncClient() as client:
        _, answer = await asyncio.gather(post_json(client, pair.prefill.url + "/v1/completions", p_leg),
                                         post_json(client, pair.decode.url + "/v1/completions", d_leg))
    return answer
