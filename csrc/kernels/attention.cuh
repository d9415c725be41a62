// Device code for attention_with_kv_cache: a flash-decoding kernel (one block per batch row x KV head x
// row tile x KV split, fp32 online softmax), a combine kernel for the splits, and the fused cache append.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pdl.cuh"
#include "trace.h"

namespace pass_ext::kernels {

// Everything the kernels need, on raw pointers. Element type T is one of float, __half, __nv_bfloat16.
//   q [B,Q,Hq,D], k_new/v_new [B,Q,Hkv,D] with token (b, j) at element (b*Q + j) * q_tok / k_tok / v_tok (heads
//   and channels contiguous within a token: the q/k/v slices of a fused qkv projection need no copy),
//   k_cache/v_cache [B,Hkv,S,D], out [B,Q,Hq,D], cache_lens [B],
//   tree_mask [Q, mask_words] bit-packed (nullptr = causal),
//   part_acc [B*Hkv, splits, R, D] fp32 and part_ml [B*Hkv, splits, R] (max, sum), used when splits > 1 and
//   the splits do not run as a cluster.
// A block's "rows" are the R = Q*G query rows that share one KV head: row r is new token r / G of
// q head h*G + r % G, so every K/V byte a block reads serves all of them.
struct AttentionParams {
  const void* q;
  const void* k_new;
  const void* v_new;
  void* k_cache;
  void* v_cache;
  const int32_t* cache_lens;
  const int64_t* tree_mask;
  void* out;
  float* part_acc;
  float2* part_ml;
  // With splits > 1: nullptr (a combine kernel merges the partials) or one zeroed counter per (row x KV
  // head, row tile): the last block of a tile's splits to finish merges them and zeroes its counter again.
  int* counters;
  // 1: the splits of a row tile run as one thread-block cluster (sm_90; cluster rank = split) and merge through
  // distributed shared memory (cluster_merge): no partials in global memory, no counters, no combine kernel.
  int cluster;
  unsigned long long* trace;  // a trace build's slot for this launch (csrc/trace.h), or nullptr
  // 1: the tensor-core kernel's 16-row tiles merge their key warps' states with every thread (attention_mma.cuh);
  // 0 (PASS_EXT_ATTENTION_WARP_MERGE=0, read per call: an A/B switch): key warp 0 merges them alone.
  int warp_merge;
  int64_t q_tok, k_tok, v_tok;  // elements between consecutive new tokens of q / k_new / v_new (H * D if contiguous)
  // 1: the kernel before on the stream writes neither the cache nor cache_lens, so under a dependent launch
  // (pdl.cuh) they may be read before the wait for it (the first tile of cached keys is fetched early).
  int prefetch_cache;
  // Keys a KV split of the CUDA-core kernel covers at least (the launcher's split size: a multiple of kKeyTile,
  // at least kMinSplitKeys unless PASS_EXT_ATTENTION_SPLIT_KEYS asks for fewer); the tensor-core kernel uses
  // kMinSplitKeys.
  int split_keys;
  int B, Q, Hq, Hkv, D, S;
  int G, R, mask_words, splits;
  float scale_log2;  // softmax scale * log2(e): scores live in the log2 domain (exp2f is one instruction)
};

constexpr int kThreads = 128;  // 4 warps; every kernel below assumes it
constexpr int kWarps = kThreads / 32;
constexpr int kKeyTile = 32;   // keys per pipeline stage: one key per lane in the score phase
constexpr int kMinSplitKeys = 64;  // a split covers at least this many keys by default (a multiple of kKeyTile)
constexpr int kMaxSplits = 64;     // KV splits per (row, KV head, row tile) at most (the combine's lanes hold two)
constexpr int kMaxClusterSplits = 16;  // splits merged in a cluster at most (sm_90's non-portable cluster size)

// Where packed query row `row` of KV head h in batch row b lives (token row / G, query head h * G + row % G):
// its element offset in q (tokens q_tok elements apart) and in out ([B, Q, Hq, D], contiguous).
__device__ __forceinline__ int64_t q_row_offset(const AttentionParams& p, int b, int h, int row, int D) {
  return (int64_t(b) * p.Q + row / p.G) * p.q_tok + int64_t(h * p.G + row % p.G) * D;
}
__device__ __forceinline__ int64_t out_row_offset(const AttentionParams& p, int b, int h, int row, int D) {
  return ((int64_t(b) * p.Q + row / p.G) * p.Hq + h * p.G + row % p.G) * D;
}

// The K and V rows of key `key` of (row b, KV head h), whose first L keys are cached (slot `key` of the cache
// rows from cache_row) and the rest new tokens. Keys at or past k_end are padding: false, and k_new / v_new,
// in-bounds addresses that a zero-filling copy never reads.
template <typename T>
__device__ __forceinline__ bool key_rows(const AttentionParams& p, int b, int h, int64_t cache_row, int L, int key,
                                         int k_end, int D, const T*& ks, const T*& vs) {
  const T* k_new = static_cast<const T*>(p.k_new);
  const T* v_new = static_cast<const T*>(p.v_new);
  ks = k_new;
  vs = v_new;
  if (key >= k_end) return false;
  if (key < L) {
    const int64_t off = (cache_row + key) * D;
    ks = static_cast<const T*>(p.k_cache) + off;
    vs = static_cast<const T*>(p.v_cache) + off;
  } else {
    const int64_t tok = int64_t(b) * p.Q + (key - L);
    ks = k_new + tok * p.k_tok + int64_t(h) * D;
    vs = v_new + tok * p.v_tok + int64_t(h) * D;
  }
  return true;
}

// Keys [begin, end) of KV split `split` of `splits` among a row's n keys: equal shares rounded up to a multiple
// of `tile`, at least `min_keys` each (the launcher sizes splits for the capacity; the kernel for the row's
// actual length, so splits past its keys get an empty range).
struct KeyRange {
  int begin, end;
};
__device__ __forceinline__ KeyRange split_key_range(int n, int splits, int split, int tile, int min_keys) {
  const int share = (n + splits - 1) / splits;
  const int chunk = max((share + tile - 1) / tile * tile, min_keys);
  const int begin = split * chunk;
  return {begin, min(n, begin + chunk)};
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N contiguous elements of T (N * sizeof(T) in {4, 8, 16, 32}, aligned to that or to 16) -> floats.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes % 16 == 0, "unsupported vector width");
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) {
      const uint4 u = reinterpret_cast<const uint4*>(src)[w];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < 16 / static_cast<int>(sizeof(T)); ++k) dst[w * (16 / sizeof(T)) + k] = to_float(e[k]);
    }
  } else if constexpr (kBytes == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(src);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = to_float(e[k]);
  } else {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(src);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = to_float(e[k]);
  }
}

