// Host side of decode_linear on CUDA, shared by its translation units (kernels/linear.cuh): splits of K, the
// one-wave grid, the staged norm and the launch. launch_mode<T> is instantiated once per dtype in its own file
// (linear_launch_bf16.cu, linear_launch_f16.cu), so that the two dtypes' kernels compile in parallel;
// decode_linear.cu validates and dispatches.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "kernels/linear.cuh"
#include "kernels/linear_bulk.cuh"
#include "launch.h"

namespace pass_ext::linear_launch {

using namespace kernels;

// Splits of K per tile (a cluster of that many blocks): doubled while the grid stays within four blocks per SM
// and every warp of a split keeps two chunks or more. From N, K and the GPU only, never from M (a row's
// result must not depend on the batch). SmolLM2's projections with K = 576 take 1 (18 chunks: too few), its down
// projection (36 tiles, K 1536) 2; Qwen2.5-1.5B's down projection (96 tiles, K 8960) 4; Llama-8B's down
// projection (256 tiles, K 14336) 2, its gate/up projection (1792 tiles) 1.
inline int pick_splits(int tiles, int K, int sms) {
  const int chunks = (K + 31) / 32;
  int splits = 1;
  while (splits < kLinearMaxSplits && int64_t(tiles) * splits * 2 <= 4 * int64_t(sms) &&
         chunks >= 2 * kLinearWarps * splits * 2)
    splits *= 2;
  return splits;
}

// Whether `kernel` may take `bytes` of dynamic shared memory (more than the 48 KB a launch gets without asking),
// once per kernel and device: only where a block can have that on top of the kernel's static shared memory
// (227 KB on sm_90) and the GPU takes the attribute. decode_linear_kernel asks for kLinearStageMaxBytes to stage x
// (otherwise x is never staged); the bulk kernel for its ring and staged x (otherwise it is not used). Each kernel
// asks for one size (the answer is cached per kernel).
template <typename Kernel>
bool takes_smem(Kernel* kernel, int device, int bytes) {
  return once_per_kernel(kernel, device, [&] {
    cudaFuncAttributes attr{};
    const bool ok =
        cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
        attr.sharedSizeBytes + bytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess;
    (void)cudaGetLastError();
    return ok;
  });
}

// Blocks of `kernel` (of `threads` threads) one SM holds at once (two by its launch bounds, unless its shared
// memory says fewer), once per kernel and device; a kernel that stages x is counted with the largest staged x
// (smem), so that its one-wave grid is resident whatever M and K.
template <typename Kernel>
int resident_blocks_per_sm(Kernel* kernel, int device, size_t smem, int threads = kLinearWarps * 32) {
  return once_per_kernel(kernel, device, [&] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
      (void)cudaGetLastError();
      blocks = 1;
    }
    return std::max(blocks, 1);
  });
}

// A/B switches (env_is, launch.h), read at every call (host only), so that one process can compare
// (bench/profile_step.py --ab; a captured graph keeps what it was captured with); the same bits either way:
// PASS_EXT_LINEAR_ONE_WAVE=0: one block per tile, however many waves that makes;
// PASS_EXT_LINEAR_STAGE_X=0: with the RMSNorm, every tile normalises x as it loads it (no staged x);
// PASS_EXT_LINEAR_NORM_ROWS=n (1..kLinearNormRows, default kLinearNormRows): rows of x per round trip of the row
// norms (4 was the only value before). (The PASS_EXT_LINEAR_BULK switches: see bulk_wanted.)
template <typename T, int MT, int kMode, int U, bool kStageX>
void launch_kernel(LinearParams p, int tiles, cudaStream_t stream) {
  p.norm_rows = static_cast<int>(env_int("PASS_EXT_LINEAR_NORM_ROWS", kLinearNormRows, 1, kLinearNormRows));
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
      takes_smem(decode_linear_kernel<T, MT, kMode, U, true>, c10::cuda::current_device(), kLinearStageMaxBytes))
    launch_kernel<T, MT, kMode, U, true>(p, tiles, stream);
  else
    launch_kernel<T, MT, kMode, U, false>(p, tiles, stream);
}

