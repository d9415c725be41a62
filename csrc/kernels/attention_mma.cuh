// Tensor-core variant of the attention_with_kv_cache kernel (fp16/bf16, head dims 64 and 128, sm_80+): the
// packed query rows of a KV head go through mma.sync m16n8k16 with fp32 accumulation and fp32 online softmax.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention.cuh"

namespace pass_ext::kernels {

// Two floats -> the 32-bit register of an mma operand: lo in the low half (the lower k index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma needs fp16 or bf16");
  uint32_t u;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&v);
  }
  return u;
}

// d += a * b for one m16n8k16 tile. Fragments (g = lane / 4, t = lane % 4), PTX ISA layouts:
//   a[0]: row g, k 2t..2t+1;  a[1]: row g+8, k 2t..2t+1;  a[2]: row g, k 2t+8..;  a[3]: row g+8, k 2t+8..
//   b0: k 2t..2t+1, col g;    b1: k 2t+8..2t+9, col g
//   d[0..1]: row g, cols 2t..2t+1;  d[2..3]: row g+8, cols 2t..2t+1
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i, and lane l
// receives row l/4, elements 2(l%4)..2(l%4)+1 of each (TRANS: column l/4, rows 2(l%4)..2(l%4)+1). The
// "memory" clobber keeps the loads after the barrier that publishes the cp.async data.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
  }
#else
  r[0] = r[1] = r[2] = r[3] = 0u;
#endif
}

// Compile-time shape of one tensor-core kernel instance. The kWarps warps form kRowWarps x KW: each warp
// owns one m16 tile of query rows and, of every kKeys-key stage, the kWarpKeys keys of its key slice. KW > 1
// serves blocks with fewer than 64 rows: the warps of a row tile split the keys instead of idling, and
// merge their softmax states once at the end.
template <typename T, int D, int KW>
struct MmaTile {
  static_assert(sizeof(T) == 2 && (D == 64 || D == 128), "tensor-core path: fp16/bf16, D in {64, 128}");
  static_assert(KW == 1 || KW == 2 || KW == 4, "key warps must divide the 4 warps");
  static constexpr int kKeyWarps = KW;
  static constexpr int kRowWarps = kWarps / KW;
  static constexpr int kRows = 16 * kRowWarps;  // packed query rows per block
  static constexpr int kKeys = 64;              // keys per pipeline stage
  static constexpr int kWarpKeys = kKeys / KW;  // 16, 32 or 64: a multiple of the mma k of 16
  static constexpr int kStages = 3;             // cp.async ring: two stages in flight while one is consumed
  static constexpr int kChunk = 8;              // elements per 16-byte copy
  static constexpr int kStride = D + kChunk;    // +16 B per smem row: the 8 rows of an ldmatrix hit distinct banks
  static constexpr size_t kPipeBytes = size_t(2) * kStages * kKeys * kStride * sizeof(T);  // K and V rings
  // The KW-way merge reuses the ring: per warp and lane, D/2 accumulators plus (max, sum) of its two rows.
  static constexpr int kMergeFloats = D / 2 + 4;
  static constexpr size_t kMergeBytes = KW > 1 ? size_t(kWarps) * 32 * kMergeFloats * sizeof(float) : 0;
  static constexpr size_t kSmemBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  static_assert(kMinSplitKeys % kKeys == 0, "a split must hold whole stages");
  static_assert(kSmemBytes >= kCombineStageBytes, "the fused combine stages its partials in the ring");
  // The cluster merge's partial rows [kRows][D] fp32 and (max, sum) [kRows], in the ring past the KW-way merge.
  static constexpr size_t kPartOffset = (kMergeBytes + 15) / 16 * 16;
  static constexpr size_t kMLOffset = kPartOffset + sizeof(float) * size_t(kRows) * D;
  static_assert(kMLOffset + sizeof(float2) * kRows <= kSmemBytes, "the cluster merge's partials fit the ring");
};

