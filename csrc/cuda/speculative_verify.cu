// CUDA kernels of speculative_verify: filter_kernel reads the k+1 target positions of every row once, one
// block per chunk of the vocabulary, and one block per (row, position) warps them from its candidates (or
// with one-block radix selects, as sample; see "Split rows" in sampling.cuh); then one block per row walks the
// k drafts in order on those warps, racing over the candidates where they held the warp. Acceptance, residual
// and bonus draws use Philox streams of their own, so the result matches the CPU kernel draw for draw.
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

// Block n warps target position n of [B * (k+1), V] (batch row n / (k+1)) into warps[n]; split_ok[n] says
// whether the position's chunk candidates hold every token of positive weight.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    warp_rows_kernel(const T* __restrict__ logits, int k, int vocab, int chunks, const float* __restrict__ temperature,
                     const int32_t* __restrict__ top_k, const float* __restrict__ top_p, int max_top_k,
                     const ChunkSummary* __restrict__ sums, const Candidate* __restrict__ cands,
                     Warp* __restrict__ warps, int32_t* __restrict__ split_ok) {
  __shared__ Scratch s;
  __shared__ ListScratch list;
  const int64_t n = blockIdx.x, b = n / (k + 1);
  Warp w;
  const bool split = split_warp(vocab, temperature[b], top_k[b], top_p[b], max_top_k, sums + n * chunks, chunks,
                                cands + n * chunks * kChunkCands, s, list, w);
  if (!split) w = warp_row(logits + n * vocab, vocab, temperature[b], top_k[b], top_p[b], s);
  if (threadIdx.x == 0) {
    warps[n] = w;
    split_ok[n] = split && !w.one_hot;
  }
}

// target_logits [B, k+1, V], drafts [B, k], draft_probs [B, k, V] (nullable), warps [B, k+1] (from
// warp_rows_kernel) -> out_tokens [B, k+1], accepted [B]. Every branch below depends only on values all
// threads compute identically, so barriers stay uniform.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    verify_kernel(const T* __restrict__ logits, const int64_t* __restrict__ drafts,
                  const float* __restrict__ draft_probs, int k, int vocab, int chunks,
                  const float* __restrict__ temperature, const Warp* __restrict__ warps,
                  const int32_t* __restrict__ split_ok, const ChunkSummary* __restrict__ sums,
                  const Candidate* __restrict__ cands, const int64_t* __restrict__ seed,
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
    const int64_t pos = b * (k + 1) + i;
    const T* row = logits + pos * vocab;
    const Warp w = warps[pos];
    // The race over the row, or over its candidates when they hold every token of positive weight (weight_fn
    // is zero wherever the warp's weight is).
    const bool split = split_ok[pos] != 0;
    auto race_row = [&](const philox::Stream& rng, auto&& weight_fn) {
      return split ? race_candidates(sums + pos * chunks, chunks, cands + pos * chunks * kChunkCands, rng, weight_fn, s)
                   : race(row, vocab, rng, weight_fn, s);
    };
    if (i == k) {  // every draft accepted: the bonus token
      token = w.argmax;
      if (!greedy) {
        const philox::Stream rng(seed_v, offset_v, kStreamResidual, row_index, uint32_t(i));
        const int32_t t = race_row(rng, [&](float l, int32_t j) { return w.weight(l, j); });
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
    int32_t t = race_row(rng, [&](float l, int32_t j) {
      const float r = w.prob(l, j) - (q ? q[j] : (j == d ? 1.f : 0.f));
      return r > 0.f ? r : 0.f;
    });
    if (t < 0) t = race_row(rng, [&](float l, int32_t j) { return w.weight(l, j); });
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
  if (batch == 0) return;
  const int k = int(target_logits.size(1) - 1), vocab = int(target_logits.size(2)), chunks = chunks_of(vocab);
  const split::Workspace ws(target_logits, positions, chunks);
  const int max_top_k = split::max_top_k();
  cuda_dispatch::by_logits_dtype(target_logits, [&](auto* data) {
    filter_kernel<<<dim3(unsigned(positions), unsigned(chunks)), kFilterThreads, 0, stream>>>(
        data, vocab, k + 1, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(), max_top_k,
        ws.sums, ws.cands);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    warp_rows_kernel<<<unsigned(positions), kThreads, 0, stream>>>(
        data, k, vocab, chunks, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
        top_p.const_data_ptr<float>(), max_top_k, ws.sums, ws.cands, ws.warps, ws.split_ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    verify_kernel<<<unsigned(batch), kThreads, 0, stream>>>(
        data, draft_tokens.const_data_ptr<int64_t>(),
        draft_probs ? draft_probs->const_data_ptr<float>() : nullptr, k, vocab, chunks,
        temperature.const_data_ptr<float>(), ws.warps, ws.split_ok, ws.sums, ws.cands,
        seed.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(), out_tokens.data_ptr<int64_t>(),
        accepted.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("speculative_verify", &speculative_verify_cuda); }

}  // namespace pass_ext
