"""pass_ext: PaSS (Parallel Speculative Sampling) with custom kernels — lossless multi-token decoding
from one model and k learned look-ahead embeddings."""
from . import masks, ops
from .generate import GenerateOutput, GenerateStats, generate, release_workspace
from .loading import load_model
from .lookahead import LookaheadEmbeddings
from .model import KVCache, Model, ModelConfig
from .ops import build_info


def load_lookahead(model: Model, path: str) -> LookaheadEmbeddings:
    """Load look-ahead embeddings from a safetensors file onto `model` (refused if made for another model)."""
    la = LookaheadEmbeddings.load(path, model).to(model.device)
    model.lookahead = la
    return la


def train_lookahead(model, data, **kwargs) -> LookaheadEmbeddings:
    """Train look-ahead embeddings for a frozen model; see pass_ext.train.train_lookahead."""
    from .train import train_lookahead as _train
    return _train(model, data, **kwargs)


__all__ = ["ops", "masks", "build_info", "load_model", "Model", "KVCache", "ModelConfig", "generate",
           "GenerateOutput", "GenerateStats", "LookaheadEmbeddings", "load_lookahead", "train_lookahead",
           "release_workspace"]
__version__ = "0.1.0"
