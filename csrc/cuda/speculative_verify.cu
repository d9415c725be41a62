// CUDA kernels of speculative_verify: first one block per (row, position) warps the k+1 target positions
// in parallel (the same radix selects as sample); then one block per row walks the k drafts in order on those
// warps. Acceptance, residual and bonus draws use Philox streams of their own, so the result matches the CPU
// kernel draw for draw.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda/sampling_dispatch.cuh"
#include "kernels/sampling.cuh"
#include "op_checks.h"

namespace pass_ext {
namespace {

using namespace sampling;
using namespace sampling::cuda;

// Block n warps target row n of [B * (k+1), V] (batch row n / (k+1)) into warps[n].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    warp_rows_kernel(const T* __restrict__ logits, int k, int vocab, const float* __restrict__ temperature,
                     const int32_t* __restrict__ top_k, const float* __restrict__ top_p, Warp* __restrict__ warps) {
  __shared__ Scratch s;
  const int64_t n = blockIdx.x, b = n / (k + 1);
  const Warp w = warp_row(logits + n * vocab, vocab, temperature[b], top_k[b], top_p[b], s);
  if (threadIdx.x == 0) warps[n] = w;
}

// target_logits [B, k+1, V], drafts [B, k], draft_probs [B, k, V] (nullable), warps [B, k+1] (from
// warp_rows_kernel) -> out_tokens [B, k+1], accepted [B]. Every branch below depends only on values all
// threads compute identically, so barriers stay uniform.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    verify_kernel(const T* __restrict__ logits, const int64_t* __restrict__ drafts,
                  const float* __restrict__ draft_probs, int k, int vocab, const float* __restrict__ temperature,
                  const Warp* __restrict__ warps, const int64_t* __restrict__ seed,
                  const int64_t* __restrict__ offset, int64_t* __restrict__ out_tokens,
                  int32_t* __restrict__ accepted) {
  __shared__ Scratch s;
  const int64_t b = blockIdx.x;
  const float temp = temperature[b];
  const bool greedy = is_greedy(temp);
  const int64_t seed_v = *seed, offset_v = *offset;
  const uint32_t row_index = uint32_t(b);
  int acc = 0;
  int32_t token = 0;
  for (int i = 0; i <= k; ++i) {
    const T* row = logits + (b * (k + 1) + i) * vocab;
    const Warp w = warps[b * (k + 1) + i];
    if (i == k) {  // every draft accepted: the bonus token
      token = w.argmax;
      if (!greedy) {
        const philox::Stream rng(seed_v, offset_v, kStreamResidual, row_index, uint32_t(i));
        const int32_t t = race(row, vocab, rng, [&](float l, int32_t j) { return w.weight(l, j); }, s);
        if (t >= 0) token = t;
      }
      break;
    }
    const int64_t d = drafts[b * k + i];
    const bool valid = d >= 0 && d < vocab;
    if (greedy) {
      if (d == w.argmax) {
        ++acc;
        continue;
      }
      token = w.argmax;
      break;
    }
    const float* q = draft_probs ? draft_probs + (b * k + i) * int64_t(vocab) : nullptr;
    const float p_d = valid ? w.prob(to_float(row[d]), int32_t(d)) : 0.f;
    const float q_d = valid ? (q ? q[d] : 1.f) : 0.f;
    const float u = philox::Stream(seed_v, offset_v, kStreamAccept, row_index, uint32_t(i)).uniform(0);
    if (valid && mul_rn(u, q_d) < p_d) {
      ++acc;
      continue;
    }
    // Rejected: draw from norm(max(0, p - q)), or from p when that residual has no mass.
    const philox::Stream rng(seed_v, offset_v, kStreamResidual, row_index, uint32_t(i));
    int32_t t = race(row, vocab, rng, [&](float l, int32_t j) {
      const float r = w.prob(l, j) - (q ? q[j] : (j == d ? 1.f : 0.f));
      return r > 0.f ? r : 0.f;
    }, s);
    if (t < 0) t = race(row, vocab, rng, [&](float l, int32_t j) { return w.weight(l, j); }, s);
    token = t >= 0 ? t : w.argmax;
    break;
  }
  if (threadIdx.x == 0) {
    int64_t* o = out_tokens + b * (k + 1);
    for (int i = 0; i <= k; ++i) o[i] = i < acc ? drafts[b * k + i] : (i == acc ? token : -1);
    accepted[b] = acc;
  }
}

void speculative_verify_cuda(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                             const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
                             const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& seed,
                             const at::Tensor& offset, at::Tensor& out_tokens, at::Tensor& accepted) {
  check_verify_args(target_logits, draft_tokens, draft_probs, temperature, top_k, top_p, seed, offset, out_tokens,
                    accepted);
  const int64_t batch = target_logits.size(0);
  TORCH_CHECK(batch <= INT32_MAX, "target_logits has too many rows for one launch: ", batch);
  const int64_t positions = batch * target_logits.size(1);
  TORCH_CHECK(positions <= INT32_MAX, "target_logits has too many rows for one launch: ", positions);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  static_assert(std::is_trivially_copyable_v<Warp>, "warps travel through global memory");
  const at::Tensor warps = at::empty({positions, int64_t(sizeof(Warp))}, target_logits.options().dtype(at::kByte));
  Warp* warps_ptr = reinterpret_cast<Warp*>(warps.data_ptr<uint8_t>());
  const int k = int(target_logits.size(1) - 1), vocab = int(target_logits.size(2));
  cuda_dispatch::by_logits_dtype(target_logits, [&](auto* data) {
    warp_rows_kernel<<<unsigned(positions), kThreads, 0, stream>>>(
        data, k, vocab, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
        top_p.const_data_ptr<float>(), warps_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    verify_kernel<<<unsigned(batch), kThreads, 0, stream>>>(
        data, draft_tokens.const_data_ptr<int64_t>(),
        draft_probs ? draft_probs->const_data_ptr<float>() : nullptr, k, vocab, temperature.const_data_ptr<float>(),
        warps_ptr, seed.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(), out_tokens.data_ptr<int64_t>(),
        accepted.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("speculative_verify", &speculative_verify_cuda); }

}  // namespace pass_ext
