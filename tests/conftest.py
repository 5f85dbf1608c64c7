"""Suite-wide settings: loopback-only UCX, offline model hubs."""

from __future__ import annotations

import os

# Keep NIXL/UCX traffic on loopback and model hubs offline for every test and child process.
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("UCX_LOG_LEVEL", "error")
