// CUDA launcher of decode_linear (kernels/linear.cuh): bf16/fp16, at most kLinearMaxRows rows of x, K a
// multiple of 8, 16-byte aligned x rows and weight. Callers with other shapes use torch's linear.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels/linear.cuh"
#include "launch.h"
#include "op_checks.h"

namespace pass_ext {
namespace {

using namespace kernels;

// Splits of K per tile (a cluster of that many blocks): doubled while the grid stays within four blocks per SM
// and every warp of a split keeps two chunks or more. From N, K and the GPU only, never from M (a row's
// result must not depend on the batch). SmolLM2's projections with K = 576 take 1 (18 chunks: too few), its down
// projection (36 tiles, K 1536) 2; Qwen2.5-1.5B's down projection (96 tiles, K 8960) 4; Llama-8B's down
// projection (256 tiles, K 14336) 2, its gate/up projection (1792 tiles) 1.
int pick_splits(int tiles, int K, int sms) {
  const int chunks = (K + 31) / 32;
  int splits = 1;
  while (splits < kLinearMaxSplits && int64_t(tiles) * splits * 2 <= 4 * int64_t(sms) &&
         chunks >= 2 * kLinearWarps * splits * 2)
    splits *= 2;
  return splits;
}

// Whether `kernel` may take kLinearStageMaxBytes of dynamic shared memory for a staged x (more than the 48 KB a
// launch gets without asking), once per kernel and device: only where a block can have that on top of the
// kernel's static shared memory (227 KB on sm_90) and the GPU takes the attribute; otherwise x is never staged.
template <typename Kernel>
bool stages_x(Kernel* kernel, int device) {
  return once_per_kernel(kernel, device, [&] {
    cudaFuncAttributes attr{};
    const bool ok =
        cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
        attr.sharedSizeBytes + kLinearStageMaxBytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kLinearStageMaxBytes) == cudaSuccess;
    (void)cudaGetLastError();
    return ok;
  });
}

// Blocks of `kernel` one SM holds at once (two by its launch bounds, unless its shared memory says fewer), once
// per kernel and device; a kernel that stages x is counted with the largest staged x (smem), so that its one-wave
// grid is resident whatever M and K.
template <typename Kernel>
int resident_blocks_per_sm(Kernel* kernel, int device, size_t smem) {
  return once_per_kernel(kernel, device, [&] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kLinearWarps * 32, smem) != cudaSuccess) {
      (void)cudaGetLastError();
      blocks = 1;
    }
    return std::max(blocks, 1);
  });
}

// A/B switches, read at every call (host only), so that one process can compare (bench/profile_step.py --ab;
// a captured graph keeps what it was captured with); the same bits either way:
// PASS_EXT_LINEAR_ONE_WAVE=0: one block per tile, however many waves that makes;
// PASS_EXT_LINEAR_STAGE_X=0: with the RMSNorm, every tile normalises x as it loads it (no staged x).
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

template <typename T, int MT, int kMode, int U, bool kStageX>
void launch_kernel(LinearParams p, int tiles, cudaStream_t stream) {
  auto* kernel = decode_linear_kernel<T, MT, kMode, U, kStageX>;
  const int device = c10::cuda::current_device();
  const bool sm90 = runs_sm90(kernel, device);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits = sm90 ? pick_splits(tiles, p.K, sms) : 1;
  // At most one wave of blocks: past it, resident blocks take several tiles each (see the kernel).
  const int resident = resident_blocks_per_sm(kernel, device, kStageX ? kLinearStageMaxBytes : 0);
  const int blocks =
      env_is("PASS_EXT_LINEAR_ONE_WAVE", "0") ? tiles : std::min(tiles, std::max(1, resident * sms / splits));
  p.tiles = tiles;
  const size_t smem = kStageX ? size_t(linear_stage_bytes(p.M, p.K)) : 0;
  // Dependent launch: the kernel streams its first weights in before it waits for x (the kernel before it).
  launch_kernel_ex(kernel, dim3(unsigned(splits), unsigned(blocks)), dim3(kLinearWarps * 32), smem, stream,
                   dim3(unsigned(splits)), launches_dependent(kernel, device), p);
}

// With the RMSNorm, x normalised once per block in shared memory where it fits (the kernel's kStageX).
template <typename T, int MT, int kMode, int U>
void launch_mt(const LinearParams& p, int tiles, cudaStream_t stream) {
  if (p.norm_w != nullptr && linear_stage_bytes(p.M, p.K) <= kLinearStageMaxBytes &&
      !env_is("PASS_EXT_LINEAR_STAGE_X", "0") &&
      stages_x(decode_linear_kernel<T, MT, kMode, U, true>, c10::cuda::current_device()))
    launch_kernel<T, MT, kMode, U, true>(p, tiles, stream);
  else
    launch_kernel<T, MT, kMode, U, false>(p, tiles, stream);
}

template <typename T, int kMode>
void launch(const LinearParams& p, int tiles, cudaStream_t stream) {
  switch ((p.M + 7) / 8) {
    case 1: launch_mt<T, 1, kMode, 3>(p, tiles, stream); break;
    case 2: launch_mt<T, 2, kMode, 2>(p, tiles, stream); break;
    case 3: launch_mt<T, 3, kMode, 1>(p, tiles, stream); break;
    default: launch_mt<T, 4, kMode, 1>(p, tiles, stream); break;
  }
}

template <typename T>
void launch_mode(const LinearParams& p, int tiles, int mode, cudaStream_t stream) {
  if (mode == kLinearSwiglu) launch<T, kLinearSwiglu>(p, tiles, stream);
  else if (mode == kLinearRope) launch<T, kLinearRope>(p, tiles, stream);
  else launch<T, kLinearPlain>(p, tiles, stream);
}

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
  TORCH_CHECK(!norm_weight || reinterpret_cast<uintptr_t>(norm_weight->data_ptr()) % 16 == 0,
              "decode_linear on CUDA needs a 16-byte aligned norm_weight");
  TORCH_CHECK(!norm_weight || M <= 1 || x.stride(0) % 8 == 0, "decode_linear's RMSNorm needs x's row stride a "
              "multiple of 8");
  const int mode = swiglu ? kLinearSwiglu : rope ? kLinearRope : kLinearPlain;
  if (dtype == at::kBFloat16) {
    launch_mode<__nv_bfloat16>(p, int(tiles), mode, stream);
  } else {
    launch_mode<__half>(p, int(tiles), mode, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pass_ext, CUDA, m) { m.impl("decode_linear", &decode_linear_cuda); }

}  // namespace pass_ext
