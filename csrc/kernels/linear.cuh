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
//   - The grid holds at most one wave of blocks; with more tiles than that, each block takes several in turn
//     and issues the next tile's first weights before the current tile's sums and stores, so the wait, the row
//     norms and the first x loads are paid once per block, not once per tile.
// Optional fusions at the ends: the RMSNorm of x before the product (every block computes the row norms; rows
// are a small model's d), the residual add, SwiGLU or the rotary embedding after it. With the norm, a block
// normalises its x once into shared memory when that fits (kStageX) and its tiles read x from there;
// otherwise every tile's loads normalise x again.
// The result of a row of x does not depend on M or on the other rows: each output element sums its k in an
// order fixed by N and K alone (mma k-steps, chunks per warp in order, warps in order, cluster ranks in order).
// So a one-token forward and a multi-token forward project the same token identically.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention_mma.cuh"
#include "pdl.cuh"
#include "trace.h"

namespace pass_ext::kernels {

constexpr int kLinearMaxRows = 32;  // rows of x one call takes (four mma n-tiles)
constexpr int kLinearWarps = 8;
constexpr int kLinearMaxSplits = 8;  // blocks per cluster at most (the portable cluster size)
// Dynamic shared memory a block may take for its normalised x (kStageX): rows of K elements plus 64 bytes, so
// that the rows of one 16-byte load phase (x rows g and g + 1) fall in different banks.
constexpr int kLinearStageMaxBytes = 64 * 1024;
constexpr int kLinearStagePad = 4;  // 16-byte chunks after each staged row
// Rows of x whose row norms one round trip to L2 serves at most (LinearParams::norm_rows): a tree or fused PaSS
// step of 5..8 rows paid two dependent round trips before its first mma when this was 4 (bench/NOTES.md). Only
// the instances of at most 8 rows that stage x take 8; the others keep 4 (ptxas: 8 spilled 4-84 bytes there).
constexpr int kLinearNormRows = 8;

// Bytes of the staged x of M rows of K elements (the launcher stages when it is at most kLinearStageMaxBytes).
__host__ __device__ constexpr int64_t linear_stage_bytes(int64_t M, int64_t K) {
  return M * (K / 8 + kLinearStagePad) * 16;
}

struct LinearParams {
  const void* x;     // [M, K], rows x_stride elements apart, 16-byte aligned
  const void* w;     // [N, K] contiguous, 16-byte aligned
  const void* bias;  // [N] or nullptr
  void* out;         // [M, N] (SwiGLU: [M, N / 2]), rows out_stride elements apart
  int M, N, K;       // K a multiple of 8
  int64_t x_stride, out_stride;
  // Rotary embedding of a fused q/k/v projection (kRope): weight rows [0, rope_rows) are heads of rope_dim
  // channels that get rotated by the angles of their token's position; rows past them (v) are not.
  const float* rope_cos;     // [rope_positions, rope_dim] float32
  const float* rope_sin;
  const int64_t* positions;  // [M]; clamped to the table
  int rope_dim, rope_rows, rope_positions;
  // RMSNorm of x before the product (norm_w [K], or nullptr): x_k -> T(w_k * T(x_k * rsqrt(mean(x^2) + eps))).
  const void* norm_w;
  float eps;
  // Residual added to the product (plain mode; [M, N] contiguous, or nullptr): out = T(residual + T(product)).
  const void* residual;
  // Tiles of 16 weight rows in all (see the kernel); the grid may have fewer blocks, each taking several.
  int tiles;
  // 1: under a dependent launch (pdl.cuh) the first weights and the bias are read before the wait for the kernel
  // before, which therefore must not write them; 0: everything waits.
  int prefetch_weights;
  // With the RMSNorm: rows of x whose squares a block sums per round trip to L2, 1..kLinearNormRows (the launcher
  // sets it; fewer only for A/Bs; an instance may cap it lower). A row's sum keeps one order, fixed by K, whatever
  // the value.
  int norm_rows;
  unsigned long long* trace;  // a trace build's slot for this launch (csrc/trace.h), or nullptr
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return float(T(v));
}

// 8 elements of row m (a 16-byte load) through the RMSNorm: the model's roundings (the scaled row in T, then
// the weight times it in T).
template <typename T>
__device__ __forceinline__ uint4 rms_normalize(uint4 v, float rinv, uint4 w) {
  uint32_t in[4] = {v.x, v.y, v.z, v.w}, wt[4] = {w.x, w.y, w.z, w.w}, res[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 a, b;
    if constexpr (std::is_same_v<T, __half>) {
      a = __half22float2(*reinterpret_cast<const __half2*>(&in[i]));
      b = __half22float2(*reinterpret_cast<const __half2*>(&wt[i]));
    } else {
      a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&in[i]));
      b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wt[i]));
    }
    res[i] = pack2<T>(b.x * round_to<T>(a.x * rinv), b.y * round_to<T>(a.y * rinv));
  }
  return make_uint4(res[0], res[1], res[2], res[3]);
}

