// CPU kernel of sample: warp each row of logits (kernels/sampling.cuh) and draw one token with the
// exponential race on the same Philox numbers as the CUDA kernel; optionally write the warped distribution.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/warp_cpu.h"
#include "op_checks.h"

namespace pass_ext {
namespace {

// Known-answer vectors of Philox4x32-10 (Random123 kat_vectors): the host and device generator is the
// reference algorithm, checked at compile time.
static_assert(philox::philox4x32_10({{0u, 0u, 0u, 0u}}, 0u, 0u).v[0] == 0x6627e8d5u &&
              philox::philox4x32_10({{0u, 0u, 0u, 0u}}, 0u, 0u).v[3] == 0x9b00dbd8u);
static_assert(philox::philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u,
                                    0x299f31d0u).v[0] == 0xd16cfe09u &&
              philox::philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u,
                                    0x299f31d0u).v[3] == 0x24126ea1u);

template <typename scalar_t>
void sample_cpu_impl(const at::Tensor& logits, const float* temperature, const int32_t* top_k, const float* top_p,
                     int64_t seed, int64_t offset, int64_t* out, float* probs_out) {
  using namespace sampling;
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    cpu::KeyMass scratch;
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = base + n * vocab;
      float* probs = probs_out ? probs_out + n * vocab : nullptr;
      const Warp w = cpu::warp_row(row, vocab, temperature[n], top_k[n], top_p[n], scratch);
      if (w.one_hot) {
        out[n] = w.argmax;
        if (probs)
          for (int64_t j = 0; j < vocab; ++j) probs[j] = j == w.argmax ? 1.f : 0.f;
        continue;
      }
      const philox::Stream rng(seed, offset, kStreamSample, static_cast<uint32_t>(n), 0);
      const int32_t token = cpu::race(row, vocab, rng, [&](float l, int32_t j) {
        const float x = w.weight(l, j);
        if (probs) probs[j] = div_rn(x, w.mass);
        return x;
      });
      out[n] = token >= 0 ? token : w.argmax;  // the maximum always has weight 1, so the race has a winner
    }
  });
}

void sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, at::Tensor& out,
                const std::optional<at::Tensor>& probs_out) {
  check_sample_args(logits, temperature, top_k, top_p, seed, offset, out, probs_out);
  if (logits.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_cpu", [&] {
    sample_cpu_impl<scalar_t>(logits, temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(),
                              top_p.data_ptr<float>(), seed.data_ptr<int64_t>()[0], offset.data_ptr<int64_t>()[0],
                              out.data_ptr<int64_t>(), probs_out ? probs_out->data_ptr<float>() : nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace pass_ext
