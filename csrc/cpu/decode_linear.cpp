// Plain-loop CPU reference for decode_linear: each output element is the float (float64 for float64 inputs)
// sum over k in order, plus the bias, rounded to the dtype; SwiGLU rounds gate and up to the dtype, then
// rounds silu(gate) * up once; the rotary embedding rotates the rounded pairs by cos/sin rounded to the dtype,
// rounding once; a residual is added to the rounded product, rounding once; an RMSNorm of x comes first, with
// the model's roundings. Ground truth for the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "op_checks.h"

namespace pass_ext {
namespace {

// Rotary embedding of a fused projection: rows [0, rope_rows) are heads of `dim` channels; channel j < dim / 2
// of a head pairs with j + dim / 2.
struct Rope {
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int64_t* positions = nullptr;
  int64_t dim = 0, rows = 0, table = 0;
};

template <typename scalar_t>
void decode_linear_cpu_impl(const at::Tensor& x_in, const at::Tensor& weight, const scalar_t* bias, bool swiglu,
                            const Rope& rope, const scalar_t* norm_w, double eps, const scalar_t* residual,
                            at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0), n_out = out.size(1);
  at::Tensor x = x_in;
  if (norm_w) {
    // RMSNorm first, with the model's roundings: x * rsqrt(mean(x^2) + eps) in acc_t, rounded, times the weight,
    // rounded.
    x = at::empty({M, K}, x_in.options());
    const scalar_t* src = x_in.data_ptr<scalar_t>();
    scalar_t* dst = x.data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {
      acc_t ss = 0;
      for (int64_t k = 0; k < K; ++k) ss += acc_t(src[m * x_in.stride(0) + k]) * acc_t(src[m * x_in.stride(0) + k]);
      const acc_t r = acc_t(1) / std::sqrt(ss / acc_t(K) + acc_t(eps));
      for (int64_t k = 0; k < K; ++k)
        dst[m * K + k] = scalar_t(acc_t(norm_w[k]) * acc_t(scalar_t(acc_t(src[m * x_in.stride(0) + k]) * r)));
    }
  }
  const int64_t xs = x.stride(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  // Row n of the product, rounded to the dtype.
  auto dot = [&](int64_t m, int64_t n) {
    acc_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += acc_t(xp[m * xs + k]) * acc_t(wp[n * K + k]);
    if (bias) s += acc_t(bias[n]);
    return acc_t(scalar_t(s));
  };
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = begin; n < end; ++n) {
        if (rope.cos && n < rope.rows) {
          // The projection rounded to the dtype, cos/sin rounded to the dtype, the rotation in acc_t, rounded once.
          const int64_t j = n % rope.dim, half = rope.dim / 2, pair = j < half ? n + half : n - half;
          const int64_t pos = std::min(std::max(rope.positions[m], int64_t(0)), rope.table - 1);
          const acc_t c = acc_t(scalar_t(rope.cos[pos * rope.dim + j]));
          const acc_t sn = acc_t(scalar_t(rope.sin[pos * rope.dim + j]));
          const acc_t self = dot(m, n), other = dot(m, pair);
          op[m * n_out + n] = scalar_t(j < half ? self * c - other * sn : self * c + other * sn);
          continue;
        }
        if (!swiglu) {
          op[m * n_out + n] = residual ? scalar_t(acc_t(residual[m * N + n]) + dot(m, n)) : scalar_t(dot(m, n));
          continue;
        }
        const acc_t gate = dot(m, n), up = dot(m, n + N / 2);
        op[m * n_out + n] = scalar_t(gate / (acc_t(1) + std::exp(-gate)) * up);
      }
  });
}

void decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool swiglu, const std::optional<at::Tensor>& rope_cos,
                       const std::optional<at::Tensor>& rope_sin, const std::optional<at::Tensor>& positions,
                       int64_t rope_rows, const std::optional<at::Tensor>& norm_weight, double eps,
                       const std::optional<at::Tensor>& residual, at::Tensor& out, bool /*prefetch_weights*/) {
  check_linear_args(x, weight, bias, swiglu, rope_cos, rope_sin, positions, rope_rows, norm_weight, eps, residual,
                    out);
  if (x.size(0) == 0) return;
  Rope rope;
  if (rope_cos) {
    rope = {rope_cos->data_ptr<float>(), rope_sin->data_ptr<float>(), positions->data_ptr<int64_t>(),
            rope_cos->size(1), rope_rows, rope_cos->size(0)};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "decode_linear_cpu", [&] {
    decode_linear_cpu_impl<scalar_t>(x, weight, bias ? bias->data_ptr<scalar_t>() : nullptr, swiglu, rope,
                                     norm_weight ? norm_weight->data_ptr<scalar_t>() : nullptr, eps,
                                     residual ? residual->data_ptr<scalar_t>() : nullptr, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

}  // namespace pass_ext
