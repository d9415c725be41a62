// decode_linear's CUDA kernel: out[M, N] = x[M, K] W[N, K]^T (+ bias) for the few rows of a decode step
// (M <= 32), optionally SwiGLU-gated (out[M, N/2] = silu(gate) * up, gate rows first, up rows second).
//
// At decode sizes a projection reads its weight once and does almost nothing else, so it is bound by the
// weight bytes and, for a small model, by the launch: cuBLAS's kernels take ~4 us for SmolLM2's 1 MB
// projections. Here every warp streams weight rows straight from global memory into mma.sync operands:
//   - A block owns 16 weight rows (a SwiGLU block: 8 gate rows and their 8 up rows) and all M rows of x.
//     Its 8 warps split K into 32-wide chunks (warp w takes chunks w, w + 8, ...) and add up in shared memory.
//     Where 16-row tiles alone are too few for the GPU (a long K, a small N), K is split over a thread-block
//     cluster of up to 8 blocks that add up through distributed shared memory (sm_90).
//   - The weight is the mma's A operand (16 rows x 16 k), x^T the B operand (16 k x 8 rows of x; up to four
//     n-tiles for M <= 32). A dot product does not care about the order of k, so lane (g, t) loads 16
//     contiguous bytes, k = 32c + 8t .. 8t+7, of weight rows g and g+8 and of x row g, and hands k 8t..8t+3
//     to the first mma of the chunk and 8t+4..8t+7 to the second: every load is a full 16-byte vector, four
//     lanes cover 64 contiguous bytes of a row, and nothing goes through shared memory on the way in.
//   - Weight loads skip L1 (read once); x loads keep it (every warp of every block reads the same x).
// The result of a row of x does not depend on M or on the other rows: each output element sums its k in an
// order fixed by N and K alone (mma k-steps, chunks per warp in order, warps in order, cluster ranks in order). So a one-token forward and a
// multi-token forward project the same token identically.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention_mma.cuh"

