"""pdx: prefill-decode disaggregation transport framework for LLM serving.

``import pdx`` stays light: torch, vllm, nixl, ucxx, redis are imported where used.
"""

from __future__ import annotations

__version__ = "0.1.0"
