"""PdxConnector and the shared storage tier (``pdx store``): prefix reuse across engines.

Scheduler side (``StoreScheduler``)
    get_num_new_matched_tokens   keys of the prompt's full chunks (``pdx.keys``); the store's
                                 longest stored prefix beyond the engine's own prefix hit, in
                                 whole chunks, never the last prompt token -> ``(n, False)``: a
                                 synchronous load, so the request computes in the same step
    update_state_after_alloc     -> ``StoreLoadSpec`` (chunks -> the request's blocks)
    request_finished             full chunks of the computed tokens -> ``StoreSaveSpec``; the
                                 blocks are never held for it (copied before anything can reuse them)
Worker side (``StoreWorker``)
    start_load_kv                first the step's saves (one reserve for all their chunks, copies of
                                 those the store lacks, one commit), then loads; both before the
                                 step's forward pass (and before a PD receive is published), so a
                                 finished request's freed blocks are copied before any reuse. Both
                                 copy straight between the paged blocks and the store's shared
                                 arena (one copy, no staging)
    get_block_ids_with_load_errors   a chunk not loaded -> its blocks (vLLM recomputes them:
                                 kv_load_failure_policy ``recompute``)

Loads and saves are synchronous because they are memory copies to and from shared memory
(a few ms for thousands of tokens): an asynchronous load would park the request for a whole
extra engine step (WAITING_FOR_REMOTE_KVS, then rescheduled), and holding a finished
request's blocks until a background thread copied them keeps them from new requests, which
costs throughput once the KV cache is full.

Chunk bytes: for each layer in model order, the chunk's ``chunk_size // block_size``
blocks in token order, each block's bytes as vLLM holds them: the engine's
``PagedKVLayout`` with dense blocks. Copies in and out are ``pdx.segments`` plans between
the engine's layer buffers and the chunk (one vectorized copy per layer and chunk). The
key's extras are the model and the layout's fingerprint (dtype, kind, heads, head_dim,
block size, CPU ISA), so engines that would lay bytes out differently never share chunks
and no chunk needs a layout conversion. A store that is slow or gone costs at most
``timeout_s`` (+ ``l2_budget_s``) per call and then behaves as a miss; nothing raises
into the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pdx.connector.config import StoreConfig
from pdx.connector.specs import StoreLoadSpec, StoreSaveSpec
from pdx.errors import ConfigError
from pdx.keys import KeyExtras, chunk_keys
from pdx.segments import copy_host, plan_copy

if TYPE_CHECKING:
    import numpy as np
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

    from pdx.layout import PagedKVLayout

logger = logging.getLogger(__name__)

_NORMAL_FINISH = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


def _client(cfg: StoreConfig) -> Any:
    from pdx.storage.client import create_client

    return create_client(cfg)


def _blocks_per_chunk(cfg: StoreConfig, block_size: int) -> int:
    if cfg.chunk_size % block_size:
        raise ConfigError(
            f"store chunk_size {cfg.chunk_size} must be a multiple of the engine's block_size {block_size}"
        )
    return cfg.chunk_size // block_size


def key_extras(model_id: str, layout: PagedKVLayout) -> KeyExtras:
    """Everything besides token ids that decides a chunk's bytes on this engine."""
    return KeyExtras(model_id, layout.dtype, layout.fingerprint(model_id), layout.head_range)


