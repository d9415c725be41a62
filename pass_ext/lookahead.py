"""Look-ahead embeddings: the k × d_model learned input vectors that make one model draft k tokens at once
(PaSS). Module, save/load as safetensors with a fingerprint of the model they belong to."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "pass_ext.lookahead/1"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class LookaheadEmbeddings(torch.nn.Module):
    """`weight` [k, d_model] float32: LA_1..LA_k, placed after the newest real token as input vectors.

    The output at LA_i is a draft distribution for the token i positions after the model's next token.
    `fingerprint` names the model they were trained for; `meta` holds free-form training facts.
    """

    def __init__(self, weight: torch.Tensor, fingerprint: str, meta: Optional[dict] = None):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] < 1:
            raise ValueError(f"look-ahead weight must be [k >= 1, d_model], got shape {tuple(weight.shape)}")
        self.weight = torch.nn.Parameter(weight.detach().to(torch.float32).clone())
        self.fingerprint = fingerprint
        self.meta = dict(meta or {})

    @property
    def k(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def init(cls, model, k: int, seed: int = 0) -> "LookaheadEmbeddings":
        """Untrained embeddings for `model`: the mean token embedding plus small noise (a neutral start
        for training; drafts from these are poor but verification keeps the output exact)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        with torch.no_grad():
            V, dev = model.config.vocab_size, model.device
            chunks = [model.embed(torch.arange(s, min(s + 8192, V), device=dev)[None])[0].float()
                      for s in range(0, V, 8192)]
            mean = torch.stack([c.sum(0) for c in chunks]).sum(0) / V
            std = torch.sqrt(torch.stack([((c - mean) ** 2).sum() for c in chunks]).sum() / (V * mean.numel()))
            gen = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.randn(k, mean.numel(), generator=gen) * std.item() * 0.1
            weight = mean.cpu().unsqueeze(0) + noise
        return cls(weight, model.fingerprint, {"init": "mean+noise", "seed": seed})

    def check_model(self, model) -> None:
        """Raise if these embeddings were made for another model."""
        if self.fingerprint != model.fingerprint:
            raise ValueError(
                f"look-ahead embeddings were trained for the model with fingerprint {self.fingerprint}, "
                f"but this model's fingerprint is {model.fingerprint}; train embeddings for it with "
                "`python -m pass_ext train` or pass_ext.train_lookahead()")
        if self.d_model != model.config.hidden_size:
            raise ValueError(f"look-ahead embeddings have d_model={self.d_model}, the model has "
                             f"hidden_size={model.config.hidden_size}")

    def save(self, path: str) -> None:
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "k": str(self.k),
                "d_model": str(self.d_model), "meta": json.dumps(self.meta)}
        save_file({"lookahead": self.weight.detach().cpu().contiguous()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str, model=None) -> "LookaheadEmbeddings":
        """Load from a safetensors file; with `model`, refuse embeddings made for another model."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike naming a .safetensors file, got {type(path).__name__}")
        if model is not None and not hasattr(model, "fingerprint"):
            raise TypeError(f"model must be a pass_ext.Model (or None), got {type(model).__name__}")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"look-ahead file not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                weight = f.get_tensor("lookahead")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path} is not a pass_ext look-ahead file: {e}") from e
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a pass_ext look-ahead file (format={meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        if not meta.get("fingerprint"):
            raise ValueError(f"{path} is a damaged look-ahead file: its metadata has no model fingerprint")
        try:
            extra = json.loads(meta.get("meta", "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is a damaged look-ahead file: its 'meta' entry is not JSON ({e})") from e
        if not weight.is_floating_point() or not torch.isfinite(weight).all():
            # NaN drafts would be rejected every step: slower than no look-ahead at all, with no error
            raise ValueError(f"{path} holds look-ahead weights that are not finite floating-point numbers")
        la = cls(weight, meta["fingerprint"], extra)
        if model is not None:
            la.check_model(model)
        return la


def shipped_path(fingerprint: str) -> Optional[str]:
    """The look-ahead file shipped inside the package for the model with this fingerprint, if any."""
    path = os.path.join(SHIPPED_DIR, f"{fingerprint}.safetensors")
    return path if os.path.isfile(path) else None
