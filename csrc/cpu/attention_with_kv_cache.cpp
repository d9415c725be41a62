// Plain-loop CPU reference for attention_with_kv_cache: append the new K/V at cache_lens[b], then attend each
// new token to the cached prefix plus the new tokens its tree-mask row allows. Ground truth for the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "op_checks.h"

namespace pass_ext {
namespace {

template <typename scalar_t>
void attention_cpu_impl(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                        at::Tensor& v_cache, const int32_t* lens, const int64_t* mask, double scale, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Q = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_new.size(2), S = k_cache.size(2), G = Hq / Hkv, W = (Q + 63) / 64;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* knp = k_new.data_ptr<scalar_t>();
  const scalar_t* vnp = v_new.data_ptr<scalar_t>();
  scalar_t* kcp = k_cache.data_ptr<scalar_t>();
  scalar_t* vcp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();

  // Append: new token j of row b goes to slot lens[b] + j of every KV head.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Q; ++j)
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t src = ((b * Q + j) * Hkv + h) * D + d, dst = ((b * Hkv + h) * S + lens[b] + j) * D + d;
          kcp[dst] = knp[src];
          vcp[dst] = vnp[src];
        }

  at::parallel_for(0, B * Q * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores;
    std::vector<acc_t> acc(D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t h = idx % Hq, i = (idx / Hq) % Q, b = idx / (Hq * Q), hk = h / G;
      const int64_t L = lens[b];
      const scalar_t* qrow = qp + ((b * Q + i) * Hq + h) * D;
      // Keys: cached slots 0..L-1, then the allowed new tokens (read from k_new, not the cache).
      auto key = [&](int64_t s) -> const scalar_t* {
        return s < L ? kcp + ((b * Hkv + hk) * S + s) * D : knp + ((b * Q + (s - L)) * Hkv + hk) * D;
      };
      auto val = [&](int64_t s) -> const scalar_t* {
        return s < L ? vcp + ((b * Hkv + hk) * S + s) * D : vnp + ((b * Q + (s - L)) * Hkv + hk) * D;
      };
      auto visible = [&](int64_t j) {
        return mask ? ((mask[i * W + j / 64] >> (j % 64)) & 1) != 0 : j <= i;
      };
      scores.assign(L + Q, -INFINITY);
      acc_t mx = -INFINITY;
      for (int64_t s = 0; s < L + Q; ++s) {
        if (s >= L && !visible(s - L)) continue;
        const scalar_t* kr = key(s);
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(qrow[d]) * static_cast<acc_t>(kr[d]);
        scores[s] = dot * static_cast<acc_t>(scale);
        mx = std::max(mx, scores[s]);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t denom = 0;
      if (mx != -INFINITY) {
        for (int64_t s = 0; s < L + Q; ++s) {
          if (scores[s] == -INFINITY) continue;
          const acc_t p = std::exp(scores[s] - mx);
          denom += p;
          const scalar_t* vr = val(s);
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<acc_t>(vr[d]);
        }
      }
      scalar_t* orow = op + ((b * Q + i) * Hq + h) * D;
      // A query that sees no key at all (empty cache, empty mask row) outputs zeros rather than NaN.
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(denom > 0 ? acc[d] / denom : acc_t(0));
    }
  });
}

void attention_with_kv_cache_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_lens,
                                 const std::optional<at::Tensor>& tree_mask, double scale, at::Tensor& out,
                                 bool /*prefetch_cache*/) {
  check_attention_args(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, out);
  const int64_t B = q.size(0), Q = q.size(1), S = k_cache.size(2);
  const int32_t* lens = cache_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 0 && lens[b] + Q <= S, "cache_lens[", b, "] = ", lens[b], " plus Q = ", Q,
                " new tokens exceeds the cache capacity S_max = ", S, " (nothing was written)");
  const int64_t* mask = tree_mask.has_value() ? tree_mask->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_with_kv_cache_cpu", [&] {
    attention_cpu_impl<scalar_t>(q.contiguous(), k_new.contiguous(), v_new.contiguous(), k_cache, v_cache, lens, mask,
                                 scale, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CPU, m) { m.impl("attention_with_kv_cache", &attention_with_kv_cache_cpu); }

}  // namespace pass_ext