// N floats -> N contiguous elements of T, one vector store.
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* dst, const float* src) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "unsupported vector width");
  if constexpr (kBytes == 16) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_float<T>(src[k]);
    *reinterpret_cast<uint4*>(dst) = u;
  } else if constexpr (kBytes == 8) {
    uint2 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_float<T>(src[k]);
    *reinterpret_cast<uint2*>(dst) = u;
  } else {
    uint32_t u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_float<T>(src[k]);
    *reinterpret_cast<uint32_t*>(dst) = u;
  }
}

// 16-byte global -> shared copy that bypasses registers (sm_80+); !valid zero-fills without reading, so
// padding keys hold zeros (a NaN there would survive p = 0 in p * V).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}
// Copies keys kb .. kb + KT - 1 of (row b, KV head h) into rows 0 .. KT - 1 of sK and sV (rows `stride` elements
// apart, `cpr` chunks of CH elements each; the block's threads take chunks in turn) with cp.async, uncommitted;
// keys at or past k_end are zero-filled without a read.
template <typename T, int KT, int CH>
__device__ __forceinline__ void copy_key_tile(const AttentionParams& p, int b, int h, int64_t cache_row, int L,
                                              int kb, int k_end, int D, int cpr, int stride, T* sK, T* sV) {
  for (int idx = int(threadIdx.x); idx < KT * cpr; idx += kThreads) {
    const int kk = idx / cpr, c = idx % cpr;
    const T *ks, *vs;
    const bool valid = key_rows<T>(p, b, h, cache_row, L, kb + kk, k_end, D, ks, vs);
    const int off = kk * stride + c * CH;
    cp_async16(sK + off, ks + c * CH, valid);
    cp_async16(sV + off, vs + c * CH, valid);
  }
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Partials a lane of the split merge has in flight, staged in shared memory: kCombineBatch float4 per lane,
// kCombineStageBytes for a block's kWarps warps.
constexpr int kCombineBatch = 8;
constexpr size_t kCombineStageBytes = size_t(kWarps) * kCombineBatch * 32 * 16;

// One warp merges the split partials of query row `row` of (row x KV head) bh with weights 2^(m_s - M) and
// normalises into out; splits with an empty sum (no key, or no visible key) weigh 0 and their (unwritten)
// partials are never added. Lane s holds split s's (max, sum) (and s + 32), so the row's max and total are
// two warp reductions. The partials come kCombineBatch splits per lane at a time through cp.async into `stage`
// (this warp's kCombineBatch * 32 float4 of shared memory), all in flight before the first is added: a row
// costs a few L2 round trips, not one per split. (Plain loads do not get there: ptxas placed each add right
// after its load, one round trip per split, whatever the source order.) cp.async.cg reads through L2, as the
// fused combine needs: it reads what other SMs wrote in the same launch.
template <typename T>
__device__ __forceinline__ void combine_row(const AttentionParams& p, int bh, int row, int lane, float4* stage) {
  static_assert(kMaxSplits <= 64, "two splits per lane");
  const int b = bh / p.Hkv, h = bh % p.Hkv, D = p.D;
  const float2* ml = p.part_ml + int64_t(bh) * p.splits * p.R + row;  // split s at ml[s * R]
  float2 x[2];
  float M = -INFINITY;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = lane + 32 * i;
    x[i] = s < p.splits ? __ldcg(ml + int64_t(s) * p.R) : make_float2(-INFINITY, 0.f);
    if (x[i].y > 0.f) M = fmaxf(M, x[i].x);
  }
  M = warp_max(M);
  float w[2], total = 0.f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    w[i] = x[i].y > 0.f ? exp2f(x[i].x - M) : 0.f;
    total += w[i] * x[i].y;
  }
  total = warp_sum(total);
  const float inv = total > 0.f ? 1.f / total : 0.f;

  T* o = static_cast<T*>(p.out) + out_row_offset(p, b, h, row, D);
  const float4* acc = reinterpret_cast<const float4*>(p.part_acc + (int64_t(bh) * p.splits * p.R + row) * D);
  const int64_t split_stride = int64_t(p.R) * D / 4;  // float4s from one split's row to the next
  // A row's partial is `per` float4s. When that is at most half a warp (D <= 64) and divides 32, the warp
  // reads `groups` splits at once, one per group of `per` lanes, and adds the groups up at the end.
  const int per = D / 4;
  const int groups = per < 32 && 32 % per == 0 ? 32 / per : 1;
  const int grp = groups > 1 ? lane / per : 0;
  for (int base = 0; base < per; base += 32) {  // every lane runs the loops: the shuffles need the whole warp
    const int d4 = base + (groups > 1 ? lane % per : lane);
    const bool mine = d4 < per;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < p.splits; s0 += kCombineBatch * groups) {
      // Every lane fills kCombineBatch slots with its splits' partials, weighted below. Slots whose weight is 0
      // (past the row's splits or channels, or a split that got no keys and never wrote its partial) are
      // zero-filled without a read; the address stays in bounds all the same.
      float ws[kCombineBatch];
#pragma unroll
      for (int i = 0; i < kCombineBatch; ++i) {
        const int s = s0 + i * groups + grp;  // differs between groups: each lane picks its split's weight
        const float w_lo = __shfl_sync(0xffffffffu, w[0], s & 31), w_hi = __shfl_sync(0xffffffffu, w[1], s & 31);
        ws[i] = s < p.splits && mine ? (s < 32 ? w_lo : w_hi) : 0.f;
        const float4* src = acc + min(s, p.splits - 1) * split_stride + min(d4, per - 1);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        cp_async16(stage + i * 32 + lane, src, ws[i] != 0.f);
#else
        stage[i * 32 + lane] = ws[i] != 0.f ? __ldcg(src) : make_float4(0.f, 0.f, 0.f, 0.f);
#endif
      }
      cp_async_commit();
      cp_async_wait<0>();  // a lane reads back only its own copies
#pragma unroll
      for (int i = 0; i < kCombineBatch; ++i) {
        if (ws[i] != 0.f) {  // an empty split's partial was never written: it must not reach the sum
          const float4 v = stage[i * 32 + lane];
          a.x += ws[i] * v.x;
          a.y += ws[i] * v.y;
          a.z += ws[i] * v.z;
          a.w += ws[i] * v.w;
        }
      }
    }
    for (int o2 = per; o2 < 32 && groups > 1; o2 <<= 1) {
      a.x += __shfl_xor_sync(0xffffffffu, a.x, o2);
      a.y += __shfl_xor_sync(0xffffffffu, a.y, o2);
      a.z += __shfl_xor_sync(0xffffffffu, a.z, o2);
      a.w += __shfl_xor_sync(0xffffffffu, a.w, o2);
    }
    if (mine && grp == 0) {
      const float res[4] = {a.x * inv, a.y * inv, a.z * inv, a.w * inv};
      store_floats<T, 4>(o + d4 * 4, res);
    }
  }
}

