"""Random-weight presets: the shapes are the published models' (parameter counts), the weights are what Model
takes (tied/untied, biases), and a shrunk preset runs every method."""
import pytest
import torch

import pass_ext
from pass_ext.presets import PRESETS, preset_config, random_model

# Parameter counts of the published checkpoints.
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "llama-2-13b": 13_015_864_320,
             "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304,
             "qwen2.5-14b": 14_770_033_664, "smollm2-135m-random": 134_515_008}
SMALL = dict(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16,
             vocab_size=300, max_position_embeddings=512)


def count(cfg) -> int:
    """Parameters of a config without building it: norms, fused q/k/v (+ bias), o, gate/up/down, embeddings."""
    d, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * D
    layer = 2 * d + qkv * d + (qkv if cfg.attention_bias else 0) + d * cfg.num_heads * D + 3 * I * d
    return cfg.num_layers * layer + d + cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_match_published_parameter_counts(name):
    assert count(preset_config(name)) == PUBLISHED[name]


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-0.5b"])
def test_random_model_weights_and_generation(name):
    model = random_model(name, "cpu", torch.float32, seed=3, **SMALL)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    assert params == count(cfg)
    assert (model.lm_head is None) == cfg.tie_word_embeddings
    assert (model.layers[0].bqkv is not None) == cfg.attention_bias
    assert model.layers[0].wqkv.shape == ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size)
    assert model.name == name
    std = model.layers[0].w_gate_up.std().item()
    assert 0.015 < std < 0.025
    same = random_model(name, "cpu", torch.float32, seed=3, **SMALL)
    other = random_model(name, "cpu", torch.float32, seed=4, **SMALL)
    assert same.fingerprint == model.fingerprint != other.fingerprint
    out = pass_ext.generate(model, [[1, 2, 3], [4, 5]], method="ar", max_new_tokens=5, eos_token_id=False)
    assert out.num_new_tokens.tolist() == [5, 5]


def test_preset_config_inputs_and_errors():
    base = preset_config("llama-3.2-1b", num_layers=3)
    assert base.num_layers == 3 and base.rope_scaling["rope_type"] == "llama3"
    assert preset_config(base) == base
    assert preset_config(dict(PRESETS["qwen2.5-14b"]), vocab_size=7).vocab_size == 7
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("gpt-5")
    with pytest.raises(ValueError, match="not ModelConfig fields"):
        preset_config("llama-3.2-1b", layers=2)
    with pytest.raises(TypeError):
        preset_config(42)
