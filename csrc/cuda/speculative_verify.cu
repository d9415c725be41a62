// CUDA kernels of speculative_verify: filter_kernel reads the k+1 target positions of every row once, one
// block per chunk of the vocabulary, and one block per (row, position) warps them from its candidates (or
// with one-block radix selects, as sample; see "Split rows" in sampling.cuh; plain rows from grid-wide sums,
// "Plain rows"); then one block per row walks the k drafts in order on those warps, racing over the candidates
// where they held the warp (plain rows: plain_stop_kernel ran the race at the stop over the whole grid).
// Acceptance, residual and bonus draws use Philox streams of their own, so the result matches the CPU kernel draw
// for draw.
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
                     const ChunkSummary* __restrict__ sums, const Candidate* __restrict__ cands, bool grid_plain,
                     const PlainAcc* __restrict__ acc, Warp* __restrict__ warps, int32_t* __restrict__ split_ok) {
  __shared__ Scratch s;
  __shared__ ListScratch list;
  kernels::wait_for_inputs();  // a dependent launch after plain_pass_kernel where the plain-row passes run
  kernels::release_dependents();
  const int64_t n = blockIdx.x, b = n / (k + 1);
  Warp w;
  const bool split = split_warp(vocab, temperature[b], top_k[b], top_p[b], max_top_k, sums + n * chunks, chunks,
                                cands + n * chunks * kChunkCands, s, list, w, grid_plain, acc + n);
  // A plain row's mass comes from the grid-wide pass (split_warp leaves such a row unsplit and not one-hot).
  const bool plain = !split && grid_plain && plain_row(temperature[b], top_k[b], top_p[b], vocab);
  if (plain) w.mass = float(double(acc[n].mass) * kMassUnit);
  else if (!split) w = warp_row(logits + n * vocab, vocab, temperature[b], top_k[b], top_p[b], s);
  if (threadIdx.x == 0) {
    warps[n] = w;
    split_ok[n] = plain ? 2 : (split && !w.one_hot);
  }
}

// Whether sampling row b accepts draft i (d, from q_i or one-hot where q is null) under the warp w of its target
// position: U * q(d) < p(d), U on the acceptance stream of (b, i). verify_kernel and plain_stop_kernel both walk
// the drafts with it, so they stop at the same position.
template <typename T>
__device__ __forceinline__ bool draft_accepted(const T* row, int vocab, const Warp& w, int64_t d, const float* q,
                                               int64_t seed, int64_t offset, uint32_t b, uint32_t i) {
  const bool valid = d >= 0 && d < vocab;
  const float p_d = valid ? w.prob(to_float(row[d]), int32_t(d)) : 0.f;
  const float q_d = valid ? (q ? q[d] : 1.f) : 0.f;
  const float u = philox::Stream(seed, offset, kStreamAccept, b, i).uniform(0);
  return valid && mul_rn(u, q_d) < p_d;
}

// The residual weight max(0, p(j) - q(j)) of a rejected draft d (q one-hot at d where null), as verify_kernel races.
__device__ __forceinline__ float residual_weight(const Warp& w, float l, int32_t j, const float* q, int64_t d) {
  const float r = w.prob(l, j) - (q ? q[j] : (j == d ? 1.f : 0.f));
  return r > 0.f ? r : 0.f;
}

