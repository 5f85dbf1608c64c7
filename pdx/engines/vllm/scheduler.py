"""PdxConnector's scheduler side: which requests send, which receive, and block lifetimes.

P (``pdx_role: prefill``): every step that computes prompt tokens of such a
request yields a ``SaveSpec``; when the request finishes, its blocks are held
(``delay_free``) until the worker reports the transfer released.

D (``pdx_role: decode``): the request asks for its whole prompt from outside
(async load), so vLLM reserves the blocks before admitting it and parks it in
WAITING_FOR_REMOTE_KVS; ``update_state_after_alloc`` turns the reservation into a
``RecvSpec``. A load is attempted once per request: after a failure or a
preemption the request is recomputed locally.

Only router-issued params count: each request's params are verified once, when
the scheduler first sees them (``pdx.connector.signing``). Refused ones
(unsigned, tampered, expired, replayed) make the request a plain local one: no
peer is contacted, nothing is held; the refusal is logged with its reason and
counted (``num_refused``). vLLM 0.32 gives a connector no safe way to answer
the client with a 4xx (an exception in a scheduler hook kills the engine core).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pdx.connector import protocol
from pdx.connector.figures import TransferFigures
from pdx.connector.signing import TransferRefused, TransferVerifier
from pdx.engines.vllm.metadata import (
    FinishSpec,
    PdxConnectorMetadata,
    PdxWorkerMeta,
    RecvSpec,
    ReleaseSpec,
    SaveSpec,
)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_NORMAL_FINISH = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


class PdxScheduler:
    def __init__(self, block_size: int, is_producer: bool, is_consumer: bool, verifier: TransferVerifier) -> None:
        self.block_size = block_size
        self.verifier = verifier
        self._verified: dict[str, protocol.PdxTransferParams | None] = {}  # req_id -> its params, until finished
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.kv_cache_manager: KVCacheManager | None = None
        # P
        self._prefills: dict[str, tuple[Request, str]] = {}  # running: req_id -> (request, transfer id)
        self._started: set[str] = set()  # prefills that had a first step
        self._held: dict[str, str] = {}  # finished, blocks held: req_id -> transfer id
        self._finishes: list[FinishSpec] = []
        # D
        self._local_hit: dict[str, int] = {}  # req_id -> block-aligned local prefix hit
        self._attempted: set[str] = set()  # requests whose load was tried (never twice)
        self._recving: dict[str, tuple[str, protocol.PeerAddress]] = {}  # req_id -> (transfer id, peer), until finished_recving
        self._recvs: list[RecvSpec] = []
        self._releases: list[ReleaseSpec] = []
        self._figures: dict[str, TransferFigures] = {}  # by req_id, from the workers

    def _params(self, request: Request) -> protocol.PdxTransferParams | None:
        """The request's verified pdx params (checked once per request), ``None`` if none or refused."""
        rid = request.request_id
        if rid in self._verified:
            return self._verified[rid]
        try:
            p = self.verifier.verify(request.kv_transfer_params)
        except TransferRefused as exc:
            logger.warning("request %s: refused pdx kv_transfer_params (%s); served locally, no transfer",
                           rid, exc)
            p = None
        self._verified[rid] = p
        return p

    @property
    def num_refused(self) -> dict[str, int]:
        """Requests whose pdx params were refused, by reason (unsigned, bad_signature, expired, ...)."""
        return dict(self.verifier.num_refused)

    def is_decode_leg(self, request: Request) -> bool:
        p = self._params(request)
        return p is not None and p.role == protocol.DECODE

    # -- D: admission ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        p = self._params(request)
        if p is None or p.role != protocol.DECODE or not self.is_consumer:
            return 0, False
        if request.request_id in self._attempted:
            return 0, False
        n = request.num_prompt_tokens - num_computed_tokens
        if n <= 0:
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        return n, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        if num_external_tokens <= 0 or rid in self._attempted:
            return
        p = self._params(request)
        if p is None or p.role != protocol.DECODE or p.peer is None:
            return
        self._attempted.add(rid)
        local_hit = self._local_hit.pop(rid, 0)
        block_ids = blocks.get_block_ids()[0]
        spec = RecvSpec(rid, p.transfer_id, p.peer, tuple(block_ids), local_hit // self.block_size,
                        request.num_prompt_tokens)
        self._recvs.append(spec)
        self._recving[rid] = (p.transfer_id, p.peer)

    # -- per step ------------------------------------------------------------------------------
    def on_new_request(self, request: Request) -> None:
        p = self._params(request)
        if p is not None and p.role == protocol.PREFILL and self.is_producer:
            self._prefills[request.request_id] = (request, p.transfer_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PdxConnectorMetadata:
        meta = PdxConnectorMetadata(finishes=self._finishes, recvs=self._recvs, releases=self._releases)
        self._finishes, self._recvs, self._releases = [], [], []
        for rid, num_new in scheduler_output.num_scheduled_tokens.items():
            entry = self._prefills.get(rid)
            if entry is None:
                continue
            request, tid = entry
            start = request.num_computed_tokens  # before this step
            end = min(start + num_new, request.num_prompt_tokens)
            if end <= start:
                continue
            if rid not in self._started:
                self._started.add(rid)
                start = 0  # a local prefix hit goes to the decoder too
            assert self.kv_cache_manager is not None
            block_ids = self.kv_cache_manager.get_block_ids(rid)[0]
            meta.saves.append(SaveSpec(rid, tid, tuple(block_ids), start, end, request.num_prompt_tokens))
        return meta

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        for rid in output.finished_sending or ():
            self._held.pop(rid, None)
        for rid in output.finished_recving or ():
            self._recving.pop(rid, None)
        meta = output.kv_connector_worker_meta
        if isinstance(meta, PdxWorkerMeta):
            # Kept for the response of requests still running (an aborted one has no response).
            self._figures.update((rid, fig) for rid, fig in meta.stats.items() if rid in self._attempted)

    def has_pending_push_work(self) -> bool:
        return bool(self._held or self._finishes or self._releases or self._recvs)

    # -- finish ----------------------------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        p = self._params(request)
        del self._verified[rid]
        self._local_hit.pop(rid, None)
        if p is None:
            return False, None
        if p.role == protocol.PREFILL and rid in self._prefills:
            del self._prefills[rid]
            started = rid in self._started
            self._started.discard(rid)
            is_aborted = request.status.name not in _NORMAL_FINISH
            if not block_ids or not started:
                # Nothing computed: no block to hold; tell the worker so a late D is refused.
                self._finishes.append(FinishSpec(rid, p.transfer_id, True, is_held=False))
                return False, None
            self._finishes.append(FinishSpec(rid, p.transfer_id, is_aborted))
            self._held[rid] = p.transfer_id
            return True, {**p.to_dict(), "pdx_num_tokens": request.num_prompt_tokens}
        if p.role == protocol.DECODE:
            was_attempted = rid in self._attempted
            self._attempted.discard(rid)
            figures = self._figures.pop(rid, None)
            if rid in self._recving:
                # Ended while its KV was on the way: stop P; vLLM frees the blocks once the
                # worker reports finished_recving (WAITING_FOR_REMOTE_KVS requests wait for it).
                tid, peer = self._recving[rid]
                self._releases.append(ReleaseSpec(rid, tid, peer, is_reserved=True))
            elif not was_attempted and p.peer is not None:
                # Ended before admission: P may be holding blocks for it; let P free them now.
                self._releases.append(ReleaseSpec(rid, p.transfer_id, p.peer, is_reserved=False))
            # The HTTP edge: D's response carries the figures as JSON.
            return False, ({protocol.STATS: figures.to_dict()} if figures is not None else None)
        return False, None

    def debug_counts(self) -> dict[str, int]:
        return {"held": len(self._held), "recving": len(self._recving), "prefills": len(self._prefills)}