// Grid ceil(B*Hkv*R / kWarps), kThreads threads: one warp per query row (combine_row).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_combine_kernel(const AttentionParams p) {
  const int64_t gw = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  __shared__ __align__(16) float4 stage[kCombineStageBytes / 16];
  if (gw >= int64_t(p.B) * p.Hkv * p.R) return;
  combine_row<T>(p, static_cast<int>(gw / p.R), static_cast<int>(gw % p.R), threadIdx.x & 31,
                 stage + (threadIdx.x >> 5) * kCombineBatch * 32);
}

// The fused combine (p.counters set, splits > 1), called by every thread of a block once its partials (or
// its empty marks) are written: the block counts itself done for tile `tile` of bh, and the last of the
// splits to get there merges rows [row0, row0 + rows) of the tile. Fence, barrier, atomic: every partial of a
// block is visible device-wide before its count is; the last block fences again before reading them.
// `smem`: the kernel's dynamic shared memory (at least kCombineStageBytes), which the barrier here frees (the
// block is done with it: every caller has drained its cp.async groups).
template <typename T>
__device__ __forceinline__ void fused_combine(const AttentionParams& p, int bh, int tile, int tiles, int row0,
                                              int rows, unsigned char* smem) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = p.counters + int64_t(bh) * tiles + tile;
    last = atomicAdd(counter, 1) == p.splits - 1;
    if (last) *counter = 0;  // every split of the tile has counted: zeroed for the next launch
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int end = min(row0 + rows, p.R);
  for (int r = row0 + static_cast<int>(threadIdx.x >> 5); r < end; r += kWarps)
    combine_row<T>(p, bh, r, threadIdx.x & 31,
                   reinterpret_cast<float4*>(smem) + (threadIdx.x >> 5) * kCombineBatch * 32);
}

