// Argument validation shared by the CPU and CUDA launchers: every op checks shapes, dtypes and devices
// here, with messages that name the argument, before any kernel touches memory.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cmath>

namespace pass_ext {

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " like the first argument, got ",
              t.device());
}

inline void check_attention_args(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                 const std::optional<at::Tensor>& tree_mask, double scale, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, Q, Hq, D], got ", q.sizes());
  TORCH_CHECK(k_new.dim() == 4, "k_new must be [B, Q, Hkv, D], got ", k_new.sizes());
  TORCH_CHECK(v_new.sizes() == k_new.sizes(), "v_new must match k_new ", k_new.sizes(), ", got ", v_new.sizes());
  const int64_t B = q.size(0), Q = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_new.size(2);
  TORCH_CHECK(B >= 1 && Q >= 1 && Hq >= 1 && D >= 1,
              "q must be [B, Q, Hq, D] with every size >= 1 (at least one row, new token, head and channel), got ",
              q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(std::isfinite(scale), "scale must be a finite number, got ", scale);
  TORCH_CHECK(k_new.size(0) == B && k_new.size(1) == Q && k_new.size(3) == D, "k_new must be [B=", B, ", Q=", Q,
              ", Hkv, D=", D, "], got ", k_new.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "q heads (", Hq, ") must be a multiple of k_new heads (", Hkv, ")");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hkv && k_cache.size(3) == D,
              "k_cache must be [B=", B, ", Hkv=", Hkv, ", S_max, D=", D, "], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must match k_cache ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must match q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(cache_lens.dim() == 1 && cache_lens.size(0) == B, "cache_lens must be [B=", B, "], got ",
              cache_lens.sizes());
  TORCH_CHECK(cache_lens.scalar_type() == at::kInt, "cache_lens must be int32, got ", cache_lens.scalar_type());
  for (const auto& [t, name] : {std::pair{k_new, "k_new"}, {v_new, "v_new"}, {k_cache, "k_cache"},
                                {v_cache, "v_cache"}, {out, "out"}}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                t.scalar_type());
    check_same_device(q, t, name);
  }
  // q, k_new and v_new may be any view (the launchers copy what their kernels cannot read in place); the
  // tensors the op writes must be contiguous.
  for (const auto& [t, name] : {std::pair{k_cache, "k_cache"}, {v_cache, "v_cache"}, {out, "out"}})
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  check_same_device(q, cache_lens, "cache_lens");
  TORCH_CHECK(cache_lens.is_contiguous(), "cache_lens must be contiguous");
  if (tree_mask.has_value()) {
    const auto& m = *tree_mask;
    TORCH_CHECK(m.scalar_type() == at::kLong, "tree_mask must be int64 (bit-packed), got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == Q && m.size(1) == (Q + 63) / 64, "tree_mask must be [Q=", Q,
                ", ceil(Q/64)=", (Q + 63) / 64, "], got ", m.sizes());
    check_same_device(q, m, "tree_mask");
    TORCH_CHECK(m.is_contiguous(), "tree_mask must be contiguous");
  }
}

// Elements between consecutive new tokens of q / k_new / v_new [B, Q, H, D] when a kernel can read the tensor
// in place: heads and channels contiguous within a token, token (b, j) at (b * Q + j) * stride (a slice of a
// contiguous [B, Q, ...] tensor, such as the q, k or v part of a fused qkv projection); 0 when it cannot.
inline int64_t token_stride(const at::Tensor& t) {
  const int64_t B = t.size(0), Q = t.size(1), H = t.size(2), D = t.size(3);
  if (t.is_contiguous()) return H * D;
  if (t.stride(3) != 1 || (H > 1 && t.stride(2) != D)) return 0;
  const int64_t tok = Q > 1 ? t.stride(1) : t.stride(0);
  if (Q > 1 && B > 1 && t.stride(0) != Q * tok) return 0;
  return tok >= H * D ? tok : 0;
}

