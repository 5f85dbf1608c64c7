"""``PdxConnector``: vLLM's KV connector for pdx (layer-wise push from P into D's paged blocks).

Load it into stock vLLM (0.32) with::

    --kv-transfer-config '{"kv_connector": "PdxConnector",
                           "kv_connector_module_path": "pdx.engines.vllm",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_connector_extra_config": {"transport": "tcp", "control_port": 15600,
                                                         "auth_token": "...", "kv_secret": "..."}}'

``auth_token`` (control channel) and ``kv_secret`` (the fleet secret the router
signs transfer parameters with) are required; env ``PDX_KV_AUTH_TOKEN`` and
``PDX_KV_SECRET`` stand in for them. Parameters not signed by the router are
refused: the request is served locally (``pdx.connector.signing``).

vLLM builds one instance per process and role. Who calls what:

Scheduler side (``PdxScheduler``)
    get_num_new_matched_tokens, update_state_after_alloc   D: reserve blocks, load async
    on_new_request, build_connector_meta                    P: which layers of which blocks to push
    request_finished(_all_groups), update_connector_output  block lifetimes (P holds under a lease)
    has_pending_push_work                                   keep stepping while P holds blocks
Worker side (``PdxWorker``)
    register_kv_caches                                      register KV memory; P starts its control server
    start_load_kv                                           D: publish reserved blocks; P: finished requests
    wait_for_layer_load, save_kv_layer                      P: queue this layer's blocks (never blocks), before
                                                            its attention where the KV is already written
    get_finished, get_block_ids_with_load_errors            sent / landed / failed transfers
    get_kv_connector_stats, build_connector_worker_meta     transfer figures

The router's side of the contract is ``pdx.connector.protocol``; config keys are
``pdx.connector.config``; docs/connector.md has the whole picture.
Only models with a single KV cache group (all layers full attention) and engines
with one worker (TP = PP = 1) are supported.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from pdx.connector.config import ConnectorConfig
from pdx.connector.signing import TransferVerifier
from pdx.connector.store_side import StoreScheduler, StoreWorker, key_extras
from pdx.engines.vllm.kv_caches import host_layer_views, layout_from_config
from pdx.engines.vllm.metadata import PdxConnectorMetadata, PdxKVConnectorStats
from pdx.engines.vllm.scheduler import PdxScheduler
from pdx.engines.vllm.worker import PdxWorker
from pdx.errors import ConfigError, LayoutError

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _configure_logging() -> None:
    """``PDX_LOG_LEVEL`` (e.g. ``INFO``, ``DEBUG``): pdx's connector logs to the engine's stderr at that level."""
    import os

    level = os.environ.get("PDX_LOG_LEVEL")
    root = logging.getLogger("pdx")
    if not level or root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())


def kv_written_before_attention(layer_name: str) -> bool:
    """True for a plain ``Attention`` layer with its own KV cache whose backend writes the KV
    (``unified_kv_cache_update``) before the attention op starts; anything else (MLA, KV
    sharing, backends that write inside ``forward``) is sent after its attention."""
    from vllm.model_executor.layers.attention.attention import Attention, get_attention_context

    layer = get_attention_context(layer_name)[1]
    return (
        type(layer) is Attention
        and not layer.attn_backend.forward_includes_kv_cache_update
        and layer.kv_sharing_target_layer_name is None
    )


class PdxConnector(KVConnectorBase_V1, SupportsHMA):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _configure_logging()
        ktc = self._kv_transfer_config
        self.cfg = ConnectorConfig.from_extra_config(ktc.kv_connector_extra_config)
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ConfigError(
                f"PdxConnector supports models with one KV cache group, this one has {len(groups)}"
            )
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            raise ConfigError(
                "PdxConnector supports one worker per engine (tensor and pipeline parallel size 1), "
                f"got tp={par.tensor_parallel_size} pp={par.pipeline_parallel_size}"
            )
        block_size = vllm_config.cache_config.block_size
        self.scheduler: PdxScheduler | None = None
        self.worker: PdxWorker | None = None
        self.store_scheduler: StoreScheduler | None = None
        self.store_worker: StoreWorker | None = None
        self._kv_written_before_attention: dict[str, bool] = {}  # layer name -> send it early
        store = self.cfg.store
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = PdxScheduler(block_size, ktc.is_kv_producer, ktc.is_kv_consumer,
                                          TransferVerifier(self.cfg.kv_secret))
            if store is not None:
                extras = key_extras(vllm_config.model_config.model, layout_from_config(vllm_config))
                self.store_scheduler = StoreScheduler(store, block_size, extras)
                if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
                    logger.warning("pdx store: kv_load_failure_policy is not 'recompute': a chunk that "
                                   "fails to load fails its request instead of being recomputed")
        else:
            self.worker = PdxWorker(self.cfg, block_size, ktc.is_kv_producer, ktc.is_kv_consumer,
                                    ktc.engine_id or "pdx")
            if store is not None:
                self.store_worker = StoreWorker(store, block_size)
                self._store_layout = layout_from_config(vllm_config)  # what the scheduler keys chunks by

    # -- worker side ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)
        if self.store_worker is not None:
            memory = self.worker.memory
            if memory.layout.fingerprint() != self._store_layout.fingerprint():
                raise LayoutError(f"store chunks are keyed by the KV layout {self._store_layout.summary()}, "
                                  f"but the KV cache is {memory.layout.summary()}")
            self.store_worker.register(memory.layout, host_layer_views(kv_caches, memory))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdxConnectorMetadata)
        if self.store_worker is not None:
            # First: finished requests' freed blocks may be reused by this step's loads, its
            # forward pass, or a PD receive published below.
            self.store_worker.save(meta.store_saves)
        self.worker.start_load_kv(meta)
        if self.store_worker is not None:
            for load in meta.store_loads:
                self.store_worker.load(load)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # D admits a request only once its whole KV landed: nothing to wait for per layer.
        # P: vLLM calls this on entry to the layer's attention. Where the backend has already
        # written the layer's KV (CPU, FlashAttention), the layer is sent from here, so its
        # transfer overlaps the layer's own attention and MLP instead of starting after them.
        assert self.worker is not None
        if self.worker.is_producer and self._is_kv_written_before_attention(layer_name):
            from vllm.model_executor.layers.attention.attention import get_attention_context

            meta = self._get_connector_metadata()
            assert isinstance(meta, PdxConnectorMetadata)
            self.worker.save_kv_layer(layer_name, get_attention_context(layer_name)[2], meta)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdxConnectorMetadata)
        if self.worker.is_producer and self._is_kv_written_before_attention(layer_name):
            self.worker.attention_done(layer_name, meta)  # sent from wait_for_layer_load
            return
        self.worker.save_kv_layer(layer_name, kv_layer, meta)

    def _is_kv_written_before_attention(self, layer_name: str) -> bool:
        """Is this layer's KV in the cache when its attention starts (decided once per layer)?"""
        is_early = self._kv_written_before_attention.get(layer_name)
        if is_early is None:
            is_early = kv_written_before_attention(layer_name)
            self._kv_written_before_attention[layer_name] = is_early
            logger.debug("pdx: layer %s is sent %s its attention", layer_name, "before" if is_early else "after")
        return is_early

    def wait_for_save(self) -> None:
        # Writes are asynchronous; P's blocks stay held (delay_free) until they are released.
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        return self.worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        errors = self.worker.pop_load_errors()
        if self.store_worker is not None:
            errors |= self.store_worker.pop_load_errors()
        return errors

    def get_kv_connector_stats(self) -> PdxKVConnectorStats | None:
        return self.worker.pop_stats() if self.worker is not None else None

    def build_connector_worker_meta(self) -> Any:
        return self.worker.pop_worker_meta() if self.worker is not None else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        for side in (self.store_worker, self.store_scheduler):
            if side is not None:
                side.shutdown()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PdxKVConnectorStats | None:
        return PdxKVConnectorStats(data=dict(data)) if data else PdxKVConnectorStats()

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # save_kv_layer must run between layers

    # -- scheduler side ----------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler is not None:
            self.scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        n, is_async = self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        if n or is_async or self.store_scheduler is None or self.scheduler.is_decode_leg(request):
            return n, is_async
        return self.store_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        if self.store_scheduler is not None and self.store_scheduler.update_state_after_alloc(
                request, blocks, num_external_tokens):
            return
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens and self.store_scheduler is not None and \
                self.store_scheduler.is_loading(request.request_id):
            return {CacheHitSource.HOST: num_external_tokens}
        return super().get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        meta = self.scheduler.build_connector_meta(scheduler_output)
        if self.store_scheduler is not None:
            meta.store_loads, meta.store_saves = self.store_scheduler.take_specs()
        return meta

    def on_new_request(self, request: Request) -> None:
        assert self.scheduler is not None
        self.scheduler.on_new_request(request)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.scheduler is not None
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        is_held, params = self.scheduler.request_finished(request, block_ids)
        if self.store_scheduler is not None:
            self.store_scheduler.request_finished(request, block_ids)
        return is_held, params

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def has_pending_push_work(self) -> bool:
        if self.scheduler is None:
            return False
        store = self.store_scheduler is not None and self.store_scheduler.has_pending_work()
        return store or self.scheduler.has_pending_push_work()
