"""Typed wrappers over torch.ops.pass_ext.* and their fake (meta) kernels.

Every op writes into caller-provided buffers (static buffers are what CUDA graphs need); the wrappers
allocate them when they are not given and return them.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the native library, which registers torch.ops.pass_ext.*)

__all__ = ["attention_with_kv_cache", "speculative_verify", "sample", "decode_linear", "decode_linear_applies",
           "decode_linear_pays", "linear_max_rows", "linear_max_bytes", "linear_one_row_max_bytes", "linear_fuses_norm",
           "prefetch_allowed", "build_info", "has_cuda_kernels", "attention_uses_tensor_cores", "guarded_graph"]


CUDA_MAX_Q = 128  # new tokens per row one CUDA attention_with_kv_cache call takes (kMaxQ in the launcher)
LINEAR_MAX_ROWS = 32  # rows of x one CUDA decode_linear call takes (kLinearMaxRows in the kernel)


def build_info() -> str:
    """"cpu" or "cpu+cuda": which kernels the native library was built with."""
    return torch.ops.pass_ext.build_info()


def has_cuda_kernels() -> bool:
    return build_info() == "cpu+cuda"


def guarded_graph(body: "torch.cuda.CUDAGraph", done: torch.Tensor, bodies: torch.Tensor):
    """A launchable graph that runs `body` (captured with keep_graph=True, never replayed itself) under a CUDA
    graph IF node on "some row of done [B] bool is False", checked on the device at each `launch()` (on the
    current stream); bodies (int64, one element) counts the bodies that ran. `body` must outlive the result: its
    kernels use its memory pool. Needs this build's CUDA kernels (RuntimeError otherwise, and where the driver
    cannot put the body under an IF node)."""
    if not has_cuda_kernels():
        raise RuntimeError("guarded_graph needs pass_ext built with its CUDA kernels (build_info() is "
                           f"{build_info()!r})")
    return torch.classes.pass_ext.GuardedGraph(body.raw_cuda_graph(), done, bodies)


def attention_uses_tensor_cores(dtype: torch.dtype, Q: int, Hq: int, Hkv: int, D: int) -> bool:
    """Whether a CUDA call of attention_with_kv_cache with these shapes runs the tensor-core kernel (the
    launcher's rule, for tests and benchmarks): fp16/bf16, D in {64, 128}, and Q * Hq / Hkv packed query rows
    per KV head >= PASS_EXT_ATTENTION_TC_MIN_ROWS (default 4), unless PASS_EXT_ATTENTION_TC=0. The GPU must
    run sm_80+ code (any H100/H200/A100 build)."""
    if os.environ.get("PASS_EXT_ATTENTION_TC") == "0":
        return False
    min_rows = int(os.environ.get("PASS_EXT_ATTENTION_TC_MIN_ROWS") or 4)
    return dtype in (torch.float16, torch.bfloat16) and D in (64, 128) and Q * (Hq // Hkv) >= min_rows


def attention_with_kv_cache(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    prefetch_cache: bool = False,
) -> torch.Tensor:
    """Append Q new tokens' K/V to the cache and attend to the cached prefix plus the visible new tokens.

    Args:
        q: [B, Q, Hq, D] (all >= 1) queries of the new tokens (float32/float64 on CPU; float32/bf16/fp16 on CUDA).
        k_new, v_new: [B, Q, Hkv, D] keys/values of the new tokens, Hq a multiple of Hkv (GQA); any strides
            (views of a fused [B, Q, (Hq + 2 Hkv) D] projection are read in place on CUDA).
        k_cache, v_cache: [B, Hkv, S_max, D], **mutated**: new token j of row b is written at slot
            cache_lens[b] + j. Slots at or past S_max are never written (CPU raises when a row would
            overflow; CUDA cannot raise without a host sync, so it skips those slots and clamps reads).
        cache_lens: [B] int32, committed tokens per row (ragged). Not changed: commit/rollback is the
            caller's `cache_lens += n`.
        tree_mask: bit-packed int64 [Q, ceil(Q/64)] (see `pass_ext.masks`); None means causal.
        scale: softmax scale (finite), default 1/sqrt(D).
        out: optional [B, Q, Hq, D] output buffer, **mutated**.
        prefetch_cache: on sm_90 GPUs the CUDA kernels may start before the kernel before them on the stream
            has finished (programmatic dependent launch; PASS_EXT_PDL=0 turns that off). With True they read
            cache_lens and start fetching cached keys before waiting for that kernel, which therefore must not
            write k_cache, v_cache or cache_lens (a model's forward never does: the op appends itself); with
            False they read nothing before the wait.
    Returns:
        out [B, Q, Hq, D].

    CUDA limits: Q <= 128, D a multiple of 8 up to 256 (64 and 128 are tuned), 16-byte aligned tensors.
    fp16/bf16 calls with D 64/128 and Q * Hq / Hkv >= 16 run on tensor cores (`attention_uses_tensor_cores`);
    PASS_EXT_ATTENTION_TC=0 in the environment keeps every call on the CUDA-core kernel.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q's layout
    # Read-only inputs are made contiguous here (a no-op when they are); the caches and out are written in
    # place, so they must be contiguous already and the op says so otherwise. q, k_new and v_new go as they
    # are: the CUDA kernels read the q, k and v slices of a fused qkv projection in place, and the op copies
    # any other layout itself.
    torch.ops.pass_ext.attention_with_kv_cache(
        q, k_new, v_new, k_cache, v_cache, cache_lens.contiguous(),
        None if tree_mask is None else tree_mask.contiguous(), float(scale), out, bool(prefetch_cache))
    return out


def speculative_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    out_tokens: Optional[torch.Tensor] = None,
    accepted: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify k drafts per row with the speculative-sampling rule (greedy rows: temperature 0).

    Per row b, for i = 0..k-1, with p_i the warped target distribution at position i (see `sample`):
    a greedy row accepts d_i while d_i == argmax(target_logits[b, i]) and otherwise emits that argmax; a
    sampling row accepts d_i with probability min(1, p_i(d_i) / q_i(d_i)) (U * q < p, U uniform in (0, 1)) and
    otherwise emits a draw from norm(max(0, p_i - q_i)) (from p_i when that is all zero). After k acceptances
    the bonus token is argmax / a draw of p_k. The emitted tokens are distributed exactly as sampling from
    the warped target. Draft ids outside [0, V) are rejected; greedy rows ignore draft_probs.

    Args:
        target_logits: [B, k+1, V] float32/bf16/fp16 (B >= 1, k <= 255), the target's logits after the newest
            committed token and after each draft.
        draft_tokens: [B, k] int64.
        draft_probs: [B, k, V] float32, the warped draft distributions the drafts were sampled from,
            or None: q_i is one-hot at d_i (greedy or otherwise deterministic drafting). Not validated (that
            would cost a pass over B*k*V values): NaN entries reject, negative ones accept, and the output
            keeps its structure (valid tokens, -1 after the stop) whatever they hold.
        temperature: [B] float32 (0 = greedy), top_k: [B] int32 (0 = off), top_p: [B] float32 in (0, 1].
        seed, offset: one-element int64 tensors on the logits' device, read on the device (graph-safe) and
            never changed. Acceptance and residual draws use RNG streams of their own, so verify may share
            its offset with the `sample` call that made the drafts; advance the offset between steps.
        out_tokens: optional [B, k+1] int64, **mutated**: accepted drafts, then the correction or bonus
            token, then -1.
        accepted: optional [B] int32, **mutated**: accepted drafts per row (0..k).
    Returns:
        (out_tokens, accepted).
    """
    B, k1 = target_logits.shape[0], target_logits.shape[1]
    if out_tokens is None:
        out_tokens = torch.empty(B, k1, dtype=torch.long, device=target_logits.device)
    if accepted is None:
        accepted = torch.empty(B, dtype=torch.int32, device=target_logits.device)
    torch.ops.pass_ext.speculative_verify(
        target_logits.contiguous(), draft_tokens.contiguous(),
        None if draft_probs is None else draft_probs.contiguous(),
        temperature.contiguous(), top_k.contiguous(), top_p.contiguous(), seed.contiguous(), offset.contiguous(),
        out_tokens, accepted)
    return out_tokens, accepted


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    probs_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Warp logits per row (temperature, then top-k, then top-p) and draw one token per row.

    The warp: temperature <= 0 (or NaN) is greedy, the argmax with the lowest index among ties; otherwise
    z = logits / T; top-k (0 < top_k < V) keeps z >= the top_k-th largest z (ties kept); softmax; top-p
    (top_p < 1) keeps the smallest set of highest tokens whose mass reaches top_p plus ties with the last,
    and renormalises. NaN logits count as -inf; a row with no finite logit (all NaN or -inf) yields token 0
    with probs_out one-hot at 0; +inf logits share the mass equally. Out-of-range
    parameters never fault: top_k outside (0, V) and top_p >= 1 are off, top_p <= 0 keeps the maximum only.
    The draw is the exponential race argmax_j p_j / E_j on counter-based Philox numbers, so CPU and CUDA
    draw the same token for the same (seed, offset, row), up to float rounding at near-ties.

    Args:
        logits: [N, V] float32/bf16/fp16, N >= 1, 1 <= V <= 2^20.
        temperature: [N] float32 (0 = greedy argmax), top_k: [N] int32 (0 = off), top_p: [N] float32.
        seed, offset: one-element int64 tensors on the logits' device, read on the device (graph-safe) and
            never changed: row n's draw depends on (seed, offset, n) and its logits only, so two calls with
            the same seed and offset repeat their random numbers row for row; advance the offset between them.
        out: optional [N] int64, **mutated**.
        probs_out: optional [N, V] float32, **mutated**: the warped distribution each token was drawn
            from (one-hot at the argmax for greedy rows) — the draft probabilities speculative_verify needs.
    Returns:
        out [N] int64.
    """
    if out is None:
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    torch.ops.pass_ext.sample(logits.contiguous(), temperature.contiguous(), top_k.contiguous(), top_p.contiguous(),
                              seed.contiguous(), offset.contiguous(), out, probs_out)
    return out


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {raw!r}")
    return value


def linear_max_rows() -> int:
    """Rows of x (tokens of a forward) up to which the model projects with `decode_linear` on CUDA:
    PASS_EXT_LINEAR_MAX_ROWS, default 16, at most 32; PASS_EXT_LINEAR=0 turns the op off (every projection
    through torch's linear). Past 16 rows the kernel re-reads x too often to beat cuBLAS (bench/NOTES.md)."""
    if os.environ.get("PASS_EXT_LINEAR", "1") == "0":
        return 0
    return _env_int("PASS_EXT_LINEAR_MAX_ROWS", 16, 0, LINEAR_MAX_ROWS)


def linear_max_bytes() -> int:
    """Weight size up to which the model projects with `decode_linear`: PASS_EXT_LINEAR_MAX_MB (MiB), default
    64. Smaller projections are bound by latency, where the op wins (SmolLM2's layers: 2.2x cuBLAS plus the
    compiled norm chains on an H200); larger ones by bandwidth, where cuBLAS streams Llama-8B's 117-235 MB
    gate/up and down weights faster. At 64 MiB the step took 0.85x the time of the old 16 MiB on Qwen2.5-0.5B,
    0.96x on Qwen2.5-1.5B and the same on SmolLM2 and Llama-8B (bench/NOTES.md)."""
    return _env_int("PASS_EXT_LINEAR_MAX_MB", 64, 0, 1 << 20) << 20


def prefetch_allowed() -> bool:
    """Whether the model's forward tells its kernels that they may read weights and the KV cache before waiting
    for the kernel before them (`decode_linear`'s prefetch_weights, `attention_with_kv_cache`'s prefetch_cache):
    PASS_EXT_PREFETCH, '1' (default) or '0' (an A/B switch; the results are the same bits either way)."""
    return _env_on_off("PASS_EXT_PREFETCH")


def linear_fuses_norm() -> bool:
    """Whether a forward whose projections all run as `decode_linear` fuses its RMSNorms and residual adds
    into them too (five kernels per layer instead of seven): PASS_EXT_LINEAR_NORM, '1' (default) or '0'."""
    return _env_on_off("PASS_EXT_LINEAR_NORM")


def _env_on_off(name: str) -> bool:
    """An on/off setting: '1' (the default, also when unset) or '0'; anything else is an error naming it."""
    raw = os.environ.get(name, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be '0' or '1', got {raw!r}")
    return raw == "1"


def decode_linear_applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the CUDA decode_linear kernel takes x [..., K] (contiguous) against each of these weights
    [N, K]: a CUDA build, x on a GPU in bf16/fp16 with at most LINEAR_MAX_ROWS (32) rows, and contiguous,
    16-byte aligned weights of x's dtype with K a multiple of 8 and at most 2^20 rows."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16) or not has_cuda_kernels():
        return False
    if x.numel() // max(1, x.shape[-1]) > LINEAR_MAX_ROWS:
        return False
    return all(w.dim() == 2 and w.shape[1] % 8 == 0 and w.shape[0] <= 65535 * 16 and w.dtype == x.dtype
               and w.is_contiguous() and w.data_ptr() % 16 == 0 for w in weights)


def linear_one_row_max_bytes() -> int:
    """Weight size up to which a one-row forward (`ar` at B = 1) also projects with `decode_linear` where the
    weight's rows are a multiple of 1024 elements: PASS_EXT_LINEAR_ONE_ROW_MAX_MB (MiB), default 320. Such a weight
    streams through the bulk kernel's 1024-column ring (sm_90), faster than cuBLAS at one row: the Llama-8B `ar`
    step 4.205 ms with its gate/up and down weights there against 4.599 on cuBLAS (84% of the weight roofline in
    bench_generate), and the Qwen2.5-14B step 8.52 against 8.66 ms with its 270 MiB gate/up there (a limit of 256).
    With a 512-column ring (ragged K), or at 4 rows and more, cuBLAS was as fast or faster (bench/NOTES.md)."""
    return _env_int("PASS_EXT_LINEAR_ONE_ROW_MAX_MB", 320, 0, 1 << 20) << 20


def decode_linear_pays(weight: torch.Tensor, one_row: bool = False) -> bool:
    """Whether the model's default is to project through decode_linear for this weight: up to `linear_max_bytes`,
    and in a one-row forward (`one_row`) up to `linear_one_row_max_bytes` where K is a multiple of 1024."""
    size = weight.numel() * weight.element_size()
    if size <= linear_max_bytes():
        return True
    return one_row and weight.shape[-1] % 1024 == 0 and size <= linear_one_row_max_bytes()


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    swiglu: bool = False,
    out: Optional[torch.Tensor] = None,
    rope_cos: Optional[torch.Tensor] = None,
    rope_sin: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    rope_rows: int = 0,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    prefetch_weights: bool = False,
) -> torch.Tensor:
    """x @ weight.T (+ bias) for the few rows of a decode step, optionally SwiGLU-gated or with the rotary
    embedding of a fused q/k/v projection applied.

    Args:
        x: [..., K] (the leading dims are flattened into M rows).
        weight: [N, K], x's dtype and device.
        bias: optional [N].
        swiglu: return silu(gate) * up [..., N/2], where gate and up are the first and second halves of the
            product's columns, each rounded to the dtype first (a fused gate/up projection and its activation).
        out: optional [M, N] ([M, N/2] with swiglu) contiguous buffer, **mutated**.
        rope_cos, rope_sin: optional [P, D] float32 tables (position p's angles, channels [freqs, freqs]); with
            them, the columns [0, rope_rows) are heads of D channels, each rotated as `q * cos + rotate_half(q)
            * sin` at its row's position (cos/sin rounded to the dtype, the rotation rounded once); the columns
            past rope_rows (v) are left as they are. N and rope_rows must be whole heads.
        positions: [...] int64 positions of x's rows (same leading dims), with rope_cos; clamped to [0, P).
        rope_rows: columns that get the rotary embedding (q and k heads: (Hq + Hkv) * D).
        norm_weight: optional [K]: x goes through RMSNorm first, with the model's roundings:
            `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)` (statistics in float).
        eps: the RMSNorm epsilon.
        residual: optional [..., N] (x's leading dims), added to the product (rounded to the dtype first, the
            sum rounded once); not with swiglu or the rotary embedding.
        prefetch_weights: on sm_90 GPUs the CUDA kernel may start before the kernel before it on the stream has
            finished (programmatic dependent launch; PASS_EXT_PDL=0 turns that off). With True it streams its
            first weights in before waiting for that kernel, and reads the bias and the rotary angles of its rows
            (positions, then rope_cos / rope_sin), so that kernel must not write `weight`, `bias`, `positions`,
            `rope_cos` or `rope_sin` (a model's forward never writes the first four; its positions must come
            from a kernel before that one); with False it reads nothing before the wait.
    Returns:
        [..., N] or [..., N/2] in x's dtype.

    The CPU kernel sums each element in order in float (float64 for float64). The CUDA kernel (bf16/fp16,
    M <= 32, K a multiple of 8, D a multiple of 16, 16-byte aligned) streams the weight through tensor cores;
    a row's result does not depend on M or on the other rows. `decode_linear_applies` says whether a call fits.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if out is None:
        out = torch.empty(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    if positions is not None:
        positions = positions.reshape(-1).contiguous()
    if residual is not None:
        residual = residual.reshape(-1, weight.shape[0]).contiguous()
    torch.ops.pass_ext.decode_linear(x2, weight, bias, bool(swiglu), rope_cos, rope_sin, positions, int(rope_rows),
                                     norm_weight, float(eps), residual, out, bool(prefetch_weights))
    return out.view(*lead, n_out)


@torch.library.register_fake("pass_ext::attention_with_kv_cache")
def _attention_fake(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, out, prefetch_cache=False):
    torch._check(out.shape == q.shape)
    return None


@torch.library.register_fake("pass_ext::speculative_verify")
def _verify_fake(target_logits, draft_tokens, draft_probs, temperature, top_k, top_p, seed, offset,
                 out_tokens, accepted):
    torch._check(out_tokens.shape[1] == draft_tokens.shape[1] + 1)
    return None


@torch.library.register_fake("pass_ext::sample")
def _sample_fake(logits, temperature, top_k, top_p, seed, offset, out, probs_out):
    torch._check(out.shape[0] == logits.shape[0])
    return None


@torch.library.register_fake("pass_ext::decode_linear")
def _decode_linear_fake(x, weight, bias, swiglu, rope_cos, rope_sin, positions, rope_rows, norm_weight, eps, residual,
                        out, prefetch_weights=False):
    torch._check(out.shape[0] == x.shape[0])
    return None