// Checks shared by sample and speculative_verify: per-row sampling parameters and the RNG tensors.
inline void check_sampling_params(const at::Tensor& logits, int64_t rows, const at::Tensor& temperature,
                                  const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& seed,
                                  const at::Tensor& offset) {
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == rows && temperature.scalar_type() == at::kFloat,
              "temperature must be float32 [", rows, "], got ", temperature.scalar_type(), " ", temperature.sizes());
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == rows && top_k.scalar_type() == at::kInt,
              "top_k must be int32 [", rows, "], got ", top_k.scalar_type(), " ", top_k.sizes());
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == rows && top_p.scalar_type() == at::kFloat,
              "top_p must be float32 [", rows, "], got ", top_p.scalar_type(), " ", top_p.sizes());
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed must be a one-element int64 tensor, got ",
              seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK(offset.numel() == 1 && offset.scalar_type() == at::kLong,
              "offset must be a one-element int64 tensor, got ", offset.scalar_type(), " ", offset.sizes());
  for (const auto& [t, name] : {std::pair{temperature, "temperature"}, {top_k, "top_k"}, {top_p, "top_p"},
                                {seed, "seed"}, {offset, "offset"}}) {
    check_same_device(logits, t, name);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  }
}

// Logits of the sampling ops: float32/bf16/fp16, contiguous, last dim V in [1, 2^20].
inline void check_logits(const at::Tensor& logits, const char* name, int64_t dims, const char* shape) {
  TORCH_CHECK(logits.dim() == dims, name, " must be ", shape, ", got ", logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", t);
  TORCH_CHECK(logits.is_contiguous(), name, " must be contiguous");
  const int64_t vocab = logits.size(dims - 1);
  TORCH_CHECK(vocab >= 1 && vocab <= (int64_t{1} << 20), name, " must have a vocabulary size V in [1, 2^20], got ",
              vocab);
}

inline void check_output(const at::Tensor& ref, const at::Tensor& t, const char* name, at::ScalarType dtype,
                         at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  check_same_device(ref, t, name);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                              const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset,
                              const at::Tensor& out, const std::optional<at::Tensor>& probs_out) {
  check_logits(logits, "logits", 2, "[N, V]");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(rows >= 1, "logits must hold at least one row N >= 1, got ", logits.sizes());
  check_sampling_params(logits, rows, temperature, top_k, top_p, seed, offset);
  check_output(logits, out, "out", at::kLong, {rows});
  if (probs_out.has_value()) check_output(logits, *probs_out, "probs_out", at::kFloat, {rows, vocab});
}

inline void check_verify_args(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                              const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
                              const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& seed,
                              const at::Tensor& offset, const at::Tensor& out_tokens, const at::Tensor& accepted) {
  check_logits(target_logits, "target_logits", 3, "[B, k+1, V]");
  const int64_t batch = target_logits.size(0), positions = target_logits.size(1), vocab = target_logits.size(2);
  TORCH_CHECK(batch >= 1, "target_logits must hold at least one row B >= 1, got ", target_logits.sizes());
  TORCH_CHECK(positions >= 1 && positions <= 256, "target_logits must have k+1 in [1, 256] positions, got ",
              positions);
  const int64_t drafts = positions - 1;
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong, "draft_tokens must be int64, got ", draft_tokens.scalar_type());
  TORCH_CHECK(draft_tokens.dim() == 2 && draft_tokens.size(0) == batch && draft_tokens.size(1) == drafts,
              "draft_tokens must be [B=", batch, ", k=", drafts, "] (target_logits has k+1 positions), got ",
              draft_tokens.sizes());
  check_same_device(target_logits, draft_tokens, "draft_tokens");
  TORCH_CHECK(draft_tokens.is_contiguous(), "draft_tokens must be contiguous");
  if (draft_probs.has_value()) {
    const auto& q = *draft_probs;
    TORCH_CHECK(q.scalar_type() == at::kFloat, "draft_probs must be float32, got ", q.scalar_type());
    TORCH_CHECK(q.dim() == 3 && q.size(0) == batch && q.size(1) == drafts && q.size(2) == vocab,
                "draft_probs must be [B=", batch, ", k=", drafts, ", V=", vocab, "], got ", q.sizes());
    check_same_device(target_logits, q, "draft_probs");
    TORCH_CHECK(q.is_contiguous(), "draft_probs must be contiguous");
  }
  check_sampling_params(target_logits, batch, temperature, top_k, top_p, seed, offset);
  check_output(target_logits, out_tokens, "out_tokens", at::kLong, {batch, positions});
  check_output(target_logits, accepted, "accepted", at::kInt, {batch});
}

