// CUDA entry of attention_with_kv_cache: validates the arguments (the semantics and limits are in
// attention_launch.cuh) and hands the call to the launch for the dtype of q, each compiled in its own file.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "attention_launch.cuh"
#include "op_checks.h"
#include "trace.h"

namespace pass_ext {
namespace {

namespace k = kernels;

// q / k_new / v_new as the kernels read them: in place when token_stride allows it and every token starts on a
// 16-byte boundary (the q, k and v slices of a fused qkv projection, which would otherwise cost a copy kernel
// per layer), else a contiguous copy.
at::Tensor readable_new(const at::Tensor& t) {
  const int64_t tok = token_stride(t);
  const bool aligned = tok > 0 && (tok * t.element_size()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return aligned ? t : t.contiguous();
}

void attention_with_kv_cache_cuda(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  const std::optional<at::Tensor>& tree_mask, double scale, at::Tensor& out,
                                  bool prefetch_cache) {
  check_attention_args(q_in, k_new_in, v_new_in, k_cache, v_cache, cache_lens, tree_mask, scale, out);
  const at::Tensor q = readable_new(q_in), k_new = readable_new(k_new_in), v_new = readable_new(v_new_in);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  const int64_t B = q.size(0), Q = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_new.size(2);
  const int64_t S = k_cache.size(2);
  constexpr int64_t kMaxQ = attention_launch::kMaxQ;
  TORCH_CHECK(Q <= kMaxQ, "attention_with_kv_cache on CUDA supports at most ", kMaxQ,
              " new tokens per row (Q = q.size(1)), got Q=", Q);
  TORCH_CHECK(D >= 8 && D <= 256 && D % 8 == 0,
              "attention_with_kv_cache on CUDA needs a head dim D (q.size(3)) that is a multiple of 8 in [8, 256] "
              "(64 and 128 are the tuned ones), got D=", D);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "attention_with_kv_cache on CUDA supports q dtypes float32, float16 and bfloat16, got ", dtype);
  TORCH_CHECK(B * Hkv <= 65535, "attention_with_kv_cache on CUDA supports B * Hkv <= 65535, got B=", B, ", Hkv=",
              Hkv);
  TORCH_CHECK(S <= INT32_MAX / 2, "k_cache S_max (", S, ") is too large");
  for (const auto& [t, name] : {std::pair{q, "q"}, {k_new, "k_new"}, {v_new, "v_new"}, {k_cache, "k_cache"},
                                {v_cache, "v_cache"}, {out, "out"}}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                " must be 16-byte aligned (a view with an odd storage offset is not)");
  }
  if (tree_mask.has_value()) TORCH_CHECK(tree_mask->is_cuda(), "tree_mask must be on the GPU like q");

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  k::AttentionParams p{};
  p.q = q.data_ptr();
  p.q_tok = token_stride(q);
  p.prefetch_cache = prefetch_cache ? 1 : 0;
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.k_tok = token_stride(k_new);
  p.v_tok = token_stride(v_new);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_lens = cache_lens.data_ptr<int32_t>();
  p.tree_mask = tree_mask.has_value() ? tree_mask->data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  p.B = static_cast<int>(B);
  p.Q = static_cast<int>(Q);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.D = static_cast<int>(D);
  p.S = static_cast<int>(S);
  p.G = static_cast<int>(Hq / Hkv);
  p.R = static_cast<int>(Q * (Hq / Hkv));
  p.mask_words = static_cast<int>((Q + 63) / 64);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.warp_merge = env_is("PASS_EXT_ATTENTION_WARP_MERGE", "0") ? 0 : 1;
  p.trace = reinterpret_cast<unsigned long long*>(next_trace_slot());

  switch (dtype) {
    case at::kFloat: attention_launch::run<float>(p, q, stream, sms); break;
    case at::kHalf: attention_launch::run<__half>(p, q, stream, sms); break;
    default: attention_launch::run<__nv_bfloat16>(p, q, stream, sms); break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("attention_with_kv_cache", &attention_with_kv_cache_cuda); }

}  // namespace pass_ext
