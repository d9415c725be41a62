// decode_linear for large weights (sm_90): the weight streams through a ring of shared-memory stages that the
// copy engine fills (cp.async.bulk, one copy of 1 or 2 KB per weight row and stage), and eight consumer warps
// multiply from shared memory.
//
// Why: a decode projection reads its weight once, so on a large weight it is bound by DRAM bandwidth, and that
// needs many bytes in flight per SM and long contiguous reads. decode_linear_kernel's warps load 64-byte pieces
// of 16 rows straight into mma operands (linear.cuh); on the 1.5B's 55 MB gate/up weight that streamed ~2.5 TB/s.
// Here a producer warp (lane e copies tile row e) runs ahead of the consumers by up to Ring::kStages stages,
// across tile boundaries, so the stream does not stop for a tile's sums and stores.
//
// The arithmetic is decode_linear_kernel's: the same tiles (16 weight rows; SwiGLU 8 gate rows and their 8 up rows;
// rope 8 channels of a head and their 8 partners D/2 on), the same mma operand layout (lane (g, t) takes k = 8t..8t+7
// of a 32-wide chunk, lo half to the first mma, hi half to the second), warp w adds chunks w, w + 8, w + 16, ... in
// order, the warps' sums are added in warp order (whatever the ring's stage width), the same RMSNorm prologue and
// epilogues, and where the tiles are few the same split of K over a cluster (chunk_range), whose ranks rank 0 adds in
// order through distributed shared memory. So with the same splits (none, or as many) the two kernels give the same
// bits, and a row's result never depends on M or the other rows. Stage s holds columns [KC s, KC s + KC) of the tile's
// rows (of the block's split), one slot of 2 KC + 64 bytes per row (the padding puts the two rows one 16-byte load
// phase touches in different banks). Without splits a block takes tiles blockIdx.y, + gridDim.y, ...; with them, one
// tile per cluster. The 512 x 4 ring's instances (74-91 registers) run two blocks per SM (bench/NOTES.md: with one,
// eight consumer warps could not keep up with that ring); the 1024 x 2 ring's (103-108 registers) one, since 9-warp
// blocks with that many registers leave room for 16 warps per SM (capped at 96 registers for two, they spilled and ran
// slower: bench/NOTES.md, twentieth H200 session).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "linear.cuh"
#include "pdl.cuh"

namespace pass_ext::kernels {

constexpr int kBulkConsumerWarps = kLinearWarps;               // the warps that multiply (8)
constexpr int kBulkThreads = (kBulkConsumerWarps + 1) * 32;    // and one producer warp

// The ring's geometry: KC K elements per stage and row (one bulk copy of 2 KC bytes per row), S stages.
template <int KC, int S>
struct BulkRing {
  static constexpr int kCols = KC;
  static constexpr int kStages = S;
  static constexpr int kChunks = KC / 32;                   // 32-wide chunks per stage
  static constexpr int kU = kChunks / kBulkConsumerWarps;   // per consumer warp
  static constexpr int kPitch = KC * 2 + 64;                // bytes per row slot (16-bit types only)
  static constexpr int kStageBytes = 16 * kPitch;
  static constexpr int kBytes = S * kStageBytes;
  static_assert(kU >= 1 && kChunks % kBulkConsumerWarps == 0, "whole chunks per warp");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void bulk_mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void bulk_mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void bulk_mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  }
}
// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned), counted on `bar`; the
// weight is read once, so it is marked first to leave L2.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1], %2, [%3], %4;\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}
// Consumer warps only (the producer warp runs ahead): named barrier 1.
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kBulkConsumerWarps * 32) : "memory");
}
#endif