// 1 / rms of every row of x (rinv[m], m < p.M), computed by the block's first kLinearWarps warps: their threads
// split each row's K (one 16-byte load per thread and 2048 elements), kRows rows at a time (at_once of them, at most
// kRows) so that their loads are in flight together; then per row the warps' sums in warp order. An order fixed by
// K, so a row's norm depends neither on M nor on at_once, and every kernel that calls this gets the same bits.
// sync() is a barrier over those warps; part is the warps' scratch.
template <typename T, int kRows, typename Sync>
__device__ __forceinline__ void rms_row_inverses(const LinearParams& p, int at_once,
                                                 float (&part)[kLinearWarps][kLinearMaxRows],
                                                 float (&rinv)[kLinearMaxRows], Sync sync) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int m0 = 0; m0 < p.M; m0 += at_once) {
    float ss[kRows] = {};
    for (int k = int(threadIdx.x) * 8; k < p.K; k += kLinearWarps * 32 * 8) {
      uint4 v[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
        v[i] = i < at_once && m0 + i < p.M
                   ? __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + int64_t(m0 + i) * p.x_stride +
                                                          k))
                   : zero;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const T* e = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss[i] += float(e[j]) * float(e[j]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss[i] += __shfl_xor_sync(0xffffffffu, ss[i], o);
      if (lane == 0 && i < at_once && m0 + i < p.M) part[warp][m0 + i] = ss[i];
    }
  }
  sync();
  if (int(threadIdx.x) < p.M) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kLinearWarps; ++w) total += part[w][threadIdx.x];
    rinv[threadIdx.x] = rsqrtf(total / float(p.K) + p.eps);
  }
  sync();
}

// What the epilogue makes of the product: the product (+ bias); silu(gate) * up; the product (+ bias) with the
// rotary embedding applied to its q and k heads.
enum LinearMode : int { kLinearPlain = 0, kLinearSwiglu = 1, kLinearRope = 2 };

// 16 bytes that are read once: no L1 allocation, so x stays in L1.
__device__ __forceinline__ uint4 load_once(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
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

// The weight row of row e (0..15) of tile tl, and whether it exists (the tiles: see decode_linear_kernel).
template <int kMode>
__device__ __forceinline__ int tile_weight_row(const LinearParams& p, int tl, int e, bool& ok) {
  int r;
  if constexpr (kMode == kLinearSwiglu) {
    const int half = p.N / 2;
    r = tl * 8 + (e & 7);
    ok = r < half;
    r += e >= 8 ? half : 0;
  } else if constexpr (kMode == kLinearRope) {
    const int per_head = p.rope_dim / 16;  // tiles per head (N is a multiple of rope_dim)
    r = (tl / per_head) * p.rope_dim + (tl % per_head) * 8 + (e & 7) + (e >= 8 ? p.rope_dim / 2 : 0);
    ok = r < p.N;
  } else {
    r = tl * 16 + e;
    ok = r < p.N;
  }
  return r;
}

// Lane (g, t)'s rows of x, one per n-tile mt (row mt * 8 + g, from column 8t), and whether each exists (a missing
// row points at row 0, so that its loads stay in bounds).
template <typename T, int MT>
__device__ __forceinline__ void aim_x_rows(const LinearParams& p, int g, int t, const T* (&xr)[MT], bool (&xok)[MT]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = mt * 8 + g;
    xok[mt] = m < p.M;
    xr[mt] = static_cast<const T*>(p.x) + int64_t(xok[mt] ? m : 0) * p.x_stride + t * 8;
  }
}