// The bulk kernel (kernels/linear_bulk.cuh) by default: weights of at least kLinearBulkMinMB MiB (smaller ones are
// bound by the launch and the first round trip, where decode_linear_kernel's weights-before-the-wait prefetch
// wins), rows of at least kLinearBulkMinK elements (a shorter row makes tiles of a stage or two, whose sums and
// stores the stream cannot hide), and at most 8 rows of x. Measured on the H200 (bench/NOTES.md, eighteenth H200
// session, with K split over a cluster where the tiles are few), the random Qwen2.5-1.5B's replayed steps against
// decode_linear_kernel: `ar` 1.372 against 1.674 ms at B = 1 and 1.494 against 1.889 at B = 8, the 4-row PaSS step
// 1.517 against 1.610, the 8-row tree step 1.695 against 1.747; but 9 to 16 rows (two n-tiles of x; the down
// projection's x, and from 10 rows gate/up's, past the staging budget, so read again by every tile) ran 1.09x
// (9 rows) and 1.29x (15 rows) the time.
constexpr int64_t kLinearBulkMinMB = 16;
constexpr int64_t kLinearBulkMinK = 1024;
constexpr int64_t kLinearBulkMaxRows = 8;

// Whether a call goes to the bulk kernel: the limits above, each an A/B switch read per call: PASS_EXT_LINEAR_BULK=0
// (never), PASS_EXT_LINEAR_BULK_MIN_MB, PASS_EXT_LINEAR_BULK_MIN_K and PASS_EXT_LINEAR_BULK_MAX_ROWS (up to 16). Where
// the two kernels split K alike (or neither splits: the 1.5B's gate/up) they give the same bits (tests/test_linear.py);
// where decode_linear_kernel splits K further (the 1.5B's down projection: 4 splits, the bulk kernel 2) a token's
// projection differs in the last bits between a forward of at most 8 rows and a longer one (as the lm_head's does on
// cuBLAS).
inline bool bulk_wanted(const LinearParams& p) {
  if (env_is("PASS_EXT_LINEAR_BULK", "0")) return false;
  if (p.M > env_int("PASS_EXT_LINEAR_BULK_MAX_ROWS", kLinearBulkMaxRows, 0, 16)) return false;
  if (p.K < env_int("PASS_EXT_LINEAR_BULK_MIN_K", kLinearBulkMinK, 0, INT32_MAX)) return false;
  const int64_t min_mb = env_int("PASS_EXT_LINEAR_BULK_MIN_MB", kLinearBulkMinMB, 0, int64_t(1) << 20);
  return int64_t(p.N) * p.K * 2 >= (min_mb << 20);
}

// Bytes of staged x the bulk kernel takes at most (on top of its ring, two blocks per SM): x is staged where
// linear_stage_bytes(M, K) fits (Llama-8B's gate/up: up to 3 rows; its down projection: 1 row), else read from L1.
constexpr int kBulkStageMaxBytes = 30 * 1024;

// Launches the bulk kernel; false where it cannot run (not sm_90 code, or the GPU refuses its shared memory), and
// the caller launches decode_linear_kernel. Without splits, one block per resident slot (at most one per tile),
// each taking tiles in turn; with them, one cluster per tile. Neither the grid nor the splits depend on M (the
// residency is counted with the largest staged x, the splits with two blocks per SM), nor, then, a row's bits.
template <typename T, int MT, int kMode, typename Ring, bool kStageX>
bool launch_bulk_ring(const LinearParams& p, int tiles, cudaStream_t stream) {
  auto* kernel = decode_linear_bulk_kernel<T, MT, kMode, Ring, kStageX>;
  const int device = c10::cuda::current_device();
  if (!runs_sm90(kernel, device)) return false;
  constexpr int kMaxSmem = Ring::kBytes + kBulkStageMaxBytes;
  if (!takes_smem(kernel, device, kMaxSmem)) return false;
  const int resident = resident_blocks_per_sm(kernel, device, kMaxSmem, kBulkThreads);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  LinearParams q = p;
  q.tiles = tiles;
  // K split over a cluster where decode_linear_kernel would split it (pick_splits: from N, K and the GPU), as far
  // as the tiles' clusters stay within two blocks per SM; the same splits give decode_linear_kernel's bits. Two per
  // SM whatever this instance's residency (it differs with MT and staging: counted from it, a 16-row call took
  // other splits than a one-row call). The 1.5B's down projection: 96 tiles, 2 splits (192 blocks), 15.2 us per
  // call at one row, 18.8 without. PASS_EXT_LINEAR_BULK_SPLITS=0: never.
  const int slots = 2 * sms;
  int splits = 1;
  if (!env_is("PASS_EXT_LINEAR_BULK_SPLITS", "0"))
    for (const int want = pick_splits(tiles, p.K, sms); splits < want && int64_t(tiles) * splits * 2 <= slots;)
      splits *= 2;
  const int blocks = splits > 1 ? tiles : std::min(tiles, resident * sms);
  const size_t smem = size_t(Ring::kBytes) + (kStageX ? size_t(linear_stage_bytes(p.M, p.K)) : 0);
  launch_kernel_ex(kernel, dim3(unsigned(splits), unsigned(blocks)), dim3(kBulkThreads), smem, stream,
                   dim3(unsigned(splits)), launches_dependent(kernel, device), q);
  return true;
}