namespace pass_ext::kernels {

constexpr int kLinearMaxRows = 32;  // rows of x one call takes (four mma n-tiles)
constexpr int kLinearWarps = 8;
constexpr int kLinearMaxSplits = 8;  // blocks per cluster at most (the portable cluster size)

struct LinearParams {
  const void* x;     // [M, K], rows x_stride elements apart, 16-byte aligned
  const void* w;     // [N, K] contiguous, 16-byte aligned
  const void* bias;  // [N] or nullptr
  void* out;         // [M, N] (SwiGLU: [M, N / 2]), rows out_stride elements apart
  int M, N, K;       // K a multiple of 8
  int64_t x_stride, out_stride;
};

// 16 bytes that are read once: no L1 allocation, so x stays in L1.
__device__ __forceinline__ uint4 load_once(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return float(T(v));
}

// Chunk ranges of K: a tile's chunks are split over `splits` blocks (a thread-block cluster, sm_90) when the
// tiles alone would leave SMs idle (bench/NOTES.md); the launcher picks splits from N and K only, so a row's
// result does not depend on M.
struct ChunkRange {
  int begin, end;
};

__device__ __forceinline__ ChunkRange chunk_range(int K, int split, int splits) {
  const int chunks = (K + 31) / 32;
  return {int(int64_t(chunks) * split / splits), int(int64_t(chunks) * (split + 1) / splits)};
}

// Grid (splits, tiles): blockIdx.y is a tile of 16 weight rows (SwiGLU: 8 gate + 8 up rows), one per
// ceil(N / 16) (SwiGLU: ceil(N / 2 / 8)); blockIdx.x the split of K (cluster rank). MT = ceil(M / 8) n-tiles.
template <typename T, int MT, bool kSwiglu>
__global__ void __launch_bounds__(kLinearWarps * 32, 2) decode_linear_kernel(const LinearParams p) {
  // Chunks per load batch and warp; two batches in flight (the next loads are issued before the current
  // batch's mma), within 128 registers (two blocks per SM).
  constexpr int U = MT == 1 ? 4 : MT == 2 ? 2 : 1;
  constexpr int kStep = kLinearWarps * U;
  __shared__ float red[kLinearWarps][MT][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = int(blockIdx.y);
  // Weight rows of tile rows g and g + 8.
  int r0, r1;
  bool ok0, ok1;
  if constexpr (kSwiglu) {
    const int half = p.N / 2;
    r0 = tile * 8 + g;
    r1 = r0 + half;
    ok0 = ok1 = r0 < half;
  } else {
    r0 = tile * 16 + g;
    r1 = r0 + 8;
    ok0 = r0 < p.N;
    ok1 = r1 < p.N;
  }
  const T* w = static_cast<const T*>(p.w);
  const T* w0 = w + int64_t(ok0 ? r0 : 0) * p.K + t * 8;
  const T* w1 = w + int64_t(ok1 ? r1 : 0) * p.K + t * 8;
  const T* xr[MT];
  bool xok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = mt * 8 + g;
    xok[mt] = m < p.M;
    xr[mt] = static_cast<const T*>(p.x) + int64_t(xok[mt] ? m : 0) * p.x_stride + t * 8;
  }
  const ChunkRange range = chunk_range(p.K, int(blockIdx.x), int(gridDim.x));

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  struct Batch {
    uint4 a[U], b[U], x[U][MT];
  };
  // Loads chunks c, c + 8, ... (U of them) of this warp; chunks past the range load zeros (no memory access).
  auto load = [&](Batch& v, int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kLinearWarps;
      const bool in = c < range.end && c * 32 + t * 8 < p.K;  // K % 8 == 0: a lane's 8 elements are in or out
      v.a[u] = in && ok0 ? load_once(w0 + c * 32) : zero;
      v.b[u] = in && ok1 ? load_once(w1 + c * 32) : zero;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        v.x[u][mt] = in && xok[mt] ? __ldg(reinterpret_cast<const uint4*>(xr[mt] + c * 32)) : zero;
    }
  };
  auto compute = [&](const Batch& v) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t lo[4] = {v.a[u].x, v.b[u].x, v.a[u].y, v.b[u].y};  // k 8t..8t+3 of rows g, g+8
      const uint32_t hi[4] = {v.a[u].z, v.b[u].z, v.a[u].w, v.b[u].w};  // k 8t+4..8t+7
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt], lo, v.x[u][mt].x, v.x[u][mt].y);
        mma_16816<T>(acc[mt], hi, v.x[u][mt].z, v.x[u][mt].w);
      }
    }
  };
  // Chunks in order c = begin + warp, + 8, + 16, ...: batches A and B alternate, each loaded one batch ahead.
  Batch A, B;
  int c = range.begin + warp;
  if (c < range.end) load(A, c);
  while (c < range.end) {
    if (c + kStep < range.end) load(B, c + kStep);
    compute(A);
    c += kStep;
    if (c >= range.end) break;
    if (c + kStep < range.end) load(A, c + kStep);
    compute(B);
    c += kStep;
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[warp][mt][j][lane] = acc[mt][j];
  __syncthreads();
  // Warp mt adds up n-tile mt over the warps, in warp order. s[j]: tile row g (j < 2) or g + 8, x row
  // mt * 8 + 2t + (j & 1).
  const bool active = warp < MT;
  const int mt = active ? warp : 0;
  float s[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    s[j] = 0.f;
#pragma unroll
    for (int v = 0; v < kLinearWarps; ++v) s[j] += red[v][mt][j][lane];
  }
  if (gridDim.x > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The splits of the tile: rank 0 adds every rank's sums, in rank order, through distributed shared memory.
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    __syncthreads();  // every warp has read red: slot [0] is reused for the block's sums
    if (active)
#pragma unroll
      for (int j = 0; j < 4; ++j) red[0][mt][j][lane] = s[j];
    cluster.sync();
    const bool lead = cluster.block_rank() == 0;
    if (lead && active) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j] = 0.f;
        for (int r = 0; r < int(gridDim.x); ++r) s[j] += *cluster.map_shared_rank(&red[0][mt][j][lane], r);
      }
    }
    // Keeps every block's shared memory alive until rank 0 has read it; only reads to order, so relaxed.
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
    cluster.barrier_wait();
    if (!lead) return;
#else
    __trap();  // never launched: the launcher splits only for sm_90 code
#endif
  }
  if (!active) return;
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const float b0 = bias && ok0 ? float(bias[r0]) : 0.f, b1 = bias && ok1 ? float(bias[r1]) : 0.f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = mt * 8 + 2 * t + i;
    if (m >= p.M) continue;
    T* row = out + int64_t(m) * p.out_stride;
    if constexpr (kSwiglu) {
      if (!ok0) continue;
      // The eager chain's roundings: gate and up in T, then silu(gate) * up in float, rounded once.
      const float gate = round_to<T>(s[i] + b0), up = round_to<T>(s[2 + i] + b1);
      row[r0] = T(gate / (1.f + __expf(-gate)) * up);
    } else {
      if (ok0) row[r0] = T(s[i] + b0);
      if (ok1) row[r1] = T(s[2 + i] + b1);
    }
  }
}

}  // namespace pass_ext::kernels