// A tile's sums over the block's warps, in two halves around the caller's barrier: every warp stores its
// accumulators (store_warp_sums), then a thread adds those of n-tile mt in warp order (add_warp_sums; s[j]: tile
// row g (j < 2) or g + 8, x row mt * 8 + 2t + (j & 1)).
template <int W, int MT>
__device__ __forceinline__ void store_warp_sums(float (&red)[W][MT][4][32], const float (&acc)[MT][4], int warp,
                                                int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[warp][mt][j][lane] = acc[mt][j];
}
template <int W, int MT>
__device__ __forceinline__ void add_warp_sums(const float (&red)[W][MT][4][32], int mt, int lane, float (&s)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    s[j] = 0.f;
#pragma unroll
    for (int v = 0; v < W; ++v) s[j] += red[v][mt][j][lane];
  }
}

// x row m's outputs of a tile's rows r0 (sums s0) and r1 (s1), with their biases, for the plain and SwiGLU modes:
// silu(gate r0) * up r1, the residual res(0), res(1) (read only where stored) added, or plain.
template <typename T, bool kSwiglu, typename Res>
__device__ __forceinline__ void store_row_outputs(T* row, int r0, int r1, bool ok0, bool ok1, float s0, float s1,
                                                  float b0, float b1, bool residual, Res res) {
  if constexpr (kSwiglu) {
    if (!ok0) return;
    // The eager chain's roundings: gate and up in T, then silu(gate) * up in float, rounded once.
    const float gate = round_to<T>(s0 + b0), up = round_to<T>(s1 + b1);
    row[r0] = T(gate / (1.f + __expf(-gate)) * up);
  } else if (residual) {  // the eager residual add: the product rounded to T, the sum rounded once
    if (ok0) row[r0] = T(res(0) + round_to<T>(s0 + b0));
    if (ok1) row[r1] = T(res(1) + round_to<T>(s1 + b1));
  } else {
    if (ok0) row[r0] = T(s0 + b0);
    if (ok1) row[r1] = T(s1 + b1);
  }
}

// x row m's outputs of a rope tile's rows r0 (channel j of a head, sums s0) and r1 (channel j + D/2, s1): the
// projection rounded to T, as the fused rope chain reads it; cos/sin (cs: cos j, sin j, cos j + D/2, sin j + D/2)
// rounded to T, as the model hands them to that chain; the rotation in float, rounded once. Rows from rope_rows
// on (v) are stored unrotated.
template <typename T>
__device__ __forceinline__ void store_rope_outputs(T* row, int r0, int r1, bool ok, int rope_rows, float s0,
                                                   float s1, float b0, float b1, const float (&cs)[4]) {
  if (!ok) return;
  const float lo = round_to<T>(s0 + b0), hi = round_to<T>(s1 + b1);
  if (r0 >= rope_rows) {
    row[r0] = T(lo);
    row[r1] = T(hi);
    return;
  }
  row[r0] = T(lo * cs[0] - hi * cs[1]);
  row[r1] = T(hi * cs[2] + lo * cs[3]);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The splits of a tile (a cluster of gridDim.x blocks, each holding its sums s of n-tile mt): rank 0 adds every
// rank's sums in rank order through distributed shared memory (slot red[0][mt] of each block) and returns true,
// the other ranks false. The block's multiplying warps call it once they have all read red (the caller's barrier);
// any other warp of the block joins its two cluster barriers.
template <int W, int MT>
__device__ __forceinline__ bool merge_splits(float (&red)[W][MT][4][32], int mt, bool active, int lane,
                                             float (&s)[4]) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
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
  // Keeps every block's shared memory alive until rank 0 has read it (and slot [0] unwritten by the next tile);
  // only reads to order, so relaxed.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  cluster.barrier_wait();
  return lead;
}
#endif