// Plain rows' races at the stop position, over the whole grid (see "Plain rows" in sampling.cuh), grid (batch,
// splits): block (b, s) walks row b's drafts as verify_kernel will (first rejection, or k) and, where that
// position's warp is plain (split_ok 2), takes chunks s, s + splits, ... of it and adds their best race entries on
// the residual stream of (b, stop) to acc: the residual draw's (stop < k) and the draw with the warp's weights (the
// bonus at k, the fallback where the residual is all zero). verify_kernel then reads the winners. Launched as a
// dependent launch: nothing is read before the wait.
template <typename T>
__global__ void __launch_bounds__(kFilterThreads, 4)
    plain_stop_kernel(const T* __restrict__ logits, const int64_t* __restrict__ drafts,
                      const float* __restrict__ draft_probs, int k, int vocab, int chunks,
                      const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                      const float* __restrict__ top_p, const Warp* __restrict__ warps,
                      const int32_t* __restrict__ split_ok, const int64_t* __restrict__ seed,
                      const int64_t* __restrict__ offset, PlainAcc* __restrict__ acc) {
  kernels::wait_for_inputs();
  __shared__ u64 red[kFilterThreads / 32];
  __shared__ int stop_shared;
  kernels::release_dependents();
  const int64_t b = blockIdx.x;
  if (!plain_row(temperature[b], top_k[b], top_p[b], vocab)) return;  // the whole block
  const int64_t seed_v = *seed, offset_v = *offset;
  if (threadIdx.x == 0) stop_shared = k;
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t pos = b * (k + 1) + i;
    const float* q = draft_probs ? draft_probs + (b * k + i) * int64_t(vocab) : nullptr;
    if (!draft_accepted(logits + pos * vocab, vocab, warps[pos], drafts[b * k + i], q, seed_v, offset_v,
                        uint32_t(b), uint32_t(i)))
      atomicMin(&stop_shared, i);
  }
  __syncthreads();
  const int stop = stop_shared;
  const int64_t pos = b * (k + 1) + stop;
  if (split_ok[pos] != 2) return;  // a one-hot position: verify_kernel races over the row
  const Warp w = warps[pos];
  const T* row = logits + pos * vocab;
  const int64_t d = stop < k ? drafts[b * k + stop] : -1;
  const float* q = stop < k && draft_probs ? draft_probs + (b * k + stop) * int64_t(vocab) : nullptr;
  const philox::Stream rng(seed_v, offset_v, kStreamResidual, uint32_t(b), uint32_t(stop));
  u64 best = 0, resid = 0;
  for (int chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    for_chunk_groups(row, vocab, chunk, [&](int g, int j0, const float* l) {
      float x[4], r[4];
      bool any = false;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int32_t j = j0 + c;
        x[c] = j < vocab ? w.weight(l[c], j) : 0.f;
        r[c] = j < vocab && stop < k ? residual_weight(w, l[c], j, q, d) : 0.f;
        any |= x[c] > 0.f || r[c] > 0.f;
      }
      if (!any) return;
      const philox::Block bits = rng.group(uint32_t(g));
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (x[c] > 0.f) best = max(best, u64(race_entry(race_score(x[c], bits.v[c]), j0 + c)));
        if (r[c] > 0.f) resid = max(resid, u64(race_entry(race_score(r[c], bits.v[c]), j0 + c)));
      }
    });
  }
  best = small_block_reduce<true>(best, red);
  resid = small_block_reduce<true>(resid, red);
  if (threadIdx.x == 0) {
    if (best != 0) atomicMax(&acc[pos].race, best);
    if (resid != 0) atomicMax(&acc[pos].resid, resid);
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
                  const Candidate* __restrict__ cands, const PlainAcc* __restrict__ acc,
                  const int64_t* __restrict__ seed, const int64_t* __restrict__ offset,
                  int64_t* __restrict__ out_tokens, int32_t* __restrict__ accepted) {
  __shared__ Scratch s;
  kernels::wait_for_inputs();  // a dependent launch after plain_stop_kernel where the plain-row passes run
  const int64_t b = blockIdx.x;
  const float temp = temperature[b];
  const bool greedy = is_greedy(temp);
  const int64_t seed_v = *seed, offset_v = *offset;
  const uint32_t row_index = uint32_t(b);
  int n_acc = 0;
  int32_t token = 0;
  for (int i = 0; i <= k; ++i) {
    const int64_t pos = b * (k + 1) + i;
    const T* row = logits + pos * vocab;
    const Warp w = warps[pos];
    // The race over the row, or over its candidates when they hold every token of positive weight (weight_fn
    // is zero wherever the warp's weight is); a plain row's (split_ok 2) was run by plain_stop_kernel.
    const bool split = split_ok[pos] == 1, raced = split_ok[pos] == 2;
    auto race_row = [&](const philox::Stream& rng, auto&& weight_fn) {
      return split ? race_candidates(sums + pos * chunks, chunks, cands + pos * chunks * kChunkCands, rng, weight_fn, s)
                   : race(row, vocab, rng, weight_fn, s);
    };
    if (i == k) {  // every draft accepted: the bonus token
      token = w.argmax;
      if (!greedy) {
        const philox::Stream rng(seed_v, offset_v, kStreamResidual, row_index, uint32_t(i));
        const int32_t t = raced ? race_winner(acc[pos].race)
                                : race_row(rng, [&](float l, int32_t j) { return w.weight(l, j); });
        if (t >= 0) token = t;
      }
      break;
    }
    const int64_t d = drafts[b * k + i];
    if (greedy) {
      if (d == w.argmax) {
        ++n_acc;
        continue;
      }
      token = w.argmax;
      break;
    }
    const float* q = draft_probs ? draft_probs + (b * k + i) * int64_t(vocab) : nullptr;
    if (draft_accepted(row, vocab, w, d, q, seed_v, offset_v, row_index, uint32_t(i))) {
      ++n_acc;
      continue;
    }
    // Rejected: draw from norm(max(0, p - q)), or from p when that residual has no mass.
    const philox::Stream rng(seed_v, offset_v, kStreamResidual, row_index, uint32_t(i));
    int32_t t = raced ? race_winner(acc[pos].resid)
                      : race_row(rng, [&](float l, int32_t j) { return residual_weight(w, l, j, q, d); });
    if (t < 0) t = raced ? race_winner(acc[pos].race)
                         : race_row(rng, [&](float l, int32_t j) { return w.weight(l, j); });
    token = t >= 0 ? t : w.argmax;
    break;
  }
  if (threadIdx.x == 0) {
    int64_t* o = out_tokens + b * (k + 1);
    for (int i = 0; i <= k; ++i) o[i] = i < n_acc ? drafts[b * k + i] : (i == n_acc ? token : -1);
    accepted[b] = n_acc;
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
  const bool grid_plain = split::grid_plain();
  const int device = target_logits.get_device();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int group = split::filter_group(positions, chunks, sms);
  const float* q = draft_probs ? draft_probs->const_data_ptr<float>() : nullptr;
  cuda_dispatch::by_logits_dtype(target_logits, [&](auto* data) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    filter_kernel<<<dim3(unsigned(positions), unsigned((chunks + group - 1) / group)), kFilterThreads, 0, stream>>>(
        data, vocab, k + 1, group, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
        top_p.const_data_ptr<float>(), max_top_k, grid_plain, ws.sums, ws.cands, ws.acc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grid_plain) {
      split::launch_chained(&plain_pass_kernel<T>, dim3(unsigned(positions), plain_splits(positions, chunks, sms)),
                            kFilterThreads, stream, device, true, data, vocab, chunks, k + 1,
                            temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
                            top_p.const_data_ptr<float>(), ws.sums, seed.const_data_ptr<int64_t>(),
                            offset.const_data_ptr<int64_t>(), false, ws.acc);
    }
    split::launch_chained(&warp_rows_kernel<T>, dim3(unsigned(positions)), kThreads, stream, device, grid_plain, data,
                          k, vocab, chunks, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
                          top_p.const_data_ptr<float>(), max_top_k, ws.sums, ws.cands, grid_plain, ws.acc, ws.warps,
                          ws.split_ok);
    if (grid_plain) {
      split::launch_chained(&plain_stop_kernel<T>, dim3(unsigned(batch), plain_splits(batch, chunks, sms)),
                            kFilterThreads, stream, device, true, data, draft_tokens.const_data_ptr<int64_t>(), q, k,
                            vocab, chunks, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
                            top_p.const_data_ptr<float>(), ws.warps, ws.split_ok, seed.const_data_ptr<int64_t>(),
                            offset.const_data_ptr<int64_t>(), ws.acc);
    }
    split::launch_chained(&verify_kernel<T>, dim3(unsigned(batch)), kThreads, stream, device, grid_plain, data,
                          draft_tokens.const_data_ptr<int64_t>(), q, k, vocab, chunks,
                          temperature.const_data_ptr<float>(), ws.warps, ws.split_ok, ws.sums, ws.cands, ws.acc,
                          seed.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(),
                          out_tokens.data_ptr<int64_t>(), accepted.data_ptr<int32_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("speculative_verify", &speculative_verify_cuda); }

}  // namespace pass_ext
