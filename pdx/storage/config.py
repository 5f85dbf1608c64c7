"""Runtime configuration of a ``pdx store`` server (built by the CLI from flags and env)."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1_000_000_000
MB = 1 << 20


@dataclass(frozen=True)
class StoreConfig:
    socket_path: str  # unix socket engines on the node connect to (the hot path)
    capacity_bytes: int  # size of the L1 shared-memory arena
    slab_bytes: int = 64 * MB  # arena is cut into slabs of this size; a chunk must fit in one
    http_host: str = "127.0.0.1"
    http_port: int = 8300  # operator API and /metrics; 0 picks a free port, -1 disables
    l2_url: str | None = None  # file:///path or redis://host:port/db
    l2_queue: int = 256  # write-through items waiting; more are dropped (counted)
    l2_workers: int = 2  # threads writing to L2
    lease_ttl_s: float = 60.0  # a read or write lease not ended by then is ended by the server
    max_budget_s: float = 5.0  # cap on the L2 time one lookup/acquire may spend
    prefault: bool = False  # touch every arena page at start (MAP_POPULATE)
    remote_listen: str | None = None  # HOST:PORT of the control port for other nodes; None = off
    remote_transport: str = "tcp"  # transport the arena is registered on for remote clients
    remote_token: str = ""  # remote clients must present it in their hello
    remote_advertise: str | None = None  # host remote clients dial for data (tcp; default: listen host)
    remote_data_port: int = 0  # tcp data port; 0 = any free port
