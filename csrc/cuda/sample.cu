// CUDA kernel of sample: one block per row warps the logits with radix selects (no sort of the vocabulary)
// and draws the token with the exponential race; seed and offset are read on the device (graph-safe).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/sampling_dispatch.cuh"
#include "kernels/sampling.cuh"
#include "op_checks.h"

namespace pass_ext {
namespace {

using namespace sampling;
using namespace sampling::cuda;

// logits [N, V] -> out [N]; probs_out [N, V] (nullable) gets the warped distribution.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T* __restrict__ logits, int vocab, const float* __restrict__ temperature,
                  const int32_t* __restrict__ top_k, const float* __restrict__ top_p, const int64_t* __restrict__ seed,
                  const int64_t* __restrict__ offset, int64_t* __restrict__ out, float* __restrict__ probs_out) {
  __shared__ Scratch s;
  const int64_t n = blockIdx.x;
  const T* row = logits + n * vocab;
  float* probs = probs_out ? probs_out + n * vocab : nullptr;
  const Warp w = warp_row(row, vocab, temperature[n], top_k[n], top_p[n], s);
  int32_t token = w.argmax;
  if (w.one_hot) {
    if (probs)
      for (int j = threadIdx.x; j < vocab; j += blockDim.x) probs[j] = j == w.argmax ? 1.f : 0.f;
  } else {
    const philox::Stream rng(*seed, *offset, kStreamSample, uint32_t(n), 0);
    const int32_t winner = race(row, vocab, rng, [&](float l, int32_t j) {
      const float x = w.weight(l, j);
      if (probs) probs[j] = div_rn(x, w.mass);
      return x;
    }, s);
    if (winner >= 0) token = winner;  // always: the maximum has weight 1
  }
  if (threadIdx.x == 0) out[n] = token;
}

void sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                 const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, at::Tensor& out,
                 const std::optional<at::Tensor>& probs_out) {
  check_sample_args(logits, temperature, top_k, top_p, seed, offset, out, probs_out);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(rows <= INT32_MAX, "logits has too many rows for one launch: ", rows);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda_dispatch::by_logits_dtype(logits, [&](auto* data) {
    sample_kernel<<<unsigned(rows), kThreads, 0, stream>>>(
        data, int(logits.size(1)), temperature.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
        top_p.const_data_ptr<float>(), seed.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(),
        out.data_ptr<int64_t>(), probs_out ? probs_out->data_ptr<float>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("sample", &sample_cuda); }

}  // namespace pass_ext
