// CPU kernel of speculative_verify: per row, accept drafts with the speculative-sampling rule (greedy rows:
// while the draft is the argmax), then emit the correction or bonus token; same Philox numbers as CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/warp_cpu.h"
#include "op_checks.h"

namespace pass_ext {
namespace {

template <typename scalar_t>
void verify_cpu_impl(const at::Tensor& target_logits, const int64_t* drafts, const float* draft_probs,
                     const float* temperature, const int32_t* top_k, const float* top_p, int64_t seed,
                     int64_t offset, int64_t* out_tokens, int32_t* accepted) {
  using namespace sampling;
  const int64_t batch = target_logits.size(0), k = target_logits.size(1) - 1, vocab = target_logits.size(2);
  const scalar_t* base = target_logits.data_ptr<scalar_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    cpu::KeyMass scratch;
    for (int64_t b = begin; b < end; ++b) {
      const bool greedy = is_greedy(temperature[b]);
      const uint32_t row_index = static_cast<uint32_t>(b);
      int64_t acc = 0, token = 0;
      for (int64_t i = 0; i <= k; ++i) {
        const scalar_t* row = base + (b * (k + 1) + i) * vocab;
        const Warp w = cpu::warp_row(row, vocab, temperature[b], top_k[b], top_p[b], scratch);
        const uint32_t draw = static_cast<uint32_t>(i);
        if (i == k) {  // every draft accepted: the bonus token
          token = greedy ? w.argmax : cpu::race(row, vocab, philox::Stream(seed, offset, kStreamResidual, row_index, draw),
                                                [&](float l, int32_t j) { return w.weight(l, j); });
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
        const float* q = draft_probs ? draft_probs + (b * k + i) * vocab : nullptr;
        const float p_d = valid ? w.prob(static_cast<float>(row[d]), static_cast<int32_t>(d)) : 0.f;
        const float q_d = valid ? (q ? q[d] : 1.f) : 0.f;
        const float u = philox::Stream(seed, offset, kStreamAccept, row_index, draw).uniform(0);
        if (valid && mul_rn(u, q_d) < p_d) {
          ++acc;
          continue;
        }
        // Rejected: draw from norm(max(0, p - q)), or from p when that residual has no mass.
        const philox::Stream rng(seed, offset, kStreamResidual, row_index, draw);
        int32_t t = cpu::race(row, vocab, rng, [&](float l, int32_t j) {
          const float r = w.prob(l, j) - (q ? q[j] : (j == d ? 1.f : 0.f));
          return r > 0.f ? r : 0.f;
        });
        if (t < 0) t = cpu::race(row, vocab, rng, [&](float l, int32_t j) { return w.weight(l, j); });
        token = t >= 0 ? t : w.argmax;
        break;
      }
      int64_t* o = out_tokens + b * (k + 1);
      for (int64_t i = 0; i <= k; ++i) o[i] = i < acc ? drafts[b * k + i] : (i == acc ? token : -1);
      accepted[b] = static_cast<int32_t>(acc);
    }
  });
}

void speculative_verify_cpu(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                            const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
                            const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& seed,
                            const at::Tensor& offset, at::Tensor& out_tokens, at::Tensor& accepted) {
  check_verify_args(target_logits, draft_tokens, draft_probs, temperature, top_k, top_p, seed, offset, out_tokens,
                    accepted);
  if (target_logits.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, target_logits.scalar_type(), "speculative_verify_cpu", [&] {
    verify_cpu_impl<scalar_t>(target_logits, draft_tokens.data_ptr<int64_t>(),
                              draft_probs ? draft_probs->data_ptr<float>() : nullptr, temperature.data_ptr<float>(),
                              top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(), seed.data_ptr<int64_t>()[0],
                              offset.data_ptr<int64_t>()[0], out_tokens.data_ptr<int64_t>(),
                              accepted.data_ptr<int32_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CPU, m) { m.impl("speculative_verify", &speculative_verify_cpu); }

}  // namespace pass_ext