// Grid (ceil(R / kRows), splits, B * Hkv), kThreads threads, MmaTile::kSmemBytes dynamic smem. Same contract
// as attention_kernel (append, split range, partials for the combine kernel), with row tiles innermost so
// the blocks that read the same K/V split run side by side and share it through L2.
// Per stage and warp: S = Q K^T on tensor cores (Q held in registers as A fragments, K via ldmatrix), the
// online-softmax update in fp32 registers, then O += P V with P re-packed from the S accumulators as the A
// operand (no smem round trip) and V via ldmatrix.trans.
template <typename T, int D, int KW>
__global__ void __launch_bounds__(kThreads) attention_mma_kernel(const AttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Tile = MmaTile<T, D, KW>;
  constexpr int KT = Tile::kKeys, NK = Tile::kWarpKeys, ST = Tile::kStages, STRIDE = Tile::kStride;
  constexpr int CH = Tile::kChunk, CPR = D / CH;  // 16-byte chunks per K/V/q row
  constexpr int KS = D / 16;                      // k steps of q.k
  constexpr int NT = NK / 8;                      // score n-tiles (8 keys) per warp and stage
  constexpr int DT = D / 8;                       // output n-tiles (8 channels)

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [ST][KT][STRIDE]
  T* sV = sK + ST * KT * STRIDE;           // [ST][KT][STRIDE]

  const int row_tile = blockIdx.x, split = blockIdx.y, bh = blockIdx.z;
  const int b = bh / p.Hkv, h = bh % p.Hkv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rw = warp / KW, kw = warp % KW;  // row warp (m16 tile of the block), key warp (slice of a stage)
  const int g = lane >> 2, t4 = lane & 3;    // mma fragment coordinates
  const T* q = static_cast<const T*>(p.q);
  const T* k_new = static_cast<const T*>(p.k_new);
  const T* v_new = static_cast<const T*>(p.v_new);
  T* k_cache = static_cast<T*>(p.k_cache);
  T* v_cache = static_cast<T*>(p.v_cache);
  const int64_t cache_row = (int64_t(b) * p.Hkv + h) * p.S;  // slot 0 of this (row, head), in rows of D

  // q, k_new and v_new come from the kernel before (a dependent launch: pdl.cuh); with prefetch_cache,
  // cache_lens and the leading stages that hold cached keys only are read before the wait (see attention_kernel).
  trace_mark(p.trace, 0, 1);  // trace points: 0 entry, 1 wait done, 7 the first tile landed, 2 keys done, 5 and 6
                              // the merge's barriers, 3 the block's rows merged, 8 and 9 the cluster merge's, 4 the end
  if (!p.prefetch_cache) {
    wait_for_inputs();
    release_dependents();
  }
  // cache_lens is not trusted (see attention_kernel): reads see [0, clamp(len, 0, S)), writes skip slots
  // outside [0, S), and reads (< L) never meet writes (>= len).
  const int len = p.cache_lens[b];
  const int L = min(max(len, 0), p.S);

  // This split's keys among the L cached + Q new ones, sized per row on the device.
  const KeyRange keys = split_key_range(L + p.Q, p.splits, split, KT, kMinSplitKeys);
  const int k_begin = keys.begin, k_end = keys.end;
  const int n_tiles = k_begin < k_end ? (k_end - k_begin + KT - 1) / KT : 0;

  // Tile t of the split -> ring stage `stage`; keys past k_end are zero-filled without a read.
  auto load_tile = [&](int t, int stage) {
    copy_key_tile<T, KT, CH>(p, b, h, cache_row, L, k_begin + t * KT, k_end, D, CPR, STRIDE,
                             sK + stage * KT * STRIDE, sV + stage * KT * STRIDE);
  };
  // Prologue: ST-1 stages in flight. Every thread commits one group per stage, empty or not, so the
  // wait_group count below means the same tile for all of them. With prefetch_cache the leading stages whose
  // keys are all cached go out before the wait.
  int early = 0;
  if (p.prefetch_cache) {
    while (early < ST - 1 && early < n_tiles && k_begin + (early + 1) * KT <= L) {
      load_tile(early, early);
      cp_async_commit();
      ++early;
    }
    wait_for_inputs();
    release_dependents();
  }

  trace_mark(p.trace, 1, 1);
  // (1) Append: the blocks of this (row, head) take every nblk-th new token.
  {
    const int lin = split * gridDim.x + row_tile, nblk = gridDim.x * gridDim.y;
    if (lin < p.Q) {
      const int mine = (p.Q - lin + nblk - 1) / nblk;
      for (int idx = tid; idx < mine * CPR; idx += kThreads) {
        const int j = lin + (idx / CPR) * nblk, c = idx % CPR;
        const int64_t slot = int64_t(len) + j;
        if (slot < 0 || slot >= p.S) continue;
        const int64_t tok = int64_t(b) * p.Q + j;
        const int64_t dst = (cache_row + slot) * D;
        reinterpret_cast<uint4*>(k_cache + dst)[c] =
            reinterpret_cast<const uint4*>(k_new + tok * p.k_tok + h * D)[c];
        reinterpret_cast<uint4*>(v_cache + dst)[c] =
            reinterpret_cast<const uint4*>(v_new + tok * p.v_tok + h * D)[c];
      }
    }
  }

  // (2) The split's keys through the pipeline.
  const int row0 = row_tile * Tile::kRows;
  float* sPart = reinterpret_cast<float*>(smem_raw + Tile::kPartOffset);  // cluster merge: [kRows][D]
  float2* sML = reinterpret_cast<float2*>(smem_raw + Tile::kMLOffset);    // and [kRows] (max, sum)
  if (k_begin >= k_end) {  // only when splits > 1: mark empty so the merge skips it
    for (int r = tid; r < Tile::kRows; r += kThreads) {
      if (p.cluster)
        sML[r] = make_float2(-INFINITY, 0.f);
      else if (row0 + r < p.R)
        p.part_ml[(int64_t(bh) * p.splits + split) * p.R + row0 + r] = make_float2(-INFINITY, 0.f);
    }
    trace_mark(p.trace, 3, 1);
    if (p.cluster) {
      cluster_merge<T>(p, bh, row0, Tile::kRows, sPart, sML, 1);  // every block of the cluster takes part
    } else {
      if constexpr (KW == kWarps)  // see the end of the kernel
        if (p.counters != nullptr) fused_combine<T>(p, bh, row_tile, gridDim.x, row0, Tile::kRows, smem_raw);
    }
    trace_mark(p.trace, 4, 1);
    return;
  }
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s >= early) {
      if (s < n_tiles) load_tile(s, s);
      cp_async_commit();
    }
  }

  // The warp's 16 query rows as A fragments, straight from global memory (read once; padding rows are
  // zeros). Row r of the block is new token r / G of q head h*G + r % G.
  const int wrow0 = row0 + rw * 16;
  uint32_t qf[KS][4];
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int row = wrow0 + g + 8 * hi;
    const T* qrow = row < p.R ? q + q_row_offset(p, b, h, row, D) : nullptr;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      qf[ks][hi] = qrow ? *reinterpret_cast<const uint32_t*>(qrow + ks * 16 + 2 * t4) : 0u;
      qf[ks][hi + 2] = qrow ? *reinterpret_cast<const uint32_t*>(qrow + ks * 16 + 8 + 2 * t4) : 0u;
    }
  }
  // New token of each of the lane's two rows (clamped for padding rows, whose results are never stored).
  const int tok[2] = {min((wrow0 + g) / p.G, p.Q - 1), min((wrow0 + g + 8) / p.G, p.Q - 1)};

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // per row g / g+8; l is this lane's share

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<ST - 2>();  // this thread's copies of tile t have landed
    __syncthreads();          // everyone's have; and every warp is done with tile t-1's stage
    if (t == 0) trace_mark(p.trace, 7, 1);
    if (t + ST - 1 < n_tiles) load_tile(t + ST - 1, (t + ST - 1) % ST);  // refills tile t-1's stage
    cp_async_commit();

    const int stage = t % ST;
    const T* k_s = sK + (stage * KT + kw * NK) * STRIDE;  // this warp's key slice
    const T* v_s = sV + (stage * KT + kw * NK) * STRIDE;

    // S = Q K^T: one ldmatrix.x4 gives the B fragments of two 8-key n-tiles for one 16-channel k step.
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kf[4];
        ldmatrix_x4<false>(kf, k_s + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * STRIDE + ks * 16 +
                                   ((lane >> 3) & 1) * 8);
        mma_16816<T>(s[2 * np], qf[ks], kf[0], kf[1]);
        mma_16816<T>(s[2 * np + 1], qf[ks], kf[2], kf[3]);
      }
    }

    // Into the log2 domain, then the mask: cached keys are visible to every row; new key j is visible to
    // token i per the tree mask (or j <= i); keys past k_end are padding. Only the last tiles of a row hold
    // new keys or padding, so the others skip this (a block-uniform branch).
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= p.scale_log2;
    const int tile_begin = k_begin + t * KT;
    if (tile_begin + KT > L || tile_begin + KT > k_end) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = tile_begin + kw * NK + n * 8 + 2 * t4 + (e & 1), j = key - L, i = tok[e >> 1];
          bool visible = key < k_end;
          if (visible && key >= L)
            visible = p.tree_mask ? ((p.tree_mask[i * p.mask_words + (j >> 6)] >> (j & 63)) & 1) != 0 : j <= i;
          if (!visible) s[n][e] = -INFINITY;
        }
    }

    // Online softmax. A row's scores sit in the 4 lanes of a quad, so its max is a 2-step shuffle; the
    // running max stays quad-uniform, so per-lane partial sums rescale consistently.
    float alpha[2], m_use[2];
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      float mx = m_run[hi];
#pragma unroll
      for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * hi], s[n][2 * hi + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // No visible key yet: subtract 0 instead of -inf (exp2(-inf) = 0 keeps p and the state at zero).
      m_use[hi] = mx == -INFINITY ? 0.f : mx;
      alpha[hi] = exp2f(m_run[hi] - m_use[hi]);
      m_run[hi] = mx;
      l_run[hi] *= alpha[hi];
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = exp2f(s[n][e] - m_use[e >> 1]);
      l_run[0] += s[n][0] + s[n][1];
      l_run[1] += s[n][2] + s[n][3];
    }
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= alpha[0];
      o[d][1] *= alpha[0];
      o[d][2] *= alpha[1];
      o[d][3] *= alpha[1];
    }

    // O += P V. The accumulators of score n-tiles 2kk and 2kk+1 are exactly the A fragment of keys
    // 16kk..16kk+15; one ldmatrix.x4.trans gives the B fragments of two 8-channel n-tiles.
