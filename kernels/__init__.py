"""Paged-KV gather/scatter kernels: a torch reference (ground truth, CPU path) and Triton (GPU).

Importing this package imports neither torch nor triton.
"""

from __future__ import annotations
