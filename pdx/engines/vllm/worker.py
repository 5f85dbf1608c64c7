"""PdxConnector's worker side: registers the KV cache, feeds the loop-side sender/receiver.

vLLM calls these from the model runner's thread; everything that does I/O runs
on one background event loop (``LoopThread``), reached with
``call_soon_threadsafe`` so the forward pass never waits on the network.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from pdx.connector.config import ConnectorConfig
from pdx.connector.control import LayerDst
from pdx.connector.decode_side import DecodeSide
from pdx.connector.figures import TransferFigures
from pdx.connector.prefill_side import PrefillSide
from pdx.connector.send_book import SendBook, WriteItem
from pdx.engines.vllm.kv_caches import KVMemory, describe_kv_caches
from pdx.engines.vllm.metadata import PdxConnectorMetadata, PdxKVConnectorStats, PdxWorkerMeta
from pdx.errors import LayoutError
from pdx.transports.loop_thread import LoopThread

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class PdxWorker:
    def __init__(self, cfg: ConnectorConfig, block_size: int, is_producer: bool, is_consumer: bool,
                 engine_id: str) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.engine_id = engine_id
        self._loop: LoopThread | None = None
        self._transport: Any = None
        self._prefill: PrefillSide | None = None
        self._decode: DecodeSide | None = None
        self._memory: KVMemory | None = None
        self._layer_index: dict[str, int] = {}
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._load_errors: set[int] = set()
        self._figures: dict[str, TransferFigures] = {}  # by req_id
        self._attention_done: dict[str, float] = {}  # P, with stats_path: transfer id -> wall clock
        self._stats = PdxKVConnectorStats()

    @property
    def control_port(self) -> int | None:
        return self._prefill.server.port if self._prefill is not None else None

    @property
    def memory(self) -> KVMemory:
        assert self._memory is not None, "register_kv_caches first"
        return self._memory

    # -- start-up --------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from pdx.transports import create_transport

        memory = describe_kv_caches(kv_caches)
        layout = memory.layout
        if layout.block_size != self.block_size:
            raise LayoutError(f"the KV cache has {layout.block_size}-token blocks, the config {self.block_size}")
        self._memory, self._kv_caches = memory, kv_caches
        self._layer_index = memory.layer_index
        self._loop = LoopThread(f"pdx-kv-{self.engine_id[:8]}")

        async def _start() -> None:
            self._transport = create_transport(self.cfg.transport, **self.cfg.transport_options)
            ids = [self._transport.register((addr, nbytes)).region_id for addr, nbytes in memory.buffers]
            layer_refs = [(ids[buf], offset) for buf, offset in memory.layer_buffers]
            if self.is_producer:
                book = SendBook(self.cfg.lease_s, layout)
                src = layer_refs
                self._prefill = PrefillSide(self._transport, book, src, self.cfg.control_host,
                                            self.cfg.control_port, self.cfg.auth_token, self.cfg.write_timeout_s)
                await self._prefill.start()
            if self.is_consumer:
                dst = [LayerDst(region_id=region_id, offset=offset) for region_id, offset in layer_refs]
                self._decode = DecodeSide(self._transport, layout, dst, self.cfg.auth_token, self.engine_id,
                                          self.cfg.recv_timeout_s)
                await self._decode.start()

        self._loop.run(_start())
        logger.info("pdx connector: KV %s (fingerprint %s), transport %s, %s", layout.summary(),
                    layout.fingerprint(), self.cfg.transport,
                    f"control port {self.control_port}" if self._prefill else "decode side")

    # -- per step --------------------------------------------------------------------------
    def start_load_kv(self, meta: PdxConnectorMetadata) -> None:
        assert self._loop is not None
        for f in meta.finishes:
            if self._prefill is not None:
                if f.is_held:
                    self._loop.call(self._prefill.finish, f.req_id, f.transfer_id, f.is_aborted)
                else:
                    self._loop.call(self._prefill.close, f.transfer_id, "the prefill request ended before its KV was computed")
        for r in meta.recvs:
            if self._decode is not None:
                self._loop.call(self._decode.recv, r.req_id, r.transfer_id, r.peer, list(r.block_ids),
                                r.first_block, r.num_tokens)
        for rel in meta.releases:
            if self._decode is not None:
                self._loop.call(self._decode.release, rel.req_id, rel.transfer_id, rel.peer)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, meta: PdxConnectorMetadata) -> None:
        # Called once the layer's KV is in the cache (before or after the layer's attention, see
        # PdxConnector.wait_for_layer_load). On CPU it is written; on GPU the kernel may still
        # run, so the sender waits for an event recorded here (never the forward).
        if not meta.saves or self._prefill is None or self._loop is None:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        ready = None
        if kv_layer.is_cuda:
            import torch

            ready = torch.cuda.Event()
            ready.record()
        now = time.time()
        for s in meta.saves:
            self._loop.call(self._prefill.save, s.req_id, s.transfer_id, list(s.block_ids), s.num_tokens,
                            WriteItem(layer, s.start, s.end, now, ready))
        self.attention_done(layer_name, meta, now)

    def attention_done(self, layer_name: str, meta: PdxConnectorMetadata, now: float | None = None) -> None:
        """P, after a layer's attention: with ``stats_path``, note when each transfer's last layer
        finished its attention (``t_attention_done``), the reference of ``exposed_after_attention``."""
        if not self.cfg.stats_path or not meta.saves or self._prefill is None:
            return
        if self._layer_index.get(layer_name) != len(self._layer_index) - 1:
            return
        now = time.time() if now is None else now
        for s in meta.saves:
            if s.end >= s.num_tokens:
                self._attention_done[s.transfer_id] = now

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        sending = set(self._prefill.pop_released()) if self._prefill is not None else set()
        if self._attention_done and self.cfg.stats_path:
            done, self._attention_done = self._attention_done, {}
            with open(self.cfg.stats_path, "a") as fh:
                for tid, t in done.items():
                    fh.write(json.dumps({"side": "prefill", "transfer_id": tid, "t_attention_done": t}) + "\n")
        recving: set[str] = set()
        if self._decode is not None:
            for out in self._decode.pop_outcomes():
                recving.add(out.req_id)
                self._load_errors |= out.failed_block_ids
                self._figures[out.req_id] = out.figures
                self._stats.record(out.figures)
                logger.debug("transfer for %s: %s", out.req_id, out.figures)
                if out.is_ok and self.cfg.should_corrupt(out.figures.transfer_id) and out.first_block_id is not None:
                    self._corrupt(out.first_block_id)
                if self.cfg.stats_path:
                    with open(self.cfg.stats_path, "a") as fh:
                        fh.write(json.dumps({"req_id": out.req_id, **out.figures.to_dict()}) + "\n")
        return sending or None, recving or None

    def _corrupt(self, block_id: int) -> None:
        """Test hook: damage one landed block of the first layer, as bad KV would."""
        first = self._memory.layer_names[0] if self._memory else None
        if first is not None:
            self._kv_caches[first][block_id].add_(0.5)
            logger.warning("debug_corrupt_block: damaged block %d of %s", block_id, first)

    def pop_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def pop_worker_meta(self) -> PdxWorkerMeta | None:
        if not self._figures:
            return None
        out, self._figures = PdxWorkerMeta(self._figures), {}
        return out

    def pop_stats(self) -> PdxKVConnectorStats | None:
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, PdxKVConnectorStats()
        return out

    def debug_counts(self) -> dict[str, int]:
        """Held P transfers and reserved D transfers (leak checks)."""
        return {
            "held": self._prefill.book.num_held if self._prefill else 0,
            "reserved": self._decode.book.num_reserved if self._decode else 0,
        }

    def shutdown(self) -> None:
        if self._loop is None:
            return

        async def _stop() -> None:
            for side in (self._prefill, self._decode):
                if side is not None:
                    await side.aclose()
            if self._transport is not None:
                await self._transport.aclose()

        try:
            self._loop.run(_stop(), timeout=10)
        except Exception:
            logger.warning("pdx connector shutdown was not clean", exc_info=True)
        self._loop.stop()
        self._loop = None