// decode_linear: x [M, K] (rows may be strided, elements contiguous), weight [N, K] contiguous, bias [N] or
// None, out [M, N] contiguous ([M, N / 2] when swiglu, N even); one floating dtype and device for all.
inline void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              bool swiglu, const std::optional<at::Tensor>& rope_cos,
                              const std::optional<at::Tensor>& rope_sin, const std::optional<at::Tensor>& positions,
                              int64_t rope_rows, const std::optional<at::Tensor>& norm_weight, double eps,
                              const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) >= 1 && x.size(1) >= 1,
              "weight must be [N, K=", x.size(1), "] with N, K >= 1, got ", weight.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "x must be float32, float64, bfloat16 or float16, got ", dtype);
  const int64_t M = x.size(0), N = weight.size(0);
  TORCH_CHECK(!swiglu || N % 2 == 0, "swiglu needs an even number of weight rows N (gate rows, then up rows), got ",
              N);
  const int64_t n_out = swiglu ? N / 2 : N;
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "x's rows must be contiguous (x.stride(1) == 1), got strides ",
              x.strides());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(weight.scalar_type() == dtype, "weight must have x's dtype ", dtype, ", got ", weight.scalar_type());
  check_same_device(x, weight, "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [N=", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, "bias must have x's dtype ", dtype, ", got ", bias->scalar_type());
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous");
    check_same_device(x, *bias, "bias");
  }
  const bool rope = rope_cos.has_value();
  TORCH_CHECK(rope == rope_sin.has_value() && rope == positions.has_value(),
              "rope_cos, rope_sin and positions go together (all or none)");
  if (rope) {
    TORCH_CHECK(!swiglu, "swiglu and the rotary embedding (rope_cos) exclude each other");
    const auto& c = *rope_cos;
    TORCH_CHECK(c.dim() == 2 && c.size(0) >= 1 && c.size(1) >= 2 && c.size(1) % 2 == 0,
                "rope_cos must be [positions >= 1, head_dim (even)], got ", c.sizes());
    TORCH_CHECK(rope_sin->sizes() == c.sizes(), "rope_sin must match rope_cos ", c.sizes(), ", got ",
                rope_sin->sizes());
    for (const auto& [t, name] : {std::pair{c, "rope_cos"}, {*rope_sin, "rope_sin"}}) {
      TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
      TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
      check_same_device(x, t, name);
    }
    const int64_t dim = c.size(1);
    TORCH_CHECK(N % dim == 0, "weight rows N (", N, ") must be whole heads of rope_cos.size(1)=", dim, " channels");
    TORCH_CHECK(rope_rows >= 0 && rope_rows <= N && rope_rows % dim == 0, "rope_rows must be whole heads (a ",
                "multiple of ", dim, ") in [0, N=", N, "], got ", rope_rows);
    TORCH_CHECK(positions->scalar_type() == at::kLong, "positions must be int64, got ", positions->scalar_type());
    TORCH_CHECK(positions->dim() == 1 && positions->size(0) == M, "positions must be [M=", M, "], got ",
                positions->sizes());
    TORCH_CHECK(positions->is_contiguous(), "positions must be contiguous");
    check_same_device(x, *positions, "positions");
  }
  if (norm_weight.has_value()) {
    const auto& w = *norm_weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "norm_weight must be [K=", x.size(1), "], got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype, "norm_weight must have x's dtype ", dtype, ", got ", w.scalar_type());
    TORCH_CHECK(w.is_contiguous(), "norm_weight must be contiguous");
    check_same_device(x, w, "norm_weight");
    TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
  }
  if (residual.has_value()) {
    const auto& r = *residual;
    TORCH_CHECK(!swiglu && !rope, "residual goes with the plain product only (not swiglu or the rotary embedding)");
    TORCH_CHECK(r.dim() == 2 && r.size(0) == M && r.size(1) == N, "residual must be [M=", M, ", N=", N, "], got ",
                r.sizes());
    TORCH_CHECK(r.scalar_type() == dtype, "residual must have x's dtype ", dtype, ", got ", r.scalar_type());
    TORCH_CHECK(r.is_contiguous(), "residual must be contiguous");
    check_same_device(x, r, "residual");
  }
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == n_out, "out must be [M=", M, ", ",
              swiglu ? "N/2=" : "N=", n_out, "], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, "out must have x's dtype ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  check_same_device(x, out, "out");
}

}  // namespace pass_ext