template <typename T, int MT, int kMode, typename Ring>
bool launch_bulk_stage(const LinearParams& p, int tiles, cudaStream_t stream) {
  if (linear_stage_bytes(p.M, p.K) <= kBulkStageMaxBytes && !env_is("PASS_EXT_LINEAR_STAGE_X", "0"))
    return launch_bulk_ring<T, MT, kMode, Ring, true>(p, tiles, stream);
  return launch_bulk_ring<T, MT, kMode, Ring, false>(p, tiles, stream);
}

// The ring, with a staged x: 512 K elements per stage and row (a 1 KB bulk copy per row) and 4 stages (two blocks per
// SM), or where K is a multiple of 1024 (no ragged stage) and at most 8 rows, 1024 elements (2 KB copies) and 2 stages
// (one block per SM: those instances take 103-108 registers; the grid follows the occupancy query). Measured per call
// at one row on the H200 (bench_linear, bench/NOTES.md, nineteenth H200 session): Llama-8B's gate/up 62.7 us with 1024
// x 2 against 68.5 with 512 x 4 (cuBLAS 70.3), its layer's projections 117.2 against 127.3 (cuBLAS 131.3); 1024 x 3 and
// 512 x 6 (room for one staged row, or none) and 2048 x 2 (one block per SM) slower per layer. On the 1.5B (K 1536 and
// 8960: ragged stages, and 2 splits of 4480 on the down projection) 1024 x 2 lost: gate/up 23.3 against 19.3, down 19.0
// against 15.2, its `ar` step 1.15x the time. The stage width does not change the order of a warp's additions, so not
// the bits. PASS_EXT_LINEAR_BULK_RING=512 or 1024 forces one (an A/B and test switch), 0 (default) picks by K.
template <typename T, int MT, int kMode>
bool launch_bulk(const LinearParams& p, int tiles, cudaStream_t stream) {
  const int64_t ring = env_int("PASS_EXT_LINEAR_BULK_RING", 0, 0, 1024);
  TORCH_CHECK(ring == 0 || ring == 512 || ring == 1024,
              "PASS_EXT_LINEAR_BULK_RING must be 0 (by K), 512 or 1024, got ", ring);
  if constexpr (MT == 1)
    if (ring == 1024 || (ring == 0 && p.K % 1024 == 0))
      return launch_bulk_stage<T, MT, kMode, BulkRing<1024, 2>>(p, tiles, stream);
  return launch_bulk_stage<T, MT, kMode, BulkRing<512, 4>>(p, tiles, stream);
}

template <typename T, int kMode>
void launch(const LinearParams& p, int tiles, cudaStream_t stream) {
  if (bulk_wanted(p) &&
      (p.M <= 8 ? launch_bulk<T, 1, kMode>(p, tiles, stream) : launch_bulk<T, 2, kMode>(p, tiles, stream)))
    return;
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

// Each instantiated in its own translation unit.
extern template void launch_mode<__nv_bfloat16>(const LinearParams&, int, int, cudaStream_t);
extern template void launch_mode<__half>(const LinearParams&, int, int, cudaStream_t);

}  // namespace pass_ext::linear_launch