// The cluster merge (p.cluster, splits > 1; sm_90), called by every thread of every block of the cluster once
// the block's partial rows are in its own shared memory: part [tile_rows][D] fp32, unnormalised, and ml
// [tile_rows] (max, sum), with (-inf, 0) from a split that saw no key (its part is never read). A cluster barrier
// publishes them; then groups of `lanes` threads across the cluster each produce 4 output channels of one row,
// lane s reading split s's (max, sum) and partial from block s's shared memory and the group adding them up with
// shuffles. A second barrier keeps every block's shared memory alive until the last read. No global partials,
// atomics or combine launch. The first barrier's release costs a GPU-scope fence (MEMBAR.ALL.GPU on sm_90); the
// second orders only reads, so it arrives relaxed (no fence): every value a thread read has been used before it
// arrives.
//
// Where the cluster's lane groups are fewer than the items (4 channels of a row), a group takes several, one per
// round: a distributed-shared-memory read, then its shuffles, ~0.75 us a round in the 8B's decode attention on the
// H200 (2 rounds at 7 splits; the 1.5B's 3 at 5). Reading up to four rounds before adding any up (one round trip)
// made the replayed steps 1.003x (8B) and 1.013x (1.5B) faster, but the unrolled rounds took this merge from 255 to
// 838 instructions at each of its two call sites, and isolated calls with L2 flushed 1.26x slower (B = 1, L = 4096:
// 15.8 -> 19.8 us; bench/NOTES.md, twenty-sixth H200 session): so one round at a time.
template <typename T>
__device__ __forceinline__ void cluster_merge(const AttentionParams& p, int bh, int row0, int tile_rows,
                                              const float* part, const float2* ml, int trace_kind) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  trace_mark(p.trace, 8, trace_kind);  // trace points: 8 the first barrier passed, 9 the block's outputs stored
  const int C = p.splits;  // the cluster's blocks, rank = split
  const int lanes = C <= 2 ? 2 : C <= 4 ? 4 : C <= 8 ? 8 : 16;
  const int per = p.D / 4;  // float4s per row
  const int rows = min(tile_rows, p.R - row0);
  const int items = rows * per;
  const int groups = kThreads / lanes;  // per block
  const int s = threadIdx.x % lanes, sc = min(s, C - 1);
  const int first = static_cast<int>(cluster.block_rank()) * groups + static_cast<int>(threadIdx.x) / lanes;
  const float2* peer_ml = cluster.map_shared_rank(ml, sc);
  const float4* peer_part = reinterpret_cast<const float4*>(cluster.map_shared_rank(part, sc));
  const int b = bh / p.Hkv, h = bh % p.Hkv;
  // The trip count is the same for every thread (the shuffles need whole warps); lanes past the items idle.
  for (int base = 0; base < items; base += C * groups) {
    const int item = base + first;
    const bool valid = item < items;
    const int r = valid ? item / per : 0, c4 = valid ? item % per : 0;
    const float2 x = s < C && valid ? peer_ml[r] : make_float2(-INFINITY, 0.f);
    const float4 v = peer_part[r * per + c4];  // garbage for an empty split: selected away below
    float M = x.y > 0.f ? x.x : -INFINITY;
    for (int o = 1; o < lanes; o <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float w = x.y > 0.f ? exp2f(x.x - M) : 0.f;
    float tot = w * x.y;
    float4 a = w != 0.f ? make_float4(w * v.x, w * v.y, w * v.z, w * v.w) : make_float4(0.f, 0.f, 0.f, 0.f);
    for (int o = 1; o < lanes; o <<= 1) {
      tot += __shfl_xor_sync(0xffffffffu, tot, o);
      a.x += __shfl_xor_sync(0xffffffffu, a.x, o);
      a.y += __shfl_xor_sync(0xffffffffu, a.y, o);
      a.z += __shfl_xor_sync(0xffffffffu, a.z, o);
      a.w += __shfl_xor_sync(0xffffffffu, a.w, o);
    }
    if (valid && s == 0) {
      const int row = row0 + r;
      const float inv = tot > 0.f ? 1.f / tot : 0.f;  // a row that saw no key outputs zeros
      const float res[4] = {a.x * inv, a.y * inv, a.z * inv, a.w * inv};
      T* o = static_cast<T*>(p.out) + out_row_offset(p, b, h, row, p.D);
      store_floats<T, 4>(o + c4 * 4, res);
    }
  }
  trace_mark(p.trace, 9, trace_kind);
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  cluster.barrier_wait();
#else
  __trap();  // never launched: the launcher sets p.cluster only for sm_90 code
#endif
}

