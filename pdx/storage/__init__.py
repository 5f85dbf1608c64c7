"""The shared storage tier: KV chunks keyed by chunk key, shared by every engine on a node.

    config.py     ``StoreConfig`` (frozen) and the pydantic options it is validated from
    cli.py        ``pdx store``: flags, env overrides, run until SIGTERM
    server.py     the store server: connections, ops, leases
    tier.py       write-through to L2 and promotion from it (thread pools, bounded queue)
    http_api.py   operator HTTP API and /metrics
    messages.py   typed requests and replies, validated on receipt (pydantic)
    protocol.py   frames (length-prefixed JSON) and the serving loop of both doors
    arena.py      the L1 POSIX shared-memory arena
    allocator.py  slab allocator over the arena
    index.py      chunk key -> slot, LRU eviction, pins, read leases
    client.py     ``StoreClient``, used inside engine processes; ``create_client(address)``
    channel.py    one client connection (timeouts, reconnect back-off)
    remote_server.py  the door for other nodes: arena on a transport, TCP control port
    remote_client.py  ``RemoteStoreClient``: the client API over a transport
    remote_channel.py one control connection to a remote store
    buffers.py    keys and chunk buffers as the client handles them
    l2/           L2 adapters behind one interface (``create_l2(url)``)
    metrics.py    counters and their Prometheus rendering
    bench.py      L1 save/load GB/s against memcpy

See docs/storage.md.
"""
