"""pass_ext: PaSS (Parallel Speculative Sampling) with custom kernels — lossless multi-token decoding
from one model and k learned look-ahead embeddings."""
from . import masks, ops
from .ops import build_info

__all__ = ["ops", "masks", "build_info"]
__version__ = "0.1.0"
