"""What the scheduler side asks of the worker side, per request: engine-agnostic specs.

An engine adapter's scheduler side emits these each step (vLLM: inside
``PdxConnectorMetadata``); the worker side hands them to the prefill, decode and store sides.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdx.connector.protocol import PeerAddress


@dataclass(frozen=True)
class SaveSpec:
    """P: this step computes prompt tokens [start, end) of a request whose KV goes to a decoder."""

    req_id: str
    transfer_id: str
    block_ids: tuple[int, ...]  # P's blocks of the request so far
    start: int  # 0 on the request's first step, so a local prefix hit is sent too
    end: int
    num_tokens: int  # prompt tokens


@dataclass(frozen=True)
class RecvSpec:
    """D: blocks reserved for a transfer; publish them to P and count what lands."""

    req_id: str
    transfer_id: str
    peer: PeerAddress  # P's connector control address
    block_ids: tuple[int, ...]  # D's blocks for the whole prompt
    first_block: int  # D's local prefix hit, in blocks
    num_tokens: int


@dataclass(frozen=True)
class FinishSpec:
    """P: the request finished. If ``is_held``, its blocks are held until the worker reports
    it in ``finished_sending``; otherwise nothing was computed and the transfer is just closed."""

    req_id: str
    transfer_id: str
    is_aborted: bool
    is_held: bool = True


@dataclass(frozen=True)
class ReleaseSpec:
    """D: the request ended before its KV landed; tell P to stop (and wait for it)."""

    req_id: str
    transfer_id: str
    peer: PeerAddress
    is_reserved: bool  # a RecvSpec was issued, so the worker must report finished_recving


@dataclass(frozen=True)
class StoreLoadSpec:
    """Store -> paged blocks: chunk i of ``keys`` fills ``block_ids[first_block + i*bpc ...]``
    (bpc = chunk_size // block_size); blocks before ``skip_blocks`` are the engine's own hit."""

    req_id: str
    keys: tuple[bytes, ...]  # chunk digests, in prompt order
    block_ids: tuple[int, ...]  # the request's blocks
    first_block: int
    skip_blocks: int


@dataclass(frozen=True)
class StoreSaveSpec:
    """Paged blocks -> store: chunk i of ``keys`` is ``block_ids[i*bpc:(i+1)*bpc]`` (blocks of a
    finished request, copied at the start of the next step)."""

    req_id: str
    keys: tuple[bytes, ...]
    block_ids: tuple[int, ...]
