// CUDA kernels of sample. filter_kernel reads every row once, one block per chunk of the vocabulary (argmax
// and top-k candidates, see "Split rows" in sampling.cuh); plain_pass_kernel adds up plain rows' masses and races
// over the whole grid ("Plain rows"); finish_kernel warps each row from those candidates or sums (or, when they do
// not suffice, with one-block radix selects over the row) and draws the token with the exponential race;
// probs_kernel writes the warped distribution when asked. Seed and offset are read on the device (graph-safe).
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

// One block per row: the warp (into warps[n]) and the token.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const T* __restrict__ logits, int vocab, int chunks, const float* __restrict__ temperature,
                  const int32_t* __restrict__ top_k, const float* __restrict__ top_p, int max_top_k,
                  const ChunkSummary* __restrict__ sums, const Candidate* __restrict__ cands,
                  const int64_t* __restrict__ seed, const int64_t* __restrict__ offset, bool grid_plain,
                  const PlainAcc* __restrict__ acc, int64_t* __restrict__ out, Warp* __restrict__ warps) {
  __shared__ Scratch s;
  __shared__ ListScratch list;
  const int64_t n = blockIdx.x;
  const T* row = logits + n * vocab;
  const ChunkSummary* row_sums = sums + n * chunks;
  const Candidate* row_cands = cands + n * chunks * kChunkCands;
  Warp w;
  const bool split =
      split_warp(vocab, temperature[n], top_k[n], top_p[n], max_top_k, row_sums, chunks, row_cands, s, list, w,
                 grid_plain, acc + n);
  // A plain row's mass and draw come from the grid-wide pass (split_warp leaves such a row unsplit, not one-hot).
  const bool plain = !split && grid_plain && plain_row(temperature[n], top_k[n], top_p[n], vocab);
  if (plain) w.mass = float(double(acc[n].mass) * kMassUnit);
  else if (!split) w = warp_row(row, vocab, temperature[n], top_k[n], top_p[n], s);
  int32_t token = w.argmax;
  if (plain) {
    const int32_t winner = race_winner(acc[n].race);
    if (winner >= 0) token = winner;  // always: the maximum has weight 1
  } else if (!w.one_hot) {
    const philox::Stream rng(*seed, *offset, kStreamSample, uint32_t(n), 0);
    auto weight = [&](float l, int32_t j) { return w.weight(l, j); };
    const int32_t winner = split ? race_list(list, rng, weight, s)
                                 : race(row, vocab, rng, weight, s);
    if (winner >= 0) token = winner;  // always: the maximum has weight 1
  }
  if (threadIdx.x == 0) {
    out[n] = token;
    if (warps) warps[n] = w;
  }
}

// Grid (rows, chunks): the warped distribution of each row.
template <typename T>
__global__ void __launch_bounds__(kFilterThreads)
    probs_kernel(const T* __restrict__ logits, int vocab, const Warp* __restrict__ warps, float* __restrict__ probs) {
  const int64_t n = blockIdx.x;
  const Warp w = warps[n];
  const int end = min(vocab, int(blockIdx.y + 1) * kChunk);
  for (int j = int(blockIdx.y) * kChunk + threadIdx.x; j < end; j += blockDim.x)
    probs[n * vocab + j] = w.one_hot ? (j == w.argmax ? 1.f : 0.f) : w.prob(to_float(logits[n * vocab + j]), j);
}

void sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                 const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, at::Tensor& out,
                 const std::optional<at::Tensor>& probs_out) {
  check_sample_args(logits, temperature, top_k, top_p, seed, offset, out, probs_out);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(rows <= INT32_MAX, "logits has too many rows for one launch: ", rows);
  if (rows == 0) return;
  const int vocab = int(logits.size(1)), chunks = chunks_of(vocab);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const split::Workspace ws(logits, rows, chunks);
  const int device = logits.get_device();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int max_top_k = split::max_top_k();
  const bool grid_plain = split::grid_plain();
  const int group = split::filter_group(rows, chunks, sms);
  cuda_dispatch::by_logits_dtype(logits, [&](auto* data) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    filter_kernel<<<dim3(unsigned(rows), unsigned((chunks + group - 1) / group)), kFilterThreads, 0, stream>>>(
        data, vocab, 1, group, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
        top_p.const_data_ptr<float>(), max_top_k, grid_plain, ws.sums, ws.cands, ws.acc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grid_plain) {
      split::launch_chained(&plain_pass_kernel<T>, dim3(unsigned(rows), plain_splits(rows, chunks, sms)),
                            kFilterThreads, stream, device, true, data, vocab, chunks, 1,
                            temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
                            top_p.const_data_ptr<float>(), ws.sums, seed.const_data_ptr<int64_t>(),
                            offset.const_data_ptr<int64_t>(), true, ws.acc);
    }
    // An ordinary launch: chained after the plain-row pass, it made top-k rows' calls slower (24.4 -> 28.3 µs at
    // B = 1 on the H200, bench/NOTES.md).
    split::launch_chained(&finish_kernel<T>, dim3(unsigned(rows)), kThreads, stream, device, false, data, vocab,
                          chunks, temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
                          top_p.const_data_ptr<float>(), max_top_k, ws.sums, ws.cands,
                          seed.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(), grid_plain, ws.acc,
                          out.data_ptr<int64_t>(), ws.warps);
    if (probs_out) {
      probs_kernel<<<dim3(unsigned(rows), unsigned(chunks)), kFilterThreads, 0, stream>>>(
          data, vocab, ws.warps, probs_out->data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("sample", &sample_cuda); }

}  // namespace pass_ext