class StoreScheduler:
    def __init__(self, cfg: StoreConfig, block_size: int, extras: KeyExtras) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.bpc = _blocks_per_chunk(cfg, block_size)
        self.extras = extras
        self.client = _client(cfg)
        self._planned: dict[str, tuple[tuple[bytes, ...], int, int]] = {}  # rid -> (keys, chunk0, hit)
        self._attempted: set[str] = set()  # a load is tried once per request
        self._loading: set[str] = set()  # store loads planned this step (until take_specs)
        self._loads: list[StoreLoadSpec] = []
        self._saves: list[StoreSaveSpec] = []

    def _keys(self, tokens: Any, num_tokens: int) -> list[bytes]:
        keys = chunk_keys(tokens[:num_tokens], self.extras, self.cfg.chunk_size, include_partial=False)
        return [k.digest for k in keys]

    # -- load ------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        rid = request.request_id
        if rid in self._attempted or request.prompt_token_ids is None:
            return 0, False
        # Leave the last prompt token to compute: vLLM needs one token to sample from.
        keys = self._keys(request.prompt_token_ids, request.num_prompt_tokens - 1)
        chunk0 = num_computed_tokens // self.cfg.chunk_size
        if chunk0 >= len(keys):
            return 0, False
        n = self.client.lookup_prefix(keys[chunk0:])
        end = (chunk0 + n) * self.cfg.chunk_size
        logger.debug("store lookup of %s: %d of %d chunks stored beyond %d computed tokens", rid, n,
                     len(keys) - chunk0, num_computed_tokens)
        if end <= num_computed_tokens:
            return 0, False
        self._planned[rid] = (tuple(keys[chunk0:chunk0 + n]), chunk0, num_computed_tokens)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> bool:
        """True if this is a store load (the worker copies it in before this step's forward pass)."""
        rid = request.request_id
        plan = self._planned.pop(rid, None)
        if plan is None or num_external_tokens <= 0 or rid in self._attempted:
            return False
        keys, chunk0, hit = plan
        self._attempted.add(rid)
        block_ids = tuple(blocks.get_block_ids()[0])
        self._loads.append(StoreLoadSpec(rid, keys, block_ids, chunk0 * self.bpc, hit // self.block_size))
        self._loading.add(rid)
        return True

    def is_loading(self, rid: str) -> bool:
        return rid in self._loading

    # -- per step --------------------------------------------------------------------------
    def take_specs(self) -> tuple[list[StoreLoadSpec], list[StoreSaveSpec]]:
        out = (self._loads, self._saves)
        self._loads, self._saves = [], []
        self._loading.clear()
        return out

    def has_pending_work(self) -> bool:
        return bool(self._loads or self._saves)  # saves of finished requests wait for a step

    # -- save ------------------------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: list[int]) -> None:
        """Queue a save of the request's full chunks of computed tokens (prompt and output) for
        the next step; the worker copies them before anything can reuse the freed blocks."""
        rid = request.request_id
        self._planned.pop(rid, None)
        self._attempted.discard(rid)
        self._loading.discard(rid)
        logger.debug("store: %s finished (%s) with %d blocks, %d computed tokens", rid, request.status.name,
                     len(block_ids), request.num_computed_tokens)
        if request.status.name not in _NORMAL_FINISH or not block_ids:
            return
        num = min(request.num_computed_tokens, len(block_ids) * self.block_size)
        keys = self._keys(request.all_token_ids, num)
        if keys:
            self._saves.append(StoreSaveSpec(rid, tuple(keys), tuple(block_ids[:len(keys) * self.bpc])))

    def shutdown(self) -> None:
        self.client.close()


class StoreWorker:
    def __init__(self, cfg: StoreConfig, block_size: int) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.bpc = _blocks_per_chunk(cfg, block_size)
        self.client = _client(cfg)  # on the model runner's thread
        self.layout: PagedKVLayout | None = None  # the engine's
        self._chunk_layout: PagedKVLayout | None = None  # one layer of a chunk: the same, dense blocks
        self._layers: list[np.ndarray] = []  # per layer: 1-D uint8 view of its buffer
        self._load_errors: set[int] = set()

    @property
    def layer_nbytes(self) -> int:
        """Bytes of one layer of one chunk."""
        return self.bpc * self._chunk_layout.page_nbytes if self._chunk_layout else 0

    @property
    def chunk_nbytes(self) -> int:
        return len(self._layers) * self.layer_nbytes

    def register(self, layout: PagedKVLayout, layers: list[np.ndarray]) -> None:
        """``layers[l]``: layer ``l``'s KV buffer in host memory, as 1-D uint8, from block 0."""
        if len(layers) != layout.num_layers:
            raise ConfigError(f"{len(layers)} KV layer buffers for a {layout.num_layers}-layer layout")
        self.layout, self._layers = layout, layers
        self._chunk_layout = replace(layout, block_stride=0)

    def _copy(self, chunk: np.ndarray, block_ids: Sequence[int], chunk_block_ids: Sequence[int],
              to_chunk: bool) -> None:
        """Every layer of the engine's ``block_ids`` to or from the chunk's blocks ``chunk_block_ids``."""
        assert self.layout is not None and self._chunk_layout is not None
        if to_chunk:
            plan = plan_copy(self.layout, block_ids, self._chunk_layout, chunk_block_ids)
        else:
            plan = plan_copy(self._chunk_layout, chunk_block_ids, self.layout, block_ids)
        n = self.layer_nbytes
        for layer, kv in enumerate(self._layers):
            part = chunk[layer * n:(layer + 1) * n]
            if to_chunk:
                copy_host(plan, [kv], [part])
            else:
                copy_host(plan, [part], [kv])

    def save(self, specs: list[StoreSaveSpec]) -> None:
        """Copy the chunks of this step's finished requests that the store lacks, here and now.

        One reserve for all their chunks (the store skips those it holds or is being sent, and
        a chunk repeated in two requests), one commit. A store that fails or is gone drops the
        save; nothing raises into the engine.
        """
        keys = [k for spec in specs for k in spec.keys]
        if not keys:
            return
        chunks = [spec.block_ids[i * self.bpc:(i + 1) * self.bpc] for spec in specs for i in range(len(spec.keys))]
        try:
            with self.client.write_views(keys, [self.chunk_nbytes] * len(keys)) as views:
                for view, blocks in zip(views, chunks, strict=True):
                    if view is not None:  # else stored already, being saved elsewhere, or no room
                        self._copy(view.reshape(-1), blocks, range(self.bpc), to_chunk=True)
        except Exception:
            logger.warning("saving %d chunks of %d requests to the store failed; skipped", len(keys), len(specs),
                           exc_info=True)  # fmt: skip
        logger.debug("store save: %d chunks of %s", len(keys), [spec.req_id for spec in specs])

    def load(self, spec: StoreLoadSpec) -> None:
        loaded = 0
        try:
            with self.client.read_views(spec.keys) as views:
                for i, view in enumerate(views):
                    if view.nbytes != self.chunk_nbytes:
                        logger.warning("stored chunk has %d bytes, expected %d", view.nbytes, self.chunk_nbytes)
                        break
                    first = spec.first_block + i * self.bpc
                    # Blocks before skip_blocks are the engine's own prefix hit: shared, leave them.
                    kept = range(max(spec.skip_blocks - first, 0), self.bpc)
                    if len(kept):
                        self._copy(view.reshape(-1), [spec.block_ids[first + j] for j in kept], kept, to_chunk=False)
                    loaded += 1
        except Exception:
            logger.warning("loading chunks of %s from the store failed", spec.req_id, exc_info=True)
        if loaded < len(spec.keys):
            first_bad = spec.first_block + loaded * self.bpc
            end = spec.first_block + len(spec.keys) * self.bpc
            self._load_errors.update(spec.block_ids[b] for b in range(max(first_bad, spec.skip_blocks), end))
            logger.info("store load of %s: %d of %d chunks; the rest is recomputed", spec.req_id, loaded,
                        len(spec.keys))

    def pop_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self) -> None:
        self.client.close()
