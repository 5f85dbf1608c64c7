"""The engine-agnostic connector core: control channel, send and receive books, prefill,
decode and store sides. Engine adapters (``pdx.engines.vllm``) drive it."""
