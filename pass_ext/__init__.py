"""pass_ext: PaSS (Parallel Speculative Sampling) with custom kernels — lossless multi-token decoding
from one model and k learned look-ahead embeddings."""
from . import masks, ops
from .ops import build_info
from .model import KVCache, Model, ModelConfig
from .loading import load_model

__all__ = ["ops", "masks", "build_info", "load_model", "Model", "KVCache", "ModelConfig"]
__version__ = "0.1.0"