// Grid (splits, blocks): a tile is 16 weight rows, p.tiles of them: one per ceil(N / 16) (SwiGLU: 8 gate rows
// and their 8 up rows, one per ceil(N / 2 / 8); rope: channels j..j+7 and j+D/2..j+D/2+7 of one head, the pairs
// the rotation mixes). blockIdx.x is the split of K (cluster rank); block y takes tiles y, y + gridDim.y, ...
// The launcher keeps the grid within the blocks the GPU holds at once (two per SM), so a large weight streams
// through resident blocks that wait, take x's row norms and read x once, and issue the next tile's first
// weights before the current tile's sums and stores, instead of waves of blocks that each repeat all of that.
// MT = ceil(M / 8) n-tiles. U: chunks per load batch and warp; two batches in flight (the next loads are issued
// before the current batch's mma), within 128 registers (two blocks per SM): at MT = 1, U = 4 spilled 40-110
// bytes per thread (ptxas) and ran the SmolLM2-shaped step 1.14x slower (bench/NOTES.md), U = 3 spills nothing.
// U does not change the order in which a warp adds its chunks, so not the bits.
// kStageX (norm_w set, linear_stage_bytes(M, K) of dynamic shared memory): the block normalises its chunks of x
// once into shared memory and its tiles load x from there; otherwise each tile normalises x as it loads it. A
// template parameter, not a flag: both paths in one instance cost the M <= 16 instances spills (ptxas). The same
// roundings either way, so the same bits.
template <typename T, int MT, int kMode, int U = (MT == 1 ? 3 : MT == 2 ? 2 : 1), bool kStageX = false>
__global__ void __launch_bounds__(kLinearWarps * 32, 2) decode_linear_kernel(const LinearParams p) {
  trace_mark(p.trace, 0, 3);  // trace points: 0 entry, 1 wait done, 4 the end
  constexpr int kStep = kLinearWarps * U;
  __shared__ float red[kLinearWarps][MT][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  constexpr bool kSwiglu = kMode == kLinearSwiglu;
  auto weight_row = [&](int tl, int e, bool& ok) { return tile_weight_row<kMode>(p, tl, e, ok); };
  const T* w = static_cast<const T*>(p.w);
  // This lane's weight rows g and g + 8 of the tile being loaded (w0, w1; wok: they exist) and of the tile being
  // summed and stored (r0, r1, ok0, ok1): different tiles between a tile's last mma and its stores.
  const T* w0;
  const T* w1;
  bool wok0, wok1;
  auto aim_loads = [&](int tl) {
    const int q0 = weight_row(tl, g, wok0), q1 = weight_row(tl, g + 8, wok1);
    w0 = w + int64_t(wok0 ? q0 : 0) * p.K + t * 8;
    w1 = w + int64_t(wok1 ? q1 : 0) * p.K + t * 8;
  };
  int tile = int(blockIdx.y);
  bool ok0, ok1;
  int r0 = weight_row(tile, g, ok0), r1 = weight_row(tile, g + 8, ok1);
  aim_loads(tile);
  const T* xr[MT];
  bool xok[MT];
  aim_x_rows(p, g, t, xr, xok);
  const ChunkRange range = chunk_range(p.K, int(blockIdx.x), int(gridDim.x));
  const T* norm_w = static_cast<const T*>(p.norm_w);
  extern __shared__ uint4 staged_x[];  // kStageX: [M][K / 8 + kLinearStagePad] 16-byte chunks of normalised x
  const int stage_stride = p.K / 8 + kLinearStagePad;

  float acc[MT][4];
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  struct Batch {
    uint4 a[U], b[U], x[U][MT];
  };
  // Loads the weights of chunks c, c + 8, ... (U of them) of this warp, then (load_x) x's, through the RMSNorm
  // when there is one; chunks past the range load zeros (no memory access).
  float rx[MT] = {};  // 1 / rms of x row mt * 8 + g (with a norm)
  auto load_w = [&](Batch& v, int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kLinearWarps;
      const bool in = c < range.end && c * 32 + t * 8 < p.K;  // K % 8 == 0: a lane's 8 elements are in or out
      v.a[u] = in && wok0 ? load_once(w0 + c * 32) : zero;
      v.b[u] = in && wok1 ? load_once(w1 + c * 32) : zero;
    }
  };
  auto load_x = [&](Batch& v, int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kLinearWarps;
      const bool in = c < range.end && c * 32 + t * 8 < p.K;
      if constexpr (kStageX) {  // normalised already: chunk c's 16 bytes t of row m
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          v.x[u][mt] = in && xok[mt] ? staged_x[(mt * 8 + g) * stage_stride + c * 4 + t] : zero;
      } else {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          v.x[u][mt] = in && xok[mt] ? __ldg(reinterpret_cast<const uint4*>(xr[mt] + c * 32)) : zero;
        if (norm_w && in) {
          const uint4 nw = __ldg(reinterpret_cast<const uint4*>(norm_w + c * 32 + t * 8));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            if (xok[mt]) v.x[u][mt] = rms_normalize<T>(v.x[u][mt], rx[mt], nw);
        }
      }
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
  Batch A, B;
  const int c_first = range.begin + warp;
  // The first two batches of weights go out before anything else. With prefetch_weights, under a dependent launch
  // they stream in while the kernel before this one finishes (for a small model's projection that is all of the
  // block's weights), and so do the bias and the rotary angles of each row (positions, then cos/sin: two
  // dependent reads off the critical path). Either way their latency covers the prologue: the wait for that
  // kernel, then x (through the RMSNorm's row norms) and the residual.
  if (!p.prefetch_weights) wait_for_inputs();
  if (c_first < range.end) load_w(A, c_first);
  if (c_first + kStep < range.end) load_w(B, c_first + kStep);
  __shared__ float pre_bias[16];
  __shared__ float pre[kLinearMaxRows][32];
  __shared__ float rinv[kLinearMaxRows];
  // Per tile, into shared memory for the stores: the bias of its rows; per row of x its residual (plain mode:
  // tile row e is column tl * 16 + e) or the cos and sin of channels j (tile rows 0..7) and j + D/2, in T.
  auto load_bias = [&](int tl) {
    if (threadIdx.x < 16) {
      bool ok;
      const int r = weight_row(tl, int(threadIdx.x), ok);
      pre_bias[threadIdx.x] = p.bias && ok ? float(static_cast<const T*>(p.bias)[r]) : 0.f;
    }
  };
  auto load_rope_angles = [&](int tl) {
    for (int i = int(threadIdx.x); i < p.M * 32; i += kLinearWarps * 32) {
      const int m = i >> 5, e = i & 31;
      bool ok;
      const int j = weight_row(tl, (e & 7) + (e >= 16 ? 8 : 0), ok) % p.rope_dim;
      const int64_t pos = min(max(p.positions[m], int64_t(0)), int64_t(p.rope_positions - 1));
      const float* table = (e >> 3) & 1 ? p.rope_sin : p.rope_cos;
      pre[m][e] = round_to<T>(table[pos * p.rope_dim + j]);
    }
  };
  auto load_residual = [&](int tl) {
    for (int i = int(threadIdx.x); i < p.M * 16; i += kLinearWarps * 32) {
      const int m = i >> 4, e = i & 15, col = tl * 16 + e;
      pre[m][e] = col < p.N ? float(static_cast<const T*>(p.residual)[int64_t(m) * p.out_stride + col]) : 0.f;
    }
  };
  load_bias(tile);
  if constexpr (kMode == kLinearRope)
    if (p.prefetch_weights) load_rope_angles(tile);
  wait_for_inputs();  // everything below reads activations (x, residual) or writes (a no-op if waited)
  release_dependents();
  trace_mark(p.trace, 1, 3);
  // Without a norm x goes out first, so that its loads and the residual's share one round trip. (A kStageX
  // instance always has the norm: the launcher stages only then.)
  if (!kStageX && !norm_w) {
    if (c_first < range.end) load_x(A, c_first);
    if (c_first + kStep < range.end) load_x(B, c_first + kStep);
  }
  if (p.residual) load_residual(tile);
  if constexpr (kMode == kLinearRope)
    if (!p.prefetch_weights) load_rope_angles(tile);
  if (norm_w) {
    // 1 / rms of every row of x, in every block, p.norm_rows rows per round trip (up to kLinearNormRows).
    __shared__ float part[kLinearWarps][kLinearMaxRows];
    constexpr int kNormRows = MT == 1 && kStageX ? kLinearNormRows : 4;
    rms_row_inverses<T, kNormRows>(p, min(max(p.norm_rows, 1), kNormRows), part, rinv, [] { __syncthreads(); });
    if constexpr (!kStageX) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) rx[mt] = xok[mt] ? rinv[mt * 8 + g] : 0.f;
    } else {
      // This block's chunks of every row of x, normalised once (the same roundings as the per-tile path, so the
      // same bits); x is in L1 from the row norms.
      const int q0 = range.begin * 4, per_row = min(range.end * 4, p.K / 8) - q0;
      for (int i = int(threadIdx.x); i < p.M * per_row; i += kLinearWarps * 32) {
        const int m = i / per_row, q = q0 + i % per_row;
        const T* xq = static_cast<const T*>(p.x) + int64_t(m) * p.x_stride + q * 8;
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(xq));
        const uint4 nw = __ldg(reinterpret_cast<const uint4*>(norm_w + q * 8));
        staged_x[m * stage_stride + q] = rms_normalize<T>(v, rinv[m], nw);
      }
      __syncthreads();
    }
    if (c_first < range.end) load_x(A, c_first);
    if (c_first + kStep < range.end) load_x(B, c_first + kStep);
  }

  while (true) {  // the tiles of this block
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
    // Chunks in order c = begin + warp, + 8, + 16, ...: batches A and B alternate, each refilled two batches
    // ahead once its mma are issued, so two batches are in flight while one is waited for.
    int c = c_first;
    while (c < range.end) {
      compute(A);
      if (c + 2 * kStep < range.end) {
        load_w(A, c + 2 * kStep);
        load_x(A, c + 2 * kStep);
      }
      c += kStep;
      if (c >= range.end) break;
      compute(B);
      if (c + 2 * kStep < range.end) {
        load_w(B, c + 2 * kStep);
        load_x(B, c + 2 * kStep);
      }
      c += kStep;
    }
    // The next tile's first weights go out before this tile's sums and stores (the same for every block of a
    // cluster: its blocks share blockIdx.y).
    const int next = tile + int(gridDim.y);
    const bool more = next < p.tiles;
    if (more) {
      aim_loads(next);
      if (c_first < range.end) load_w(A, c_first);
      if (c_first + kStep < range.end) load_w(B, c_first + kStep);
    }

    store_warp_sums(red, acc, warp, lane);
    __syncthreads();
    // Warp mt adds up n-tile mt over the warps, in warp order.
    const bool active = warp < MT;
    const int mt = active ? warp : 0;
    float s[4];
    add_warp_sums(red, mt, lane, s);
    bool lead = true;
    if (gridDim.x > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      __syncthreads();  // every warp has read red: slot [0] is reused for the block's sums
      lead = merge_splits(red, mt, active, lane, s);
#else
      __trap();  // never launched: the launcher splits only for sm_90 code
#endif
    }
    if (active && lead) {
      T* out = static_cast<T*>(p.out);
      const float b0 = pre_bias[g], b1 = pre_bias[g + 8];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = mt * 8 + 2 * t + i;
        if (m >= p.M) continue;
        T* row = out + int64_t(m) * p.out_stride;
        if constexpr (kMode == kLinearRope) {
          const float cs[4] = {pre[m][g], pre[m][8 + g], pre[m][16 + g], pre[m][24 + g]};  // of tile row g
          store_rope_outputs<T>(row, r0, r1, ok0, p.rope_rows, s[i], s[2 + i], b0, b1, cs);
        } else {
          store_row_outputs<T, kSwiglu>(row, r0, r1, ok0, ok1, s[i], s[2 + i], b0, b1, p.residual != nullptr,
                                        [&](int h) { return pre[m][g + 8 * h]; });
        }
      }
    }
    if (!more) break;
    // The next tile: once every warp is past this tile's stores (which read pre_bias, pre) and sums (red), its
    // bias, residual or angles; x again (from L1, through the same row norms).
    __syncthreads();
    tile = next;
    r0 = weight_row(tile, g, ok0);
    r1 = weight_row(tile, g + 8, ok1);
    load_bias(tile);
    if (p.residual) load_residual(tile);
    if constexpr (kMode == kLinearRope) load_rope_angles(tile);
    if (c_first < range.end) load_x(A, c_first);
    if (c_first + kStep < range.end) load_x(B, c_first + kStep);
  }
  trace_mark(p.trace, 4, 3);
}

}  // namespace pass_ext::kernels
