"""vLLM scheduler objects for testing a connector's scheduler side without an engine.

Shaped like what vLLM 0.32 hands ``KVConnectorBase_V1``'s scheduler methods: a request
(``vllm.v1.request.Request``: ids, token counts, ``kv_transfer_params``, ``status``) and the
blocks of ``update_state_after_alloc`` (``KVCacheBlocks.get_block_ids()``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class FakeStatus(enum.Enum):
    """The finish states the connector tells apart (``RequestStatus`` names)."""

    FINISHED_STOPPED = 1
    FINISHED_LENGTH_CAPPED = 2
    FINISHED_ABORTED = 3


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    num_computed_tokens: int = 0  # the engine's own prefix-cache hit
    kv_transfer_params: dict[str, Any] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: FakeStatus = FakeStatus.FINISHED_LENGTH_CAPPED

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


class FakeBlocks:
    """The blocks vLLM allocated for a request (one KV-cache group)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int]]:
        return (self.ids,)