// Grid (splits, blocks): block (r, b) takes split r of the K of tiles b, b + gridDim.y, ... (p.tiles in all; with
// splits, one tile per cluster). M <= 8 * MT rows of x; kMode plain (with bias and residual), SwiGLU or rope
// (decode_linear_kernel's tiles of channel pairs and its epilogue, store_rope_outputs); p.norm_w: the RMSNorm of x
// before the product (x normalised as it is loaded, through row norms every block computes). Dynamic shared memory:
// Ring::kBytes, then with kStageX linear_stage_bytes(M, K) for x (normalised, with the norm) staged once per block,
// which every tile's loads read instead of x in L1 (and the norm's arithmetic per tile). The same roundings either way,
// so the same bits.
template <typename T, int MT, int kMode, typename Ring, bool kStageX>
__global__ void __launch_bounds__(kBulkThreads, 1) decode_linear_bulk_kernel(const LinearParams p) {
  constexpr int kBulkStages = Ring::kStages, kBulkStageCols = Ring::kCols, kBulkChunksPerStage = Ring::kChunks;
  constexpr int kBulkRowPitch = Ring::kPitch, kBulkStageBytes = Ring::kStageBytes, kU = Ring::kU;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static_assert(sizeof(T) == 2, "16-bit types only");
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) uint64_t full[kBulkStages], empty[kBulkStages];
  __shared__ float red[kBulkConsumerWarps][MT][4][32];
  __shared__ float part[kLinearWarps][kLinearMaxRows];
  __shared__ float rinv[kLinearMaxRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  constexpr bool kSwiglu = kMode == kLinearSwiglu;
  // This block's columns: K split over a cluster of gridDim.x blocks (chunk_range, as decode_linear_kernel) where
  // the tiles are too few for the GPU; then each cluster takes one tile (the launcher's grid), since a block's
  // producer warp joins the cluster's barriers only once, after its last copy.
  const ChunkRange range = chunk_range(p.K, int(blockIdx.x), int(gridDim.x));
  const int col_begin = range.begin * 32, col_end = min(range.end * 32, p.K);
  const int stages = (max(col_end - col_begin, 0) + kBulkStageCols - 1) / kBulkStageCols;
  auto weight_row = [&](int tl, int e, bool& ok) { return tile_weight_row<kMode>(p, tl, e, ok); };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s) {
      bulk_mbar_init(&full[s], 1);
      bulk_mbar_init(&empty[s], kBulkConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  trace_mark(p.trace, 0, 2);  // trace points (thread 0, a consumer): 0 entry, 1 wait done, 4 the end

  if (warp == kBulkConsumerWarps) {  // the producer warp: lane e copies tile row e (lanes 16..31 idle)
    // Under a dependent launch the first stages go out while the kernel before finishes (it never writes weights).
    if (!p.prefetch_weights) wait_for_inputs();
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    const T* w = static_cast<const T*>(p.w);
    int it = 0;
    for (int tl = int(blockIdx.y); tl < p.tiles; tl += int(gridDim.y)) {
      bool ok;
      const int row = weight_row(tl, lane & 15, ok);
      const bool mine = lane < 16 && ok;
      const int valid = __popc(__ballot_sync(0xffffffffu, mine));
      const T* src = w + int64_t(mine ? row : 0) * p.K;
      for (int s = 0; s < stages; ++s, ++it) {
        const int slot = it % kBulkStages, use = it / kBulkStages;
        if (use > 0) bulk_mbar_wait(&empty[slot], uint32_t(use - 1) & 1u);
        const int col0 = col_begin + s * kBulkStageCols;
        const uint32_t bytes = uint32_t(min(kBulkStageCols, col_end - col0)) * 2u;
        if (lane == 0) bulk_mbar_expect_tx(&full[slot], bytes * uint32_t(valid));
        __syncwarp();
        if (mine)
          bulk_copy(ring + slot * kBulkStageBytes + lane * kBulkRowPitch, src + col0, bytes, &full[slot], policy);
      }
    }
    if (gridDim.x > 1) {  // the consumers' two cluster barriers of the block's one tile (see the epilogue)
      namespace cg = cooperative_groups;
      __syncwarp();
      cg::this_cluster().sync();
      asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
      cg::this_cluster().barrier_wait();
    }
    return;
  }

  // The consumers.
  wait_for_inputs();  // everything below reads activations (x, residual) or writes
  release_dependents();
  trace_mark(p.trace, 1, 2);
  const T* xr[MT];
  bool xok[MT];
  aim_x_rows(p, g, t, xr, xok);
  const T* norm_w = static_cast<const T*>(p.norm_w);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  float rx[MT] = {};
  if (norm_w) {
    // 1 / rms of every row of x, kLinearNormRows rows per round trip: decode_linear_kernel's code, so its bits.
    rms_row_inverses<T, kLinearNormRows>(p, kLinearNormRows, part, rinv, [] { consumers_sync(); });
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) rx[mt] = xok[mt] ? rinv[mt * 8 + g] : 0.f;
  }
  uint4* staged_x = reinterpret_cast<uint4*>(ring + Ring::kBytes);  // kStageX: [M][K / 8 + kLinearStagePad]
  const int stage_stride = p.K / 8 + kLinearStagePad;
  if constexpr (kStageX) {
    const int per_row = p.K / 8;
#pragma unroll 4
    for (int i = int(threadIdx.x); i < p.M * per_row; i += kBulkConsumerWarps * 32) {
      const int m = i / per_row, q = i % per_row;
      const T* xq = static_cast<const T*>(p.x) + int64_t(m) * p.x_stride + q * 8;
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(xq));
      staged_x[m * stage_stride + q] =
          norm_w ? rms_normalize<T>(v, rinv[m], __ldg(reinterpret_cast<const uint4*>(norm_w + q * 8))) : v;
    }
    consumers_sync();
  }

  const bool active = warp < MT;  // warp mt adds up n-tile mt and stores it
  const int mt_out = active ? warp : 0;
  T* out = static_cast<T*>(p.out);
  int it = 0;
  for (int tl = int(blockIdx.y); tl < p.tiles; tl += int(gridDim.y)) {
    bool ok0, ok1;
    const int r0 = weight_row(tl, g, ok0), r1 = weight_row(tl, g + 8, ok1);
    // The epilogue's bias, residual and rotary angles, read now so that their round trip overlaps the tile.
    float b0 = 0.f, b1 = 0.f, res[2][2] = {}, cs[2][4] = {};
    if (active) {
      if (p.bias) {
        b0 = ok0 ? float(static_cast<const T*>(p.bias)[r0]) : 0.f;
        b1 = ok1 ? float(static_cast<const T*>(p.bias)[r1]) : 0.f;
      }
      if (kMode == kLinearPlain && p.residual) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int m = mt_out * 8 + 2 * t + i;
          if (m >= p.M) continue;
          const T* row = static_cast<const T*>(p.residual) + int64_t(m) * p.out_stride;
          res[i][0] = ok0 ? float(row[r0]) : 0.f;
          res[i][1] = ok1 ? float(row[r1]) : 0.f;
        }
      }
      if constexpr (kMode == kLinearRope) {
        // cos and sin of channels j (tile row g) and j + D/2 (g + 8) at each x row's position, rounded to T
        // (decode_linear_kernel's load_rope_angles).
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int m = mt_out * 8 + 2 * t + i;
          if (m >= p.M || !ok0 || r0 >= p.rope_rows) continue;
          const int64_t pos = min(max(p.positions[m], int64_t(0)), int64_t(p.rope_positions - 1));
          const float* c = p.rope_cos + pos * p.rope_dim;
          const float* sn = p.rope_sin + pos * p.rope_dim;
          const int j0 = r0 % p.rope_dim, j1 = r1 % p.rope_dim;
          cs[i][0] = round_to<T>(c[j0]);
          cs[i][1] = round_to<T>(sn[j0]);
          cs[i][2] = round_to<T>(c[j1]);
          cs[i][3] = round_to<T>(sn[j1]);
        }
      }
    }
    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
    // x of stage s + 1 is loaded (and normalised) before stage s's wait and mma, so its L1/L2 round trip overlaps.
    uint4 xv[kU][MT];
    bool in[kU];
    auto load_x = [&](int s) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int c = range.begin + s * kBulkChunksPerStage + warp + u * kBulkConsumerWarps;
        in[u] = s < stages && c < range.end && c * 32 + t * 8 < p.K;
        if constexpr (kStageX) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            xv[u][mt] = in[u] && xok[mt] ? staged_x[(mt * 8 + g) * stage_stride + c * 4 + t] : zero;
        } else {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            xv[u][mt] = in[u] && xok[mt] ? __ldg(reinterpret_cast<const uint4*>(xr[mt] + c * 32)) : zero;
          if (norm_w && in[u]) {
            const uint4 nw = __ldg(reinterpret_cast<const uint4*>(norm_w + c * 32 + t * 8));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
              if (xok[mt]) xv[u][mt] = rms_normalize<T>(xv[u][mt], rx[mt], nw);
          }
        }
      }
    };
    load_x(0);
    for (int s = 0; s < stages; ++s, ++it) {
      const int slot = it % kBulkStages, use = it / kBulkStages;
      uint4 xc[kU][MT];
      bool inc[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        inc[u] = in[u];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) xc[u][mt] = xv[u][mt];
      }
      load_x(s + 1);
      bulk_mbar_wait(&full[slot], uint32_t(use) & 1u);
      const unsigned char* stage = ring + slot * kBulkStageBytes;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int off = (warp + u * kBulkConsumerWarps) * 64 + t * 16;
        const uint4 a = inc[u] && ok0 ? *reinterpret_cast<const uint4*>(stage + g * kBulkRowPitch + off) : zero;
        const uint4 b = inc[u] && ok1 ? *reinterpret_cast<const uint4*>(stage + (g + 8) * kBulkRowPitch + off) : zero;
        const uint32_t lo[4] = {a.x, b.x, a.y, b.y};  // k 8t..8t+3 of rows g, g+8
        const uint32_t hi[4] = {a.z, b.z, a.w, b.w};  // k 8t+4..8t+7
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(acc[mt], lo, xc[u][mt].x, xc[u][mt].y);
          mma_16816<T>(acc[mt], hi, xc[u][mt].z, xc[u][mt].w);
        }
      }
      __syncwarp();
      if (lane == 0) bulk_mbar_arrive(&empty[slot]);  // this warp is done with the slot
    }

    store_warp_sums(red, acc, warp, lane);
    consumers_sync();
    float s[4] = {};
    if (active) add_warp_sums(red, mt_out, lane, s);
    bool lead = true;
    if (gridDim.x > 1) {
      // The splits of the tile, merged as decode_linear_kernel merges them (the same bits for the same splits).
      consumers_sync();  // every warp has read red: slot [0] takes the block's sums
      lead = merge_splits(red, mt_out, active, lane, s);
    }
    if (active && lead) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = mt_out * 8 + 2 * t + i;
        if (m >= p.M) continue;
        T* row = out + int64_t(m) * p.out_stride;
        if constexpr (kMode == kLinearRope)
          store_rope_outputs<T>(row, r0, r1, ok0, p.rope_rows, s[i], s[2 + i], b0, b1, cs[i]);
        else
          store_row_outputs<T, kSwiglu>(row, r0, r1, ok0, ok1, s[i], s[2 + i], b0, b1, p.residual != nullptr,
                                        [&](int h) { return res[i][h]; });
      }
    }
    consumers_sync();  // red is free for the next tile
  }
  trace_mark(p.trace, 4, 2);
#else
  __trap();  // never launched: the launcher uses this kernel only for sm_90 code
#endif
}

}  // namespace pass_ext::kernels
