// CUDA entry of decode_linear (kernels/linear.cuh): bf16/fp16, at most kLinearMaxRows rows of x, K a multiple of
// 8, 16-byte aligned x rows and weight; callers with other shapes use torch's linear. Validates and hands the call
// to the launch for its dtype (linear_launch.cuh), each compiled in its own file.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "linear_launch.cuh"
#include "op_checks.h"
#include "trace.h"

namespace pass_ext {
namespace {

using namespace kernels;

void decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool swiglu, const std::optional<at::Tensor>& rope_cos,
                        const std::optional<at::Tensor>& rope_sin, const std::optional<at::Tensor>& positions,
                        int64_t rope_rows, const std::optional<at::Tensor>& norm_weight, double eps,
                        const std::optional<at::Tensor>& residual, at::Tensor& out, bool prefetch_weights) {
  check_linear_args(x, weight, bias, swiglu, rope_cos, rope_sin, positions, rope_rows, norm_weight, eps, residual,
                    out);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "decode_linear on CUDA takes bfloat16 or float16 x, got ",
              dtype, " (use torch.nn.functional.linear)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M <= kLinearMaxRows, "decode_linear on CUDA takes at most ", kLinearMaxRows, " rows of x (M), got ", M,
              " (use torch.nn.functional.linear)");
  TORCH_CHECK(K % 8 == 0, "decode_linear on CUDA needs K (x.size(1)) a multiple of 8, got ", K);
  TORCH_CHECK(N <= INT32_MAX && K <= INT32_MAX, "weight is too large for decode_linear: ", weight.sizes());
  TORCH_CHECK(M <= 1 || x.stride(0) % 8 == 0, "decode_linear on CUDA needs x's row stride a multiple of 8 "
              "elements (16 bytes), got ", x.stride(0));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              "decode_linear on CUDA needs 16-byte aligned x and weight");
  if (M == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LinearParams p;
  p.x = x.data_ptr();
  p.w = weight.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.x_stride = M > 1 ? x.stride(0) : K;
  p.out_stride = out.size(1);
  const int64_t tiles = swiglu ? (N / 2 + 7) / 8 : (N + 15) / 16;
  TORCH_CHECK(tiles <= 65535, "decode_linear on CUDA takes at most ", 65535 * 16,
              " weight rows, got ", N);
  const bool rope = rope_cos.has_value();
  TORCH_CHECK(!rope || rope_cos->size(1) % 16 == 0, "decode_linear on CUDA needs the rotary head dim "
              "(rope_cos.size(1)) a multiple of 16, got ", rope_cos->size(1));
  if (rope) {
    p.rope_cos = rope_cos->data_ptr<float>();
    p.rope_sin = rope_sin->data_ptr<float>();
    p.positions = positions->data_ptr<int64_t>();
    p.rope_dim = int(rope_cos->size(1));
    p.rope_rows = int(rope_rows);
    p.rope_positions = int(std::min<int64_t>(rope_cos->size(0), INT32_MAX));
  } else {
    p.rope_cos = p.rope_sin = nullptr;
    p.positions = nullptr;
    p.rope_dim = p.rope_rows = p.rope_positions = 0;
  }
  p.norm_w = norm_weight ? norm_weight->data_ptr() : nullptr;
  p.eps = float(eps);
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.prefetch_weights = prefetch_weights ? 1 : 0;
  p.trace = reinterpret_cast<unsigned long long*>(next_trace_slot());
  TORCH_CHECK(!norm_weight || reinterpret_cast<uintptr_t>(norm_weight->data_ptr()) % 16 == 0,
              "decode_linear on CUDA needs a 16-byte aligned norm_weight");
  TORCH_CHECK(!norm_weight || M <= 1 || x.stride(0) % 8 == 0, "decode_linear's RMSNorm needs x's row stride a "
              "multiple of 8");
  const int mode = swiglu ? kLinearSwiglu : rope ? kLinearRope : kLinearPlain;
  if (dtype == at::kBFloat16) {
    linear_launch::launch_mode<__nv_bfloat16>(p, int(tiles), mode, stream);
  } else {
    linear_launch::launch_mode<__half>(p, int(tiles), mode, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("decode_linear", &decode_linear_cuda); }

}  // namespace pass_ext
