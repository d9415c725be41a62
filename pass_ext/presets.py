"""Random-weight decoders in the shapes of well-known models (Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-14B, ...),
built directly on the target device, for measuring step cost at sizes whose real weights are not at hand.

A forward's cost depends on the shapes, not on the values, so random weights time like real ones; their
outputs are meaningless (look-ahead drafts from them say nothing about acceptance).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import torch

from .model import Model, ModelConfig

__all__ = ["PRESETS", "preset_config", "random_model"]

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# ModelConfig fields of each shape, as in the published config.json files.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
                         tie_word_embeddings=True, attention_bias=False, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
                         tie_word_embeddings=False, attention_bias=False, bos_token_id=128000, eos_token_id=128001),
    "llama-2-13b": dict(arch="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                        num_heads=40, num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                        rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False,
                        attention_bias=False, bos_token_id=1, eos_token_id=2),
    # SmolLM2-135M's shape under another name than the real model's (its step cost without its weights).
    "smollm2-135m-random": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=100000.0, rope_scaling=None, max_position_embeddings=8192,
                                tie_word_embeddings=True, attention_bias=False, bos_token_id=1, eos_token_id=2),
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=True,
                         attention_bias=True, bos_token_id=None, eos_token_id=151643),
    "qwen2.5-1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=True,
                         attention_bias=True, bos_token_id=None, eos_token_id=151643),
    "qwen2.5-14b": dict(arch="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
                        num_heads=40, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                        rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=False,
                        attention_bias=True, bos_token_id=None, eos_token_id=151643),
}


def preset_config(config: Union[str, Mapping[str, Any], ModelConfig], **overrides) -> ModelConfig:
    """A ModelConfig from a preset name, a dict of ModelConfig fields or a ModelConfig, with `overrides`
    (ModelConfig field names) applied on top, e.g. preset_config("llama-3.1-8b", num_layers=2)."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; presets: {', '.join(sorted(PRESETS))}")
        fields = dict(PRESETS[config])
    elif isinstance(config, ModelConfig):
        fields = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        fields = dict(config)
    else:
        raise TypeError(f"config must be a preset name, a dict of ModelConfig fields or a ModelConfig, "
                        f"got {type(config).__name__}")
    fields.update(overrides)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"not ModelConfig fields: {', '.join(unknown)}")
    return ModelConfig(**fields)


def random_model(config: Union[str, Mapping[str, Any], ModelConfig], device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.02,
                 name: Optional[str] = None, **overrides) -> Model:
    """A Model with normal(0, std) weights (norms at 1, biases at 0) in the shape of `config`.

    Args:
        config: a preset name (see PRESETS), a dict of ModelConfig fields or a ModelConfig.
        device, dtype: where the weights are made (drawn there directly: no host copy of a 14B model).
        seed: seeds a generator on `device`; the same seed gives the same weights on the same device.
        std: weight standard deviation (0.02 is the usual initialiser range).
        name: the model's name (default: the preset name).
        overrides: ModelConfig fields replacing the preset's, e.g. num_layers=2 for a small test model.
    """
    cfg = preset_config(config, **overrides)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    d, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * D
    layers = []
    for _ in range(cfg.num_layers):
        layers.append({
            "input_norm": ones(d),
            "wqkv": normal(qkv, d),                                   # [(Hq + 2 Hkv) D, d]
            "bqkv": torch.zeros(qkv, device=device, dtype=dtype) if cfg.attention_bias else None,
            "wo": normal(d, cfg.num_heads * D),                        # [d, Hq D]
            "post_norm": ones(d),
            "w_gate_up": normal(2 * I, d),                             # [2 I, d]
            "w_down": normal(d, I),                                    # [d, I]
        })
    weights = {"embed_tokens": normal(cfg.vocab_size, d), "norm": ones(d), "layers": layers,
               "lm_head": None if cfg.tie_word_embeddings else normal(cfg.vocab_size, d)}
    if name is None and isinstance(config, str):
        name = config
    return Model(cfg, weights, name=name)