#pragma unroll
    for (int kk = 0; kk < NK / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4<true>(vf, v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + dp * 16 +
                                  (lane >> 4) * 8);
        mma_16816<T>(o[2 * dp], pa, vf[0], vf[1]);
        mma_16816<T>(o[2 * dp + 1], pa, vf[2], vf[3]);
      }
    }
  }
  trace_mark(p.trace, 2, 1);
  cp_async_wait<0>();  // only empty groups are left; drain them before the ring is reused or the block exits

#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    l_run[hi] += __shfl_xor_sync(0xffffffffu, l_run[hi], 1);
    l_run[hi] += __shfl_xor_sync(0xffffffffu, l_run[hi], 2);
  }

  // (3a) Key warps of a row tile hold states of the same rows over disjoint keys: each puts its state in the (now
  // idle) ring, lane-major so every access is conflict-free, and key warp 0 merges them. 16-row tiles (KW = kWarps,
  // the decode tiles) with p.warp_merge: every warp's state goes in, and the block's 128 threads merge the rows that
  // exist, a column pair each, in key warp 0's order (so the same bits), and write them as (3b) does. Key warp 0
  // alone merged all 16 rows, padding included: in the Llama-8B decode step that took 1.3 us more per layer from
  // the wait to the next kernel's (bench/NOTES.md, twenty-first session). 32-row tiles (KW = 2) keep key warp 0's
  // merge: their rows are mostly real, and one timing at B = 1, Q = 5 had the other 1.09x slower (within that run's
  // noise, unconfirmed). With one key warp the barrier is there for the cluster merge, whose partials go into the
  // ring.
  const bool all_threads = KW == kWarps && p.warp_merge;
  if constexpr (KW == 1) {
    if (p.cluster) __syncthreads();  // every warp is done reading the ring
  }
  if constexpr (KW > 1) {
    constexpr int MF = Tile::kMergeFloats;
    float* sm = reinterpret_cast<float*>(smem_raw);  // [kWarps][MF][32]
    __syncthreads();                                 // every warp is done reading the ring
    trace_mark(p.trace, 5, 1);
    if (all_threads || kw != 0) {
      float* mine = sm + warp * MF * 32 + lane;
#pragma unroll
      for (int d = 0; d < DT; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(d * 4 + e) * 32] = o[d][e];
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        mine[(DT * 4 + hi) * 32] = m_run[hi];
        mine[(DT * 4 + 2 + hi) * 32] = l_run[hi];
      }
    }
    __syncthreads();
    trace_mark(p.trace, 6, 1);
  }
  if constexpr (KW == kWarps) {
    if (all_threads) {
      constexpr int MF = Tile::kMergeFloats;
      const float* sm = reinterpret_cast<const float*>(smem_raw);
      const int rows = min(Tile::kRows, p.R - row0);
      T* out = static_cast<T*>(p.out);
      // Item -> (column pair 2 (4 dt + t4), row r): t4 fastest, then the row, then the 8-channel tile dt, so that a
      // warp's threads read distinct lanes of one accumulator.
      for (int item = tid; item < rows * DT * 4; item += kThreads) {
        const int tt = item & 3, r = (item >> 2) % rows, dt = (item >> 2) / rows;
        const int rr = r & 15, hi = rr >> 3, c = dt * 8 + 2 * tt;
        const float* w0 = sm + (r >> 4) * KW * MF * 32 + ((rr & 7) * 4 + tt);  // key warp 0 of the row's row warp
        float mw[KW], mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < KW; ++w) {
          mw[w] = w0[w * MF * 32 + (DT * 4 + hi) * 32];
          mx = w == 0 ? mw[0] : fmaxf(mx, mw[w]);
        }
        const float m_use = mx == -INFINITY ? 0.f : mx;
        float f = exp2f(mw[0] - m_use);  // 0 for a warp that saw no visible key
        float l = w0[(DT * 4 + 2 + hi) * 32] * f;
        float o0 = w0[(dt * 4 + 2 * hi) * 32] * f, o1 = w0[(dt * 4 + 2 * hi + 1) * 32] * f;
#pragma unroll
        for (int w = 1; w < KW; ++w) {
          const float* ow = w0 + w * MF * 32;
          f = exp2f(mw[w] - m_use);
          l += f * ow[(DT * 4 + 2 + hi) * 32];
          o0 += f * ow[(dt * 4 + 2 * hi) * 32];
          o1 += f * ow[(dt * 4 + 2 * hi + 1) * 32];
        }
        const int row = row0 + r;
        if (p.cluster) {
          *reinterpret_cast<float2*>(sPart + r * D + c) = make_float2(o0, o1);
          if (c == 0) sML[r] = make_float2(mx, l);
        } else if (p.splits == 1) {
          const float inv = l > 0.f ? 1.f / l : 0.f;  // a row that saw no key outputs zeros
          *reinterpret_cast<uint32_t*>(out + out_row_offset(p, b, h, row, D) + c) = pack2<T>(o0 * inv, o1 * inv);
        } else {
          const int64_t prow = (int64_t(bh) * p.splits + split) * p.R + row;
          *reinterpret_cast<float2*>(p.part_acc + prow * D + c) = make_float2(o0, o1);
          if (c == 0) p.part_ml[prow] = make_float2(mx, l);
        }
      }
    }
  }
  // Else only key warp 0 of a row tile holds its rows from here; the others skip to the fused combine.
  if (!all_threads && kw == 0) {
    if constexpr (KW > 1) {
      constexpr int MF = Tile::kMergeFloats;
      const float* sm = reinterpret_cast<const float*>(smem_raw);
      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int w = 1; w < KW; ++w)
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) mx[hi] = fmaxf(mx[hi], sm[((warp + w) * MF + DT * 4 + hi) * 32 + lane]);
      float m_use[2], f[2];
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        m_use[hi] = mx[hi] == -INFINITY ? 0.f : mx[hi];
        f[hi] = exp2f(m_run[hi] - m_use[hi]);  // 0 for a warp that saw no visible key
        l_run[hi] *= f[hi];
        m_run[hi] = mx[hi];
      }
