// Plain-loop CPU reference for decode_linear: each output element is the float (float64 for float64 inputs)
// sum over k in order, plus the bias, rounded to the dtype; SwiGLU rounds gate and up to the dtype, then
// rounds silu(gate) * up once. Ground truth for the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "op_checks.h"

namespace pass_ext {
namespace {

template <typename scalar_t>
void decode_linear_cpu_impl(const at::Tensor& x, const at::Tensor& weight, const scalar_t* bias, bool swiglu,
                            at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n_out = out.size(1);
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
        if (!swiglu) {
          op[m * n_out + n] = scalar_t(dot(m, n));
          continue;
        }
        const acc_t gate = dot(m, n), up = dot(m, n + N / 2);
        op[m * n_out + n] = scalar_t(gate / (acc_t(1) + std::exp(-gate)) * up);
      }
  });
}

void decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool swiglu, at::Tensor& out) {
  check_linear_args(x, weight, bias, swiglu, out);
  if (x.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "decode_linear_cpu", [&] {
    decode_linear_cpu_impl<scalar_t>(x, weight, bias ? bias->data_ptr<scalar_t>() : nullptr, swiglu, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

}  // namespace pass_ext