// Compile-time shape of one attention kernel instance.
//   D_MAX: head dim bound (smem row length); EXACT: D == D_MAX, otherwise D is read at run time (any
//   multiple of 8 up to D_MAX). E: contiguous head-dim elements a lane owns in the P.V phase.
//   RT: query rows per block (RT / 4 per warp).
template <typename T, int D_MAX, int E, bool EXACT, int RT>
struct AttentionTile {
  static_assert(RT % kWarps == 0 && D_MAX % (32 * E) == 0 && D_MAX % 8 == 0, "bad tile shape");
  static constexpr int kRowsPerWarp = RT / kWarps;
  static constexpr int kChunk = 16 / sizeof(T);            // elements per 16-byte copy
  static constexpr int kStride = D_MAX + kChunk;           // +16 B per smem K/V row: conflict-free lanes
  static constexpr int kGroups = D_MAX / (32 * E);         // E-element groups per lane in P.V
  static constexpr size_t kKVBytes = size_t(2) * 2 * kKeyTile * kStride * sizeof(T);  // K,V x 2 stages
  static constexpr size_t kSmemBytes = kKVBytes + sizeof(float) * (size_t(RT) * D_MAX + size_t(RT) * kKeyTile);
  static_assert(kSmemBytes >= kCombineStageBytes, "the fused combine stages its partials in the ring");
  // The cluster merge's partial rows [RT][D] fp32 and their (max, sum) [RT], in the K/V ring once it is idle.
  static constexpr size_t kPartBytes = sizeof(float) * size_t(RT) * D_MAX;
  static_assert(kPartBytes + sizeof(float2) * RT <= kKVBytes, "the cluster merge's partials fit the ring");
};

