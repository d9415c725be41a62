"""A lean Llama-family decoder (llama, mistral, qwen2; SmolLM is llama) over a preallocated rollback KV cache.

Everything but attention is plain PyTorch; attention goes through `ops.attention_with_kv_cache`, or, for
training, through the same computation in differentiable torch ops. On CUDA, the projections of decode-sized
forwards (at most 16 tokens by default) go through `ops.decode_linear` where their weights are small enough.
Weights are frozen; activations keep their autograd graph so that look-ahead embeddings fed in as
`inputs_embeds` can be trained.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import types
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import masks, ops

__all__ = ["ModelConfig", "KVCache", "Model", "SUPPORTED_ARCHS", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Look-ahead tokens sit a few positions past the last cache slot; tables cover this much beyond a cache.
_POSITION_SLACK = 256


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Read a transformers config (v4 style rope_theta/rope_scaling or v5 style rope_parameters)."""
        arch = getattr(hf_config, "model_type", None)
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        heads = hf_config.num_attention_heads
        return cls(
            arch=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only when attention_bias is set.
            attention_bias=arch == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=getattr(hf_config, "eos_token_id", None),
        )


@dataclass
class KVCache:
    """Per-layer K/V for B rows x S_max slots; `lens[b]` counts row b's committed tokens.

    A forward writes its Q new tokens at slots lens[b]..lens[b]+Q-1 without touching `lens`; committing the
    first n of them is `lens += n`, and rolling back the rest is simply not committing them.
    """
    store: torch.Tensor  # [2, layers, B, Hkv, S_max, D]: every layer's K, then every layer's V, in one allocation
    lens: torch.Tensor  # [B] int32 on the model device
    k: list = field(init=False, repr=False)  # per layer [B, Hkv, S_max, D]: views of store[0]
    v: list = field(init=False, repr=False)  # per layer [B, Hkv, S_max, D]: views of store[1]

    def __post_init__(self):
        self.k, self.v = list(self.store[0].unbind(0)), list(self.store[1].unbind(0))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def commit(self, n: Union[torch.Tensor, int]) -> None:
        """lens += n (n: [B] or scalar, any integer dtype); in place, so captured graphs see it."""
        if isinstance(n, torch.Tensor):
            n = n.to(device=self.lens.device, dtype=self.lens.dtype)
        self.lens.add_(n)

    def reset(self) -> None:
        self.lens.zero_()

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """In every layer, copy row b's K/V at slot lens[b] + src[b, j] to slot lens[b] + dst[b, j] (src, dst
        [B, n] int64, within the capacity): a tree step moves its accepted path next to the committed prefix.
        Every slot is read before any is written: one gather and one scatter for all layers."""
        base = self.lens.long()[:, None]
        shape = (*self.store.shape[:4], src.shape[1], self.store.shape[-1])
        view = lambda i: (base + i)[None, None, :, None, :, None].expand(shape)  # noqa: E731
        self.store.scatter_(4, view(dst), self.store.gather(4, view(src)))

    def row(self, b: int) -> "KVCache":
        """A one-row view of row b: writes and `lens` updates through it land in this cache."""
        return KVCache(store=self.store[:, :, b: b + 1], lens=self.lens[b: b + 1])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers (float32 statistics, scale in the input dtype).
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---- the pointwise chains of a layer, fused on CUDA ------------------------------------------------------------
# Eagerly, a layer's norms, rotary embedding, SwiGLU and residual adds launch about 35 small kernels; at decode
# sizes each costs a few µs even inside a CUDA graph, which is most of a small model's step. On CUDA they run
# as kernels generated by torch.compile (one or two per chain) unless PASS_EXT_FUSE=0; on CPU, eagerly.
def _add_norm_chain(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + y
    return x, _rms_norm(x, weight, eps)


def _rope_chain(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _swiglu_chain(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_CHAINS = {"norm": _rms_norm, "add_norm": _add_norm_chain, "rope": _rope_chain, "swiglu": _swiglu_chain}


class _Fused:
    """A chain compiled on first use, one compiled copy per input dtype (or per `key` of the arguments). If
    compiling fails the first time (no Triton, an unsupported GPU), that copy warns once and stays eager; after one
    success, errors propagate, except torch.compile's recompile limit (a process that runs many shapes, dtypes and
    models), after which that copy stays eager too. Inside a CUDA graph capture a call never compiles: arguments
    that miss every compiled graph run eagerly in that capture (warned once).

    Each copy has a code object of its own: torch.compile keeps its compiled graphs, and counts recompiles
    against its limit, per code object, so one dtype's shapes do not use up another's."""

    def __init__(self, name: str, fn: Optional[Callable] = None, switch: str = "PASS_EXT_FUSE",
                 key: Optional[Callable] = None):
        self.name = name
        self.fn = _CHAINS[name] if fn is None else fn   # the eager chain
        self.switch = switch                              # the variable that skips compiling (for the warning)
        self.key = key or (lambda *args: args[0].dtype)   # which compiled copy serves these arguments
        self.copies: dict = {}  # key -> [compiled fn, state: "new" | "ok" | "eager"]
        self.warned_capture = False

    def _copy(self, key):
        entry = self.copies.get(key)
        if entry is None:
            fn = self.fn
            tag = "".join(c if c.isalnum() else "_" for c in str(key).replace("torch.", ""))
            code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
            fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
            entry = self.copies[key] = [torch.compile(fresh, dynamic=True, fullgraph=True), "new"]
        return entry

    def _eager(self, entry, why: Exception, *args):
        warnings.warn(f"pass_ext: the fused {self.name} chain cannot be compiled ({type(why).__name__}: "
                      f"{str(why).splitlines()[0] if str(why) else ''}); running it eagerly ({self.switch}=0 skips "
                      "compiling)", RuntimeWarning)
        entry[1] = "eager"
        return self.fn(*args)

    def __call__(self, *args):
        entry = self._copy(self.key(*args))
        fn, state = entry
        if state == "eager":
            return self.fn(*args)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        try:
            if capturing and state == "ok" and hasattr(torch.compiler, "set_stance"):
                # Compiling inside a CUDA graph capture fails (Inductor runs work on the device while it compiles):
                # should these arguments miss every compiled graph, this call runs eagerly instead.
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = fn(*args)
            else:
                out = fn(*args)
        except _RecompileLimit as e:  # raised before anything ran: the eager chain is safe, even in a capture
            return self._eager(entry, e, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same math, eagerly
            if capturing and "fail_on_recompile" in str(e):   # raised at the guards, before anything ran
                if not self.warned_capture:
                    self.warned_capture = True
                    warnings.warn(f"pass_ext: the fused {self.name} chain would recompile inside a CUDA graph "
                                  "capture; that capture runs it eagerly", RuntimeWarning)
                return self.fn(*args)
            if state == "ok" or capturing:
                raise
            return self._eager(entry, e, *args)
        entry[1] = "ok"
        return out


try:
    from torch._dynamo.exc import FailOnRecompileLimitHit as _RecompileLimit
except ImportError:  # older torch: no such error, nothing to catch
    class _RecompileLimit(Exception):
        pass


_compiled: dict = {}


def fusion_enabled() -> bool:
    """Whether CUDA forwards run the fused (torch.compile'd) pointwise chains: PASS_EXT_FUSE, default on."""
    return os.environ.get("PASS_EXT_FUSE", "1") != "0"


def _dtype_and_width(x: torch.Tensor, *args):
    return x.dtype, x.shape[-1]


def _chain(name: str, fused: bool) -> Callable:
    if not fused:
        return _CHAINS[name]
    fn = _compiled.get(name)
    if fn is None:
        # The norms take a weight, whose shape torch.compile keeps static: one compiled copy per dtype and hidden
        # size, so that the models of one process do not spend one copy's recompile budget between them.
        key = _dtype_and_width if name in ("norm", "add_norm") else None
        fn = _compiled[name] = _Fused(name, key=key)
    return fn


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, with the model's rope scaling applied."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv = inv / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP. q/k/v and gate/up are fused into one matmul each."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        frozen = lambda t: None if t is None else nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.input_norm = frozen(weights["input_norm"])
        self.wqkv = frozen(weights["wqkv"])          # [(Hq + 2 Hkv) D, d]
        self.bqkv = frozen(weights.get("bqkv"))      # [(Hq + 2 Hkv) D] or None
        self.wo = frozen(weights["wo"])              # [d, Hq D]
        self.bo = frozen(weights.get("bo"))
        self.post_norm = frozen(weights["post_norm"])
        self.w_gate_up = frozen(weights["w_gate_up"])  # [2 I, d]
        self.b_gate_up = frozen(weights.get("b_gate_up"))
        self.w_down = frozen(weights["w_down"])      # [d, I]
        self.b_down = frozen(weights.get("b_down"))


class Model(nn.Module):
    """The decoder. Build it with `pass_ext.load_model`; weights are frozen, activations differentiable.

    `lookahead` (None or LookaheadEmbeddings) is a submodule, so it moves with the model."""

    def __init__(self, config: ModelConfig, weights: dict[str, Any], name: Optional[str] = None,
                 tokenizer: Any = None, tokenizer_loader: Optional[Callable[[], Any]] = None):
        """weights: 'embed_tokens' [V, d], 'norm' [d], 'lm_head' [V, d] (absent when tied) and 'layers', a
        list of per-layer dicts as DecoderLayer takes them. Tensors are used as given (no copy)."""
        super().__init__()
        self.config = config
        self.name = name
        self.lookahead = None
        self._tokenizer = tokenizer
        self._tokenizer_loader = tokenizer_loader
        self.embed_tokens = nn.Parameter(weights["embed_tokens"], requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, w) for w in weights["layers"])
        self.norm = nn.Parameter(weights["norm"], requires_grad=False)
        lm_head = None if config.tie_word_embeddings else weights.get("lm_head")
        if not config.tie_word_embeddings and lm_head is None:
            raise ValueError("untied model without an lm_head weight")
        self.lm_head = None if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        self._rope_cos: Optional[torch.Tensor] = None  # [P, D] float32, built lazily
        self._rope_sin: Optional[torch.Tensor] = None
        self._linear_plans: dict = {}  # (size limits, one row) -> which projections use decode_linear, lazily
        self.fingerprint = self._compute_fingerprint()

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._tokenizer_loader is not None:
            loader, self._tokenizer_loader = self._tokenizer_loader, None
            self._tokenizer = loader()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer, self._tokenizer_loader = value, None

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() move the weights; rebuild the rope tables on the new device on next use.
        self._rope_cos = self._rope_sin = None
        self._linear_plans = {}
        return super()._apply(fn, recurse)

    # ---- cache and positions ----------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """Zeroed K/V for `batch_size` rows of `max_length` slots each, in the model dtype and device."""
        if int(batch_size) <= 0 or int(max_length) <= 0:
            raise ValueError(f"new_cache needs batch_size > 0 and max_length > 0, got {batch_size}, {max_length}")
        c = self.config
        shape = (2, c.num_layers, int(batch_size), c.num_kv_heads, int(max_length), c.head_dim)
        store = torch.zeros(shape, dtype=self.dtype, device=self.device)  # one allocation: see KVCache.move
        self.ensure_positions(int(max_length) + _POSITION_SLACK)
        return KVCache(store=store, lens=torch.zeros(int(batch_size), dtype=torch.int32, device=self.device))

    def ensure_positions(self, n: int) -> None:
        """Make the rope tables cover positions 0..n-1 (at least max_position_embeddings). Not graph-safe:
        call it before capturing (new_cache does)."""
        n = max(int(n), self.config.max_position_embeddings)
        if self._rope_cos is not None and self._rope_cos.shape[0] >= n:
            return
        # Same float32 arithmetic as transformers: freqs = pos * inv_freq, then cos/sin of [freqs, freqs].
        inv_freq = rope_inv_freq(self.config).to(self.device)  # not a buffer: .to(dtype) must not round it
        freqs = torch.outer(torch.arange(n, device=self.device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._rope_cos, self._rope_sin = emb.cos(), emb.sin()

    # ---- forward ----------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, Q] token ids -> [B, Q, d] embeddings in the model dtype."""
        return F.embedding(input_ids, self.embed_tokens)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection [V, d]: lm_head, or the input embeddings when they are tied."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def lm_head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] final-norm hidden states -> [..., V] float32 logits."""
        weight = self.head_weight
        if self._linear_ops(hidden).get("lm_head"):
            return ops.decode_linear(hidden, weight, prefetch_weights=ops.prefetch_allowed()).float()
        return F.linear(hidden, weight).float()

    def _linear_ops(self, x: torch.Tensor) -> dict:
        """Which projections of this forward (x [..., d], or the final hidden states) run as `decode_linear`:
        {'qkv' | 'o' | 'gate_up' | 'down' | 'lm_head': bool}, empty for none. On CUDA without autograd, for at
        most `ops.linear_max_rows()` rows, the projections whose weights fit the kernel in every layer and pay
        (`ops.decode_linear_pays`: the size limits, a larger one for one-row forwards; checked once per device,
        dtype, limits and one row or more)."""
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cuda" or torch.is_grad_enabled() or rows > ops.linear_max_rows():
            return {}
        one = rows == 1
        key = (ops.linear_max_bytes(), ops.linear_one_row_max_bytes(), one)
        if key not in self._linear_plans:
            kinds = {"lm_head": [self.head_weight],
                     "qkv": [layer.wqkv for layer in self.layers], "o": [layer.wo for layer in self.layers],
                     "gate_up": [layer.w_gate_up for layer in self.layers],
                     "down": [layer.w_down for layer in self.layers]}
            probe = x.new_empty(1, 8)
            self._linear_plans[key] = {kind: bool(ws) and ops.decode_linear_applies(probe, *ws)
                                       and all(ops.decode_linear_pays(w, one) for w in ws)
                                       for kind, ws in kinds.items()}
        return self._linear_plans[key]

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, cache: KVCache,
                tree_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                return_hidden: bool = False, attention: str = "op") -> torch.Tensor:
        """Run Q new tokens per row after each row's committed cache.

        Args:
            input_ids: [B, Q] int64, or None when inputs_embeds is given.
            positions: [B, Q] int64 rope positions (explicit: look-ahead groups reuse positions).
            cache: written at slots cache.lens[b]..cache.lens[b]+Q-1 of every layer; cache.lens is not changed.
            tree_mask: None (causal), bit-packed int64 [Q, ceil(Q/64)] (see pass_ext.masks) or bool [Q, Q].
            inputs_embeds: [B, Q, d] instead of input_ids (cast to the model dtype).
            return_hidden: return the final-norm hidden states [B, Q, d] instead of logits.
            attention: 'op' (the native kernel, no autograd) or 'torch' (differentiable SDPA, same result).
        Returns:
            logits [B, Q, V] float32, or hidden [B, Q, d] in the model dtype.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention not in ("op", "torch"):
            raise ValueError(f"attention must be 'op' or 'torch', got {attention!r}")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)  # [B, Q, d]
        B, Q, _ = x.shape
        if cache.batch_size != B:
            raise ValueError(f"cache has {cache.batch_size} rows but the input has {B}")
        if tree_mask is not None and tree_mask.dtype == torch.bool:
            tree_mask = masks.pack(tree_mask)
        if tree_mask is not None:
            tree_mask = tree_mask.to(self.device)
        if x.device.type == "cpu" or attention == "torch":
            # The kernel refuses too, but only per layer; checking here keeps every layer untouched.
            # (Skipped on CUDA for the op path: it would sync, and the kernel never writes past S_max.)
            over = cache.lens.long() + Q > cache.capacity
            if bool(over.any()):
                raise RuntimeError(f"{Q} new tokens after cache lens {cache.lens.tolist()} exceed the cache "
                                   f"capacity {cache.capacity} (nothing was written)")
        self.ensure_positions(0)
        c = self.config
        Hq, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        # Decode-sized forwards project through decode_linear where it pays, with SwiGLU fused into gate/up and
        # the rotary embedding into qkv (heads of a multiple of 16 channels).
        use = self._linear_ops(x)
        rope_in_qkv = bool(use.get("qkv")) and D % 16 == 0
        if rope_in_qkv:
            flat_positions = positions.reshape(-1).to(torch.long)
        else:
            cos = self._rope_cos[positions].to(self.dtype).unsqueeze(2)  # [B, Q, 1, D]
            sin = self._rope_sin[positions].to(self.dtype).unsqueeze(2)
        torch_mask = self._torch_mask(cache, Q, tree_mask) if attention == "torch" else None

        eps = c.rms_norm_eps
        # Fused chains only where autograd is off (training differentiates through the eager ones).
        fused = x.device.type == "cuda" and not torch.is_grad_enabled() and fusion_enabled()
        norm, add_norm, rope, swiglu = (_chain(n, fused) for n in ("norm", "add_norm", "rope", "swiglu"))
        # The forward never writes a weight, so each projection may stream its weights in while the kernel
        # before it finishes (sm_90); likewise the attention its cached keys (PASS_EXT_PREFETCH=0: neither).
        prefetch = ops.prefetch_allowed()
        linear = functools.partial(ops.decode_linear, prefetch_weights=prefetch)
        qkv_linear, o_linear, down_linear = (linear if use.get(n) else F.linear for n in ("qkv", "o", "down"))
        # When every projection of a layer runs as decode_linear, the norms and residual adds go into them too
        # (RMSNorm before qkv and gate/up, the residual add after o and down): five kernels per layer
        # (PASS_EXT_LINEAR_NORM=0: seven, with the add+norm chains).
        ends = rope_in_qkv and all(use.get(n) for n in ("o", "gate_up", "down")) and ops.linear_fuses_norm()
        h = None if ends else norm(x, self.layers[0].input_norm if len(self.layers) else self.norm, eps)
        for i, layer in enumerate(self.layers):
            if rope_in_qkv:
                # With the prefetch the kernel reads positions before its wait, so the kernel right before it
                # must not write them: in layer 0 that may be the one that made them (or flat_positions).
                qkv = linear(h if h is not None else x, layer.wqkv, layer.bqkv, rope_cos=self._rope_cos,
                             rope_sin=self._rope_sin, positions=flat_positions, rope_rows=(Hq + Hkv) * D,
                             norm_weight=None if h is not None else layer.input_norm, eps=eps,
                             prefetch_weights=prefetch and i > 0)
                q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
                q, k = q.view(B, Q, Hq, D), k.view(B, Q, Hkv, D)
            else:
                qkv = qkv_linear(h, layer.wqkv, layer.bqkv)  # [B, Q, (Hq + 2 Hkv) D]
                q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
                q, k = rope(q.view(B, Q, Hq, D), k.view(B, Q, Hkv, D), cos, sin)
            v = v.view(B, Q, Hkv, D)
            if attention == "op":
                # The kernel before (the qkv projection or the rotary chain) writes neither cache nor lens.
                a = ops.attention_with_kv_cache(q, k, v, cache.k[i], cache.v[i], cache.lens, tree_mask,
                                                prefetch_cache=prefetch)  # [B, Q, Hq, D]
            else:
                a = self._torch_attention(q, k, v, cache.k[i], cache.v[i], cache.lens, torch_mask)
            a = a.reshape(B, Q, Hq * D)
            if ends:
                x = linear(a, layer.wo, layer.bo, residual=x)
                act = linear(x, layer.w_gate_up, layer.b_gate_up, swiglu=True, norm_weight=layer.post_norm, eps=eps)
                x = linear(act, layer.w_down, layer.b_down, residual=x)
                continue
            x, h = add_norm(x, o_linear(a, layer.wo, layer.bo), layer.post_norm, eps)
            if use.get("gate_up"):
                act = linear(h, layer.w_gate_up, layer.b_gate_up, swiglu=True)
            else:
                act = swiglu(F.linear(h, layer.w_gate_up, layer.b_gate_up))
            y = down_linear(act, layer.w_down, layer.b_down)
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            x, h = add_norm(x, y, nxt, eps)  # the residual, and the next layer's (or the final) norm of it
        if ends:
            h = norm(x, self.norm, eps)
        return h if return_hidden else self.lm_head_logits(h)

    def _torch_mask(self, cache: KVCache, Q: int, tree_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """bool [B, 1, Q, S_max + Q]: committed slots of the row, then the new tokens the tree mask allows."""
        S = cache.capacity
        committed = torch.arange(S, device=self.device)[None, :] < cache.lens[:, None].long()  # [B, S]
        new = (masks.unpack(tree_mask, Q) if tree_mask is not None
               else torch.ones(Q, Q, dtype=torch.bool, device=self.device).tril())  # [Q, Q]
        B = cache.batch_size
        return torch.cat([committed[:, None, :].expand(B, Q, S), new[None].expand(B, Q, Q)], dim=-1)[:, None]

    @staticmethod
    def _torch_attention(q, k, v, k_cache, v_cache, lens, mask):
        """Differentiable twin of the op: q [B,Q,Hq,D], k/v [B,Q,Hkv,D] -> [B,Q,Hq,D]; writes k/v to the cache."""
        B, Q = q.shape[:2]
        slots = lens.long()[:, None] + torch.arange(Q, device=q.device)[None, :]  # [B, Q]
        rows = torch.arange(B, device=q.device)[:, None].expand(B, Q)
        # The cache holds values, not graph nodes: gradients flow through the new tokens' k/v directly.
        k_cache.transpose(1, 2)[rows, slots] = k.detach().to(k_cache.dtype)
        v_cache.transpose(1, 2)[rows, slots] = v.detach().to(v_cache.dtype)
        keys = torch.cat([k_cache, k.transpose(1, 2)], dim=2)  # [B, Hkv, S + Q, D]
        values = torch.cat([v_cache, v.transpose(1, 2)], dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)  # [B, Q, Hq, D]

    # ---- identity ---------------------------------------------------------------------------------------------
    def _compute_fingerprint(self) -> str:
        """First 16 hex of a sha256 over the config and strided samples of a few weights, rounded to bf16 so
        that float32 and bfloat16 loads of the same weights (from any source) agree."""
        h = hashlib.sha256()
        c = self.config
        for f in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "tie_word_embeddings"):
            h.update(f"{f}={getattr(c, f)};".encode())
        for f in ("rms_norm_eps", "rope_theta"):
            h.update(f"{f}={getattr(c, f):.6g};".encode())
        first, last = self.layers[0], self.layers[-1]
        tensors = [self.embed_tokens, first.wqkv, first.w_gate_up, last.wqkv, last.w_down, self.norm]
        if self.lm_head is not None:
            tensors.append(self.lm_head)
        for t in tensors:
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 65536)]
            h.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        c = self.config
        return (f"arch={c.arch}, layers={c.num_layers}, d={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}, "
                f"vocab={c.vocab_size}, dtype={self.dtype}, fingerprint={self.fingerprint}")