#pragma unroll
      for (int d = 0; d < DT; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[d][e] *= f[e >> 1];
#pragma unroll
      for (int w = 1; w < KW; ++w) {
        const float* other = sm + (warp + w) * MF * 32 + lane;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
          f[hi] = exp2f(other[(DT * 4 + hi) * 32] - m_use[hi]);
          l_run[hi] += f[hi] * other[(DT * 4 + 2 + hi) * 32];
        }
#pragma unroll
        for (int d = 0; d < DT; ++d)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[d][e] += f[e >> 1] * other[(d * 4 + e) * 32];
      }
    }

    // (3b) Write out: final rows when there is one split, else unnormalised partials and (max, sum) — into
    // this block's shared memory for the cluster merge, else global memory.
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int row = wrow0 + g + 8 * hi;
      if (row >= p.R) continue;
      if (p.cluster) {
        const int r = row - row0;
#pragma unroll
        for (int d = 0; d < DT; ++d)
          *reinterpret_cast<float2*>(sPart + r * D + d * 8 + 2 * t4) = make_float2(o[d][2 * hi], o[d][2 * hi + 1]);
        if (t4 == 0) sML[r] = make_float2(m_run[hi], l_run[hi]);
      } else if (p.splits == 1) {
        const float inv = l_run[hi] > 0.f ? 1.f / l_run[hi] : 0.f;  // a row that saw no key outputs zeros
        T* orow = out + out_row_offset(p, b, h, row, D);
#pragma unroll
        for (int d = 0; d < DT; ++d)
          *reinterpret_cast<uint32_t*>(orow + d * 8 + 2 * t4) = pack2<T>(o[d][2 * hi] * inv, o[d][2 * hi + 1] * inv);
      } else {
        const int64_t prow = (int64_t(bh) * p.splits + split) * p.R + row;
        float* acc = p.part_acc + prow * D;
#pragma unroll
        for (int d = 0; d < DT; ++d)
          *reinterpret_cast<float2*>(acc + d * 8 + 2 * t4) = make_float2(o[d][2 * hi], o[d][2 * hi + 1]);
        if (t4 == 0) p.part_ml[prow] = make_float2(m_run[hi], l_run[hi]);
      }
    }
  }

  // The cluster merge serves any tile (by default the launcher clusters decode tiles only). The fused combine:
  // only 16-row tiles (KW = kWarps) can hold at most the launcher's kFusedCombineMaxRows rows; the other
  // instances never run it, and leaving it out of them keeps it out of their code.
  trace_mark(p.trace, 3, 1);
  if (p.cluster) {
    cluster_merge<T>(p, bh, row0, Tile::kRows, sPart, sML, 1);
  } else {
    if constexpr (KW == kWarps)
      if (p.splits > 1 && p.counters != nullptr)
        fused_combine<T>(p, bh, row_tile, gridDim.x, row0, Tile::kRows, smem_raw);
  }
  trace_mark(p.trace, 4, 1);
#else
  __trap();  // never launched: the launcher checks for sm_80 code first (a loud stop should that check fail)
#endif
}

}  // namespace pass_ext::kernels