// Grid (splits, ceil(R / RT), B * Hkv), kThreads threads, AttentionTile::kSmemBytes dynamic smem.
// Each block: (1) appends its share of the new tokens' K/V to the cache, (2) streams keys
// [k_begin, k_end) of its split — cached slots first, then the new tokens from k_new/v_new — through a
// two-stage cp.async pipeline, (3) keeps a running max/sum per row in fp32 and writes either the final
// output (splits == 1) or an unnormalised partial for the combine kernel.
template <typename T, int D_MAX, int E, bool EXACT, int RT>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttentionParams p) {
  using Tile = AttentionTile<T, D_MAX, E, EXACT, RT>;
  constexpr int TRS = Tile::kRowsPerWarp, KT = kKeyTile, STRIDE = Tile::kStride, CH = Tile::kChunk;
  constexpr int kPVUnroll = TRS >= 8 ? 1 : 4;  // many rows already give the P.V loop its parallelism
  const int D = EXACT ? D_MAX : p.D;
  const int cpr = D / CH;  // 16-byte chunks per K/V/q row

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);                       // [2][KT][STRIDE]
  T* sV = sK + 2 * KT * STRIDE;                                 // [2][KT][STRIDE]
  float* sQ = reinterpret_cast<float*>(smem_raw + Tile::kKVBytes);  // [RT][D_MAX], pre-scaled
  float* sP = sQ + RT * D_MAX;                                  // [RT][KT] probabilities of the tile

  const int split = blockIdx.x, row_tile = blockIdx.y, bh = blockIdx.z;
  const int b = bh / p.Hkv, h = bh % p.Hkv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* q = static_cast<const T*>(p.q);
  const T* k_new = static_cast<const T*>(p.k_new);
  const T* v_new = static_cast<const T*>(p.v_new);
  T* k_cache = static_cast<T*>(p.k_cache);
  T* v_cache = static_cast<T*>(p.v_cache);
  const int64_t cache_row = (int64_t(b) * p.Hkv + h) * p.S;  // slot 0 of this (row, head), in rows of D

  trace_mark(p.trace, 0, 4);  // trace points: 0 entry, 1 wait done, 3 the block's rows written, 4 the end
  // q, k_new and v_new come from the kernel before (a dependent launch: pdl.cuh), so everything waits for it,
  // except with prefetch_cache, where the caller promises that that kernel writes neither the cache nor
  // cache_lens: then cache_lens and the split's first tile, when it holds cached keys only, are read first.
  if (!p.prefetch_cache) {
    wait_for_inputs();
    release_dependents();
  }
  // The kernel never trusts cache_lens: reads see slots [0, clamp(len, 0, S)), writes skip slots
  // outside [0, S). Reads (< L) and writes (>= len) never meet, so blocks need no ordering.
  const int len = p.cache_lens[b];
  const int L = min(max(len, 0), p.S);

  // This split's keys: L cached, then Q new. The split size is computed per row on the device, so ragged rows
  // balance across splits without the host reading cache_lens.
  const KeyRange keys = split_key_range(L + p.Q, p.splits, split, KT, p.split_keys);
  const int k_begin = keys.begin, k_end = keys.end;

  auto load_tile = [&](int t, int stage) {
    copy_key_tile<T, KT, CH>(p, b, h, cache_row, L, k_begin + t * KT, k_end, D, cpr, STRIDE,
                             sK + stage * KT * STRIDE, sV + stage * KT * STRIDE);
    cp_async_commit();
  };
  const bool early = p.prefetch_cache && k_begin < k_end && k_begin + KT <= L;
  if (early) load_tile(0, 0);
  if (p.prefetch_cache) {
    wait_for_inputs();
    release_dependents();
  }

  trace_mark(p.trace, 1, 4);
  // (1) Append. Every block of this (row, head) takes every nblk-th new token.
  {
    const int lin = row_tile * gridDim.x + split, nblk = gridDim.x * gridDim.y;
    if (lin < p.Q) {
      const int mine = (p.Q - lin + nblk - 1) / nblk;
      for (int idx = tid; idx < mine * cpr; idx += kThreads) {
        const int j = lin + (idx / cpr) * nblk, c = idx % cpr;
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
  const int row0 = row_tile * RT;
  float* sPart = reinterpret_cast<float*>(smem_raw);                     // cluster merge: [RT][D]
  float2* sML = reinterpret_cast<float2*>(smem_raw + Tile::kPartBytes);  // and [RT] (max, sum)
  if (k_begin >= k_end) {  // only when splits > 1: mark empty so the merge skips it
    for (int r = tid; r < RT; r += kThreads) {
      if (p.cluster)
        sML[r] = make_float2(-INFINITY, 0.f);
      else if (row0 + r < p.R)
        p.part_ml[(int64_t(bh) * p.splits + split) * p.R + row0 + r] = make_float2(-INFINITY, 0.f);
    }
    trace_mark(p.trace, 3, 4);
    if (p.cluster)
      cluster_merge<T>(p, bh, row0, RT, sPart, sML, 4);  // every block of the cluster takes part, empty or not
    else if (p.counters != nullptr)
      fused_combine<T>(p, bh, row_tile, gridDim.y, row0, RT, smem_raw);
    trace_mark(p.trace, 4, 4);
    return;
  }
  const int n_tiles = (k_end - k_begin + KT - 1) / KT;
  if (!early) load_tile(0, 0);

  // q rows of this tile -> fp32 smem, pre-scaled into the log2 domain; padding rows are zeros.
  for (int idx = tid; idx < RT * cpr; idx += kThreads) {
    const int r = idx / cpr, c = idx % cpr, row = row0 + r;
    float f[CH];
    if (row < p.R) {
      load_floats<T, CH>(q + q_row_offset(p, b, h, row, D) + c * CH, f);
    } else {
#pragma unroll
      for (int k = 0; k < CH; ++k) f[k] = 0.f;
    }
    float4* dst = reinterpret_cast<float4*>(sQ + r * D_MAX + c * CH);
#pragma unroll
    for (int k = 0; k < CH / 4; ++k)
      dst[k] = make_float4(f[4 * k] * p.scale_log2, f[4 * k + 1] * p.scale_log2, f[4 * k + 2] * p.scale_log2,
                           f[4 * k + 3] * p.scale_log2);
  }

  float acc[TRS][Tile::kGroups * E];
  float m_run[TRS], l_lane[TRS];
#pragma unroll
  for (int r = 0; r < TRS; ++r) {
    m_run[r] = -INFINITY;
    l_lane[r] = 0.f;
#pragma unroll
    for (int e = 0; e < Tile::kGroups * E; ++e) acc[r][e] = 0.f;
  }
  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < n_tiles) {
      load_tile(t + 1, stage ^ 1);  // overwrites the stage read in iteration t-1 (closed by its barrier)
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // Scores: lane = key of the tile, the warp's TRS rows in registers.
    float s[TRS];
#pragma unroll
    for (int r = 0; r < TRS; ++r) s[r] = 0.f;
    const T* k_row = sK + (stage * KT + lane) * STRIDE;
#pragma unroll
    for (int c = 0; c < D_MAX / 8; ++c) {
      if (!EXACT && c * 8 >= D) break;
      float kf[8];
      load_floats<T, 8>(k_row + c * 8, kf);
#pragma unroll
      for (int r = 0; r < TRS; ++r) {
        const float4 qa = *reinterpret_cast<const float4*>(sQ + (warp * TRS + r) * D_MAX + c * 8);
        const float4 qb = *reinterpret_cast<const float4*>(sQ + (warp * TRS + r) * D_MAX + c * 8 + 4);
        s[r] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                qb.z * kf[6] + qb.w * kf[7];
      }
    }

    // Mask: cached keys are always visible; new key j is visible to token i per the tree mask (or j <= i).
    // Only the last tiles hold new keys or padding, so the others skip this (a warp-uniform branch).
    const int tile_begin = k_begin + t * KT;
    if (tile_begin + KT > L || tile_begin + KT > k_end) {
      const int key = tile_begin + lane, j = key - L;
      const bool in_range = key < k_end, is_new = key >= L;
#pragma unroll
      for (int r = 0; r < TRS; ++r) {
        bool visible = in_range;
        if (visible && is_new) {
          const int tok = min((row0 + warp * TRS + r) / p.G, p.Q - 1);  // clamped for padding rows
          visible = p.tree_mask ? ((p.tree_mask[tok * p.mask_words + (j >> 6)] >> (j & 63)) & 1) != 0
                                : j <= tok;
        }
        if (!visible) s[r] = -INFINITY;
      }
    }

    // Online softmax. The running max is warp-uniform, so per-lane partial sums rescale consistently and
    // are reduced once at the end.
#pragma unroll
    for (int r = 0; r < TRS; ++r) {
      const float m_new = fmaxf(m_run[r], warp_max(s[r]));
      const bool none = m_new == -INFINITY;  // no visible key yet: keep zeros, avoid -inf - -inf
      const float alpha = none ? 1.f : exp2f(m_run[r] - m_new);
      const float pr = none ? 0.f : exp2f(s[r] - m_new);
      m_run[r] = m_new;
      l_lane[r] = l_lane[r] * alpha + pr;
#pragma unroll
      for (int e = 0; e < Tile::kGroups * E; ++e) acc[r][e] *= alpha;
      sP[(warp * TRS + r) * KT + lane] = pr;
    }
    __syncwarp();

    // P.V: lane owns E-element groups of the head dim; 4 keys per step so p loads are float4 broadcasts.
    const T* v_tile = sV + stage * KT * STRIDE;
#pragma unroll(kPVUnroll)
    for (int k4 = 0; k4 < KT; k4 += 4) {
      float vf[4][Tile::kGroups * E];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int gi = 0; gi < Tile::kGroups; ++gi) {
          const int col = (lane + 32 * gi) * E;
          float tmp[E];
          if (EXACT || col < D) {
            load_floats<T, E>(v_tile + (k4 + kk) * STRIDE + col, tmp);
          } else {
#pragma unroll
            for (int e = 0; e < E; ++e) tmp[e] = 0.f;
          }
#pragma unroll
          for (int e = 0; e < E; ++e) vf[kk][gi * E + e] = tmp[e];
        }
#pragma unroll
      for (int r = 0; r < TRS; ++r) {
        const float4 pk = *reinterpret_cast<const float4*>(sP + (warp * TRS + r) * KT + k4);
#pragma unroll
        for (int e = 0; e < Tile::kGroups * E; ++e)
          acc[r][e] += pk.x * vf[0][e] + pk.y * vf[1][e] + pk.z * vf[2][e] + pk.w * vf[3][e];
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // (3) Write out: final rows when there is one split, else unnormalised partials and (max, sum) — into this
  // block's shared memory for the cluster merge (the ring is idle: the loop ended on a barrier), else global.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < TRS; ++r) {
    const float l = warp_sum(l_lane[r]);
    const int row = row0 + warp * TRS + r;
    if (row >= p.R) continue;
    if (p.cluster) {
      float* o = sPart + (warp * TRS + r) * D;
#pragma unroll
      for (int gi = 0; gi < Tile::kGroups; ++gi) {
        const int col = (lane + 32 * gi) * E;
        if (!EXACT && col >= D) continue;
        store_floats<float, E>(o + col, &acc[r][gi * E]);
      }
      if (lane == 0) sML[warp * TRS + r] = make_float2(m_run[r], l);
    } else if (p.splits == 1) {
      const float inv = l > 0.f ? 1.f / l : 0.f;  // a row that saw no key outputs zeros
      T* o = out + out_row_offset(p, b, h, row, D);
#pragma unroll
      for (int gi = 0; gi < Tile::kGroups; ++gi) {
        const int col = (lane + 32 * gi) * E;
        if (!EXACT && col >= D) continue;
        float v[E];
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] = acc[r][gi * E + e] * inv;
        store_floats<T, E>(o + col, v);
      }
    } else {
      const int64_t prow = (int64_t(bh) * p.splits + split) * p.R + row;
      float* o = p.part_acc + prow * D;
#pragma unroll
      for (int gi = 0; gi < Tile::kGroups; ++gi) {
        const int col = (lane + 32 * gi) * E;
        if (!EXACT && col >= D) continue;
        store_floats<float, E>(o + col, &acc[r][gi * E]);
      }
      if (lane == 0) p.part_ml[prow] = make_float2(m_run[r], l);
    }
  }
  trace_mark(p.trace, 3, 4);
  if (p.cluster)
    cluster_merge<T>(p, bh, row0, RT, sPart, sML, 4);
  else if (p.splits > 1 && p.counters != nullptr)
    fused_combine<T>(p, bh, row_tile, gridDim.y, row0, RT, smem_raw);
  trace_mark(p.trace, 4, 4);
}

}  // namespace pass_ext::kernels
