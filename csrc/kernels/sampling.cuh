// Token sampling shared by sample and speculative_verify: the warped distribution of one row of logits
// (temperature, top-k, top-p), the exponential race that draws from it, and the CUDA block-level passes.
//
// Warp of one row l[V] with (T, top_k, top_p):
//   * NaN logits count as -inf. T <= 0 or NaN is greedy: all mass on argmax l (lowest index among ties).
//   * Otherwise z = l * (1/T), clamped to +-FLT_MAX (T clamped to [FLT_MIN, FLT_MAX], 1/T to >= FLT_MIN).
//     A row whose logits are all -inf/NaN is one-hot at token 0 (its argmax under the tie rule).
//   * top-k (0 < top_k < V, else off): keep z >= the top_k-th largest z, so ties with it are kept.
//   * softmax over the kept tokens, as weights w = exp(z - max z) in [0, 1].
//   * top-p (top_p < 1, else off; top_p <= 0 keeps only the maximum): keep the smallest set of highest-z
//     tokens whose mass reaches top_p, plus every token tied with the last one kept; renormalise.
// The mass comparisons run on w in fixed point (w * 2^43 as uint64), which adds exactly in any order: the
// kept set is deterministic under atomics and the same on CPU and GPU given the same w.
//
// A categorical draw from weights w is the exponential race: argmax_j w_j / E_j with E_j = -log(U_j) i.i.d.
// Exp(1) (lowest index among ties), which needs neither normalisation nor a sort and is exact.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/philox.cuh"

namespace pass_ext::sampling {

// RNG stream tags (see philox::Stream): distinct per use, so ops may share one offset.
constexpr uint32_t kStreamSample = 1;    // sample: the token of each row
constexpr uint32_t kStreamAccept = 2;    // speculative_verify: acceptance uniform of draft i
constexpr uint32_t kStreamResidual = 3;  // speculative_verify: residual or bonus draw at position i

constexpr int64_t kMaxVocab = int64_t{1} << 20;  // keeps V * 2^43 below 2^63
constexpr int64_t kMaxDrafts = 255;              // the draw index of the bonus token fits the 8-bit field
constexpr float kMassScale = 8796093022208.0f;   // 2^43
constexpr double kMassUnit = 1.0 / 8796093022208.0;

PASS_EXT_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PASS_EXT_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Correctly rounded arithmetic on both sides, whatever the device math flags: z, probabilities and race
// scores must round the same way on CPU and GPU.
PASS_EXT_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

PASS_EXT_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// exp of a non-positive argument (a weight in [0, 1]); the device uses the fast exp2-based intrinsic.
PASS_EXT_HD float exp_weight(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// An Exp(1) variate from 32 random bits: -log(1 - u), accurate at both ends of u in (0, 1).
PASS_EXT_HD float exponential(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return -log1pf(-philox::uniform_open(bits));
#else
  return -std::log1p(-philox::uniform_open(bits));
#endif
}

// Order-preserving map float -> uint32 (a < b  <=>  key(a) < key(b) for non-NaN floats).
PASS_EXT_HD uint32_t order_key(float f) {
  uint32_t u = float_bits(f);
  if (u == 0x80000000u) u = 0u;  // -0.0 ties with +0.0, as in torch.argmax and the "ties kept" rule
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

PASS_EXT_HD float key_float(uint32_t k) { return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

PASS_EXT_HD bool is_nan(float f) { return (float_bits(f) & 0x7fffffffu) > 0x7f800000u; }

PASS_EXT_HD float clean_logit(float l) { return is_nan(l) ? -INFINITY : l; }

// Sampling needs T in (0, +inf] (denormals included, decided on the bits so device flush-to-zero agrees);
// zero, negative and NaN temperatures are greedy.
PASS_EXT_HD bool is_greedy(float temperature) {
  const uint32_t u = float_bits(temperature);
  return !(u > 0u && u <= 0x7f800000u);
}

// 1/T for a sampling row, with T clamped to the normal floats [FLT_MIN, FLT_MAX] and 1/T to at least FLT_MIN:
// z = l * (1/T) is then never NaN (0 * inf, inf * 0), and device flush-to-zero changes nothing.
PASS_EXT_HD float inverse_temperature(float temperature) {
  const float t = temperature < FLT_MIN ? FLT_MIN : (temperature > FLT_MAX ? FLT_MAX : temperature);
  const float inv = div_rn(1.f, t);
  return inv < FLT_MIN ? FLT_MIN : inv;
}

PASS_EXT_HD float scaled_logit(float l, float inv_temperature) {
  if (is_nan(l) || l == -INFINITY) return -INFINITY;
  const float z = mul_rn(l, inv_temperature);
  return z > FLT_MAX ? FLT_MAX : (z < -FLT_MAX ? -FLT_MAX : z);
}

PASS_EXT_HD int32_t effective_top_k(int32_t top_k, int64_t vocab) { return (top_k > 0 && top_k < vocab) ? top_k : 0; }

PASS_EXT_HD bool top_p_active(float top_p) { return top_p < 1.f; }  // NaN: off

PASS_EXT_HD uint64_t fixed_mass(float w) { return static_cast<uint64_t>(w * kMassScale); }

// The fixed-point mass the top-p set must reach: ceil(top_p * total), at least 1 (so the maximum is always
// kept) and at most total.
PASS_EXT_HD uint64_t top_p_target(float top_p, uint64_t total) {
  const double t = top_p > 0.f ? ceil(static_cast<double>(top_p) * static_cast<double>(total)) : 1.0;
  if (t >= static_cast<double>(total)) return total;
  return t < 1.0 ? 1 : static_cast<uint64_t>(t);
}

// The warped distribution of one row, as a rule applied to each logit: weight(l_j, j) / mass.
struct Warp {
  bool one_hot;          // greedy row, or no finite logit: all mass on `argmax`
  int32_t argmax;        // of l (greedy) or z, lowest index among ties
  float inv_temperature;
  float zmax;
  uint32_t keep_key;     // kept tokens: order_key(z) >= keep_key (top-k and top-p thresholds)
  float mass;            // sum of the kept weights (>= 1: the maximum has weight 1)

  PASS_EXT_HD float weight(float logit, int32_t j) const {
    if (one_hot) return j == argmax ? 1.f : 0.f;
    const float z = scaled_logit(logit, inv_temperature);
    return order_key(z) >= keep_key ? exp_weight(z - zmax) : 0.f;
  }
  PASS_EXT_HD float prob(float logit, int32_t j) const { return div_rn(weight(logit, j), mass); }
};

// Race score of a token with weight w > 0 and 32 random bits; the token with the largest score wins.
PASS_EXT_HD float race_score(float w, uint32_t bits) { return div_rn(w, exponential(bits)); }

// Race entries pack (score, -index) in 64 bits so a plain max picks the best score, then the lowest index;
// 0 means "no token with positive weight". Scores are non-negative, so their bits order like the floats.
PASS_EXT_HD uint64_t race_entry(float score, int32_t j) {
  return (static_cast<uint64_t>(float_bits(score)) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}
PASS_EXT_HD int32_t race_winner(uint64_t entry) {
  return entry == 0 ? -1 : static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(entry));
}

}  // namespace pass_ext::sampling

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/pdl.cuh"

namespace pass_ext::sampling::cuda {

constexpr int kThreads = 1024;  // one block per row; every block-level helper assumes a multiple of 32
constexpr unsigned kFullMask = 0xffffffffu;
using u64 = unsigned long long;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

constexpr int kSubHists = 8;  // radix-select histogram copies; warp w adds into copy w % kSubHists

struct Scratch {
  u64 hist[256];  // radix-select histogram: token counts or fixed-point masses per 8-bit digit
  u64 sub[kSubHists][256];  // the copies the warps add into during a pass, summed into hist after it
  u64 red[32];    // one partial per warp for block reductions
  u64 above;      // radix select: mass strictly above the chosen digit
  u64 at_or_above;
  int digit;
};

__device__ __forceinline__ u64 warp_max(u64 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Two 32-bit reductions (redux.sync, one instruction each) instead of five rounds of two shuffles and a 64-bit
  // compare: the largest upper half, then the largest lower half among the lanes that hold it (the others offer 0).
  const uint32_t hi = __reduce_max_sync(kFullMask, uint32_t(v >> 32));
  const uint32_t lo = __reduce_max_sync(kFullMask, uint32_t(v >> 32) == hi ? uint32_t(v) : 0u);
  return (u64(hi) << 32) | lo;
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
#endif
}
__device__ __forceinline__ u64 warp_sum(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Block-wide max / sum of integers (exact, so deterministic); every thread gets the result. The leading
// barrier lets consecutive calls reuse `red`.
template <bool kMax>
__device__ __forceinline__ u64 block_reduce(u64 v, Scratch& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) s.red[warp] = v;
  __syncthreads();
  v = lane < warps ? s.red[lane] : 0;
  return kMax ? warp_max(v) : warp_sum(v);
}

// Visits the row in groups of four consecutive tokens (one Philox block each): f(group, first token, l[4]).
// Tokens past V read as -inf; callers check j < V.
// kUnroll groups are loaded before any is used: one block reads a whole row, so its speed is the number of
// loads in flight (the H200 took ~20 µs per pass over 128k logits with one group in flight per thread).
constexpr int kUnroll = 4;

template <typename T, typename F>
__device__ __forceinline__ void for_each_group(const T* row, int vocab, F&& f) {
  const int step = int(blockDim.x);
  for (int g0 = threadIdx.x; g0 * 4 < vocab; g0 += kUnroll * step) {
    float l[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j0 = (g0 + u * step) * 4;
#pragma unroll
      for (int c = 0; c < 4; ++c) l[u][c] = j0 + c < vocab ? to_float(row[j0 + c]) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int g = g0 + u * step;
      if (g * 4 < vocab) f(g, g * 4, l[u]);
    }
  }
}

// Argmax (lowest index among ties) of the row's keys: raw logits (greedy) or z; returns the packed entry
// (key << 32 | ~index).
template <typename T>
__device__ u64 row_argmax(const T* row, int vocab, bool greedy, float inv_temperature, Scratch& s) {
  u64 best = 0;
  for_each_group(row, vocab, [&](int, int j0, const float* l) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (j0 + c >= vocab) break;
      const float v = greedy ? clean_logit(l[c]) : scaled_logit(l[c], inv_temperature);
      best = max(best, (u64(order_key(v)) << 32) | (0xffffffffu - unsigned(j0 + c)));
    }
  });
  return block_reduce<true>(best, s);
}

// Warp 0 picks the digit of the current radix pass: the largest digit d whose bucket holds positive mass
// and with mass(above) + mass(digits >= d) >= target. With `first_mass_pass` the target is first derived
// from the pass's total (top-p). Lane l owns digits 8l..8l+7.
__device__ __forceinline__ void select_digit(Scratch& s, u64 above, u64& target, bool first_mass_pass,
                                             float top_p) {
  const int lane = threadIdx.x & 31;
  u64 h[8];
  u64 lane_total = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) lane_total += (h[b] = s.hist[lane * 8 + b]);
  u64 lanes_at_or_above = lane_total;  // inclusive suffix sum over lanes
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_down_sync(kFullMask, lanes_at_or_above, o);
    if (lane + o < 32) lanes_at_or_above += t;
  }
  if (first_mass_pass) target = top_p_target(top_p, __shfl_sync(kFullMask, lanes_at_or_above, 0));
  const u64 lanes_above = lanes_at_or_above - lane_total;
  int best = -1;
  u64 run = lanes_above;
#pragma unroll
  for (int b = 7; b >= 0; --b) {
    run += h[b];
    if (best < 0 && h[b] > 0 && above + run >= target) best = lane * 8 + b;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(kFullMask, best, o));
  if (best < 0) {  // target unreachable (cannot happen with exact integer masses): keep everything here
    int lowest = 256;
#pragma unroll
    for (int b = 7; b >= 0; --b)
      if (h[b] > 0) lowest = lane * 8 + b;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lowest = min(lowest, __shfl_xor_sync(kFullMask, lowest, o));
    best = lowest < 256 ? lowest : 0;
  }
  u64 mine = lanes_above;
#pragma unroll
  for (int b = 0; b < 8; ++b)
    if (lane * 8 + b >= best) mine += h[b];
  const u64 at_or_above = above + __shfl_sync(kFullMask, mine, best >> 3);
  if (lane == 0) {
    s.digit = best;
    s.at_or_above = at_or_above;
    s.above = at_or_above - s.hist[best];
  }
}

// Adds m to bucket `bucket` (< 256; 256 = nothing to add) of a histogram copy, one atomic per distinct bucket
// per warp: the lanes holding the same bucket are summed first (logits crowd into a few top digits, and 32
// lanes adding to one shared address serialise). All 32 lanes must call it together.
template <bool kMass>
__device__ __forceinline__ void hist_add(u64* hist, unsigned bucket, u64 m) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (__ballot_sync(kFullMask, bucket < 256) == 0) return;  // later passes: most warps hold no candidate
  const unsigned peers = __match_any_sync(kFullMask, bucket);
  if (bucket >= 256) return;
  u64 total;
  if constexpr (kMass) {  // m <= 2^43: two 22-bit halves, each summed over <= 32 lanes, fit in 32 bits
    const unsigned lo = __reduce_add_sync(peers, unsigned(m & 0x3fffffu));
    const unsigned hi = __reduce_add_sync(peers, unsigned(m >> 22));
    total = (u64(hi) << 22) + lo;
  } else {
    total = u64(__popc(peers));
  }
  if ((threadIdx.x & 31) == unsigned(__ffs(peers) - 1)) atomicAdd(&hist[bucket], total);
#else
  if (bucket < 256) atomicAdd(&hist[bucket], m);
#endif
}

// Radix select over order_key(z) of the tokens with key >= floor_key, 8 bits per pass from the top.
// kMass = false: finds the target-th largest key (top-k threshold). kMass = true: the largest key whose
// at-or-above mass reaches top_p_target(top_p, total mass) (top-p threshold), or `target` where it is not 0 (a
// nucleus row's, from its whole mass); *at_or_above gets that mass.
// visit(f) calls f(z, valid) once for every token of the set (valid = false for padding), the same number of
// times on every thread, as hist_add needs; it may be called once per pass.
template <bool kMass, typename Visit>
__device__ uint32_t radix_select_by(Visit&& visit, float zmax, uint32_t floor_key, u64 target, float top_p,
                                    Scratch& s, u64* at_or_above) {
  uint32_t prefix = 0, mask = 0;
  u64 above = 0, at = 0;
  u64* hist = s.sub[(threadIdx.x >> 5) % kSubHists];
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kSubHists * 256; i += blockDim.x) (&s.sub[0][0])[i] = 0;
    __syncthreads();
    visit([&](float z, bool valid) {
      unsigned bucket = 256;
      u64 m = 0;
      if (valid) {
        const uint32_t key = order_key(z);
        if (key >= floor_key && (key & mask) == prefix) {
          m = kMass ? fixed_mass(exp_weight(z - zmax)) : 1;
          if (m) bucket = (key >> shift) & 255u;
        }
      }
      hist_add<kMass>(hist, bucket, m);
    });
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      u64 sum = 0;
#pragma unroll
      for (int c = 0; c < kSubHists; ++c) sum += s.sub[c][i];
      s.hist[i] = sum;
    }
    __syncthreads();
    if (threadIdx.x < 32) select_digit(s, above, target, kMass && shift == 24 && target == 0, top_p);
    __syncthreads();
    prefix |= uint32_t(s.digit) << shift;
    mask |= 0xffu << shift;
    above = s.above;
    at = s.at_or_above;
  }
  if (at_or_above) *at_or_above = at;
  return prefix;
}

// radix_select_by over a whole row: every thread runs the same number of rounds (lanes past the row visit
// padding), loading kUnroll groups before using any, as in for_each_group.
template <bool kMass, typename T>
__device__ uint32_t radix_select(const T* row, int vocab, float inv_temperature, float zmax, uint32_t floor_key,
                                 u64 target, float top_p, Scratch& s, u64* at_or_above) {
  const int step = int(blockDim.x);
  const int rounds = ((vocab + 3) / 4 + kUnroll * step - 1) / (kUnroll * step);
  auto visit = [&](auto&& f) {
    for (int r = 0; r < rounds; ++r) {
      float l[kUnroll][4];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j0 = ((r * kUnroll + u) * step + int(threadIdx.x)) * 4;
#pragma unroll
        for (int c = 0; c < 4; ++c) l[u][c] = j0 + c < vocab ? to_float(row[j0 + c]) : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j0 = ((r * kUnroll + u) * step + int(threadIdx.x)) * 4;
#pragma unroll
        for (int c = 0; c < 4; ++c) f(scaled_logit(l[u][c], inv_temperature), j0 + c < vocab);
      }
    }
  };
  return radix_select_by<kMass>(visit, zmax, floor_key, target, top_p, s, at_or_above);
}

// The warped distribution of one row (see the header); all threads of the block call it and get the same.
template <typename T>
__device__ Warp warp_row(const T* row, int vocab, float temperature, int32_t top_k, float top_p, Scratch& s) {
  Warp w{};
  const bool greedy = is_greedy(temperature);
  w.inv_temperature = greedy ? 1.f : inverse_temperature(temperature);
  const u64 best = row_argmax(row, vocab, greedy, w.inv_temperature, s);
  w.argmax = race_winner(best);
  w.zmax = key_float(uint32_t(best >> 32));
  w.mass = 1.f;
  w.one_hot = greedy || w.zmax == -INFINITY;
  if (w.one_hot) return w;
  w.keep_key = 0;
  const int32_t k = effective_top_k(top_k, vocab);
  if (k > 0) w.keep_key = radix_select<false>(row, vocab, w.inv_temperature, w.zmax, 0, u64(k), 0.f, s, nullptr);
  u64 mass = 0;
  if (top_p_active(top_p)) {
    w.keep_key = radix_select<true>(row, vocab, w.inv_temperature, w.zmax, w.keep_key, 0, top_p, s, &mass);
  } else {
    for_each_group(row, vocab, [&](int, int j0, const float* l) {
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (j0 + c < vocab) mass += fixed_mass(w.weight(l[c], j0 + c));
    });
    mass = block_reduce<false>(mass, s);
  }
  w.mass = float(double(mass) * kMassUnit);
  return w;
}

// One group of the exponential race: tokens j0..j0+3 (group g, logits l; tokens past the row have weight 0)
// with weights weight_fn(l_j, j) >= 0 (it may also record them) enter `best`; Philox runs only for a group
// holding a positive weight.
template <typename WeightFn>
__device__ __forceinline__ void race_group(u64& best, const philox::Stream& rng, int g, int j0, const float* l,
                                           int vocab, WeightFn&& weight_fn) {
  float w[4];
  bool any = false;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    w[c] = j0 + c < vocab ? weight_fn(l[c], j0 + c) : 0.f;
    any |= w[c] > 0.f;
  }
  if (!any) return;
  const philox::Block r = rng.group(uint32_t(g));
#pragma unroll
  for (int c = 0; c < 4; ++c)
    if (w[c] > 0.f) best = max(best, u64(race_entry(race_score(w[c], r.v[c]), j0 + c)));
}

// Exponential race over the row: weight_fn(l_j, j) -> w_j >= 0 (may also record w_j); returns the winner,
// or -1 when no token has positive weight.
template <typename T, typename WeightFn>
__device__ int32_t race(const T* row, int vocab, const philox::Stream& rng, WeightFn&& weight_fn, Scratch& s) {
  u64 best = 0;
  for_each_group(row, vocab, [&](int g, int j0, const float* l) { race_group(best, rng, g, j0, l, vocab, weight_fn); });
  return race_winner(block_reduce<true>(best, s));
}

// ---- Split rows ------------------------------------------------------------------------------------------------
// One block per row makes about ten passes over the vocabulary on one SM (argmax, four radix passes per
// threshold, mass, race), bound by its instruction rate. Rows with a small top-k (the common case) need only
// the few tokens at the top, and the race needs only the tokens with positive weight. So:
//   filter_chunks: one block per chunk of kChunk tokens (or per group of a few, on large grids) reads them once,
//     reduces their argmax and emits every token whose key is at or above floor_key, the top_k-th largest of its
//     threads' maxima (a lower bound of the chunk's top_k-th largest key), so little more than top_k tokens per
//     chunk. It also reports rungs, the 2^i-th largest maxima.
//   split_warp: one block per row takes the chunk argmaxes, bounds the row's top_k-th largest key from below by
//     the largest floor_key and what the rungs imply, keeps the candidates at or above that bound (about top_k
//     plus a few dozen) and finds the thresholds on them: one warp sorts a list of up to kWarpList keys (no
//     block barriers), a longer one runs radix_select_by. sample's race then runs over that list.
// Every token the row keeps is a candidate (a token below its chunk's top_k-th largest key has top_k tokens
// above it), so the thresholds, masses and race are those of the whole row, token for token. Greedy rows need
// only the argmax; rows with top-k off or above max_top_k, or with a chunk of more than kChunkCands candidates
// (ties), fall back to the one-block passes over the row.
constexpr int kChunk = 4096;
constexpr int kFilterThreads = 256;  // 16 tokens per thread and chunk
constexpr int kMaxSplitTopK = 64;
constexpr int kChunkCands = 128;
constexpr int kRowCands = 2048;

struct Candidate {
  int32_t index;
  float logit;
};

// The top-k the split path filters a row for: its own, or for a nucleus row (top-k off, top-p on, `nucleus` set:
// see "Nucleus rows" below) max_top_k, whose candidates hold the nucleus whenever it is that small; 0: no filter.
PASS_EXT_HD int32_t split_top_k(int32_t top_k, float top_p, int64_t vocab, int max_top_k, bool nucleus) {
  const int32_t k = effective_top_k(top_k, vocab);
  if (k == 0 && nucleus && top_p_active(top_p)) return max_top_k;
  return k <= max_top_k ? k : 0;
}

constexpr int kRungs = 7;  // rung i: the 2^i-th largest of a chunk's thread maxima (2^i <= top_k), else 0

struct ChunkSummary {
  u64 best;            // the chunk's argmax entry (order_key << 32 | ~index), keys as row_argmax's
  uint32_t floor_key;  // every token of the chunk with key >= floor_key is a candidate
  int32_t count;       // candidates (more than kChunkCands: only the first are stored); -1: not filtered
  uint32_t rung[kRungs];  // the chunk holds at least 2^i tokens with key >= rung[i]
};

__host__ __device__ constexpr int chunks_of(int vocab) { return (vocab + kChunk - 1) / kChunk; }

// Per-row accumulators of the plain-row passes (see "Plain rows" below), zeroed by filter_kernel.
struct PlainAcc {
  u64 mass;   // sum of fixed_mass(weight) over the row
  u64 race;   // race entry of the draw with the warp's weights (verify: the bonus or fallback draw at the stop)
  u64 resid;  // verify: race entry of the residual draw at the stop position
  u64 pad;    // the record fills one 32-byte sector
};

// Eight bf16, eight fp16 or four fp32 logits of one 16-byte load, as floats.
__device__ __forceinline__ void unpack16(const uint4& w, float* out, const float*) {
  out[0] = __uint_as_float(w.x), out[1] = __uint_as_float(w.y), out[2] = __uint_as_float(w.z);
  out[3] = __uint_as_float(w.w);
}
__device__ __forceinline__ void unpack16(const uint4& w, float* out, const __nv_bfloat16*) {
  const uint32_t word[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: the lower half is the earlier token
    out[2 * i] = __uint_as_float(word[i] << 16);
    out[2 * i + 1] = __uint_as_float(word[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack16(const uint4& w, float* out, const __half*) {
  const uint32_t word[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &word[i], sizeof(h));
    const float2 f = __half22float2(h);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}

// max.f32 / min.f32 without .ftz (the build's fast math would flush subnormal logits to zero and tie them); a NaN
// operand yields the other.
__device__ __forceinline__ float max_keep_subnormals(float a, float b) {
  float r;
  asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float min_keep_subnormals(float a, float b) {
  float r;
  asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// A greedy row needs only each chunk's argmax entry (order_key(clean_logit(l)) << 32 | ~index, the largest
// wins: so the first index among equal keys), which filter_chunks's general path computes with a key per token
// and ~500 instructions per warp: the Nsight counters put greedy verify at B = 128 at 85% of the SMs' issue rate
// and 27% of DRAM bandwidth. Here a thread reads its tokens with 16-byte loads where the chunk is whole and
// 16-byte aligned, takes their maximum (NaN skipped: it counts as -inf), then the first of its tokens with the
// maximum's bits (any zero where the maximum is a zero: -0.0 ties +0.0 in order_key; a maximum of -inf means
// every token is -inf or NaN, all of one key, so the first token), and forms the one entry. Tokens past the
// vocabulary are -inf and never the first token of a thread that holds a real one. Bits are compared, not
// floats, so subnormals stay apart. Same entries as the general path, bit for bit.
template <typename T>
__device__ __forceinline__ u64 greedy_entry(const T* row, int vocab, int base) {
  constexpr int kVec = 16 / int(sizeof(T)), kPer = kChunk / kFilterThreads;
  const int tid = threadIdx.x;
  auto index = [&](int i) { return base + ((i / kVec) * kFilterThreads + tid) * kVec + i % kVec; };
  float v[kPer];
  if (base + kChunk <= vocab && (reinterpret_cast<uintptr_t>(row + base) & 15u) == 0) {
#pragma unroll
    for (int q = 0; q < kPer / kVec; ++q)
      unpack16(__ldg(reinterpret_cast<const uint4*>(row + index(q * kVec))), v + q * kVec, row);
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[i] = index(i) < vocab ? to_float(row[index(i)]) : -INFINITY;
  }
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) m = max_keep_subnormals(m, v[i]);
  const uint32_t mb = float_bits(m);
  int at = index(0);
  if ((mb << 1) == 0u) {  // +-0.0: the first zero of either sign
#pragma unroll
    for (int i = kPer - 1; i >= 0; --i) at = (float_bits(v[i]) << 1) == 0u ? index(i) : at;
  } else if (m != -INFINITY) {
#pragma unroll
    for (int i = kPer - 1; i >= 0; --i) at = float_bits(v[i]) == mb ? index(i) : at;
  }
  return index(0) < vocab ? (u64(order_key(m)) << 32) | (0xffffffffu - unsigned(at)) : 0;
}

// Block of kFilterThreads threads: chunks chunk0 .. chunk0 + group - 1 of one row (those below chunks_of(vocab))
// -> summary[c] and up to kChunkCands candidates at cands + c * kChunkCands for each. The floor is the top_k-th
// largest of the threads' maxima (each thread holds kPer tokens of each chunk, its maximum is over all of them):
// top_k threads hold a token at or above it, so it bounds the group's top_k-th largest key from below, and few
// tokens beyond the top_k maxima pass it. A bitonic sort of the 256 maxima gives the floor and the rungs (the
// 2^i-th largest maxima, which split_warp combines over the chunks into a bound on the row's top_k-th key) by
// rank. The select is the block's fixed cost (the radix select it replaced took ~7,000 warp instructions against
// ~3,000 for reading, keying and emitting a chunk's 4096 tokens: Nsight on the H200, bench/NOTES.md), so a block
// of a large grid takes several chunks for one select: the group's floor and rungs hold for its tokens together,
// so every chunk of the group reports the floor and the first alone the rungs (split_warp counts a rung's tokens
// once per chunk that reports it). Each chunk keeps its own argmax and candidate list.
constexpr int kMaxGroup = 8;

template <typename T>
__device__ void filter_chunks(const T* row, int vocab, int chunk0, int group, float temperature, int32_t top_k,
                              float top_p, int max_top_k, bool nucleus, ChunkSummary* summary, Candidate* cands) {
  constexpr int kWarps = kFilterThreads / 32, kPer = kChunk / kFilterThreads;
  static_assert(kFilterThreads == 256, "the select sorts one maximum per thread of eight warps");
  static_assert(kMaxSplitTopK <= kFilterThreads, "the floor is a rank among the threads' maxima");
  __shared__ uint32_t sort_buf[2][kFilterThreads];  // the select's exchanges between warps
  // Each thread's largest and second largest key and the first token with the largest, per chunk (its own slots).
  __shared__ uint32_t chunk_max[kMaxGroup][kFilterThreads], chunk_second[kMaxGroup][kFilterThreads];
  __shared__ int32_t chunk_at[kMaxGroup][kFilterThreads];
  __shared__ u64 red[kMaxGroup][kWarps];
  __shared__ unsigned emitted[kMaxGroup];
  __shared__ uint32_t floor_shared, rung[kRungs];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool greedy = is_greedy(temperature);
  group = min(group, chunks_of(vocab) - chunk0);
  if (greedy) {  // the argmaxes alone (the whole block takes this branch: one row's parameters)
    for (int c = 0; c < group; ++c) {
      const u64 entry = warp_max(greedy_entry(row, vocab, (chunk0 + c) * kChunk));
      if (lane == 0) red[c][warp] = entry;
    }
    __syncthreads();
    if (tid < group) {
      u64 b = 0;
      for (int w = 0; w < kWarps; ++w) b = max(b, red[tid][w]);
      summary[tid] = ChunkSummary{b, 0u, -1, {}};
    }
    return;
  }
  const float inv_t = inverse_temperature(temperature);
  const int32_t k = split_top_k(top_k, top_p, vocab, max_top_k, nucleus);
  const bool filter = k > 0;
  // Token i of this thread in the chunk at `base`: in a whole chunk, runs of kVec consecutive tokens, one 16-byte
  // load each where aligned (greedy_entry's layout); in the row's last, partial chunk, every kFilterThreads-th
  // token, so that a chunk of n tokens has min(n, 256) holders: a floor whenever it has top_k tokens (runs of 8
  // left 48 holders for V = 151936's last 384 tokens, no floor at top-k 50, and every token emitted, too many).
  constexpr int kVec = 16 / int(sizeof(T));
  auto index = [&](int base, int i, bool whole) {
    return whole ? base + ((i / kVec) * kFilterThreads + tid) * kVec + i % kVec : base + i * kFilterThreads + tid;
  };
  auto is_whole = [&](int base) {
    return base + kChunk <= vocab && (reinterpret_cast<uintptr_t>(row + base) & 15u) == 0;
  };
  auto key_of = [&](float l) { return order_key(scaled_logit(l, inv_t)); };
  // Per token: a key, the running maximum and second largest (with multiplicity); after the loads, the first token
  // with the maximum. A thread's candidates in a chunk are then mostly its maximum alone, emitted without reading
  // its tokens again; only a thread whose second largest also reaches the floor reads them again (rare: ties, or
  // two of the group's top tokens in one thread).
  uint32_t tmax = 0;  // this thread's largest key over the group (keys of real tokens are > 0; 0 = no token)
  // Keys per token (the partial chunk, and a whole chunk's rare ties): the maximum, the second largest and the
  // first token with the maximum.
  auto keyed = [&](const float* v, int base, bool whole, uint32_t& cmax, uint32_t& second, int& at) {
    uint32_t key[kPer];
    cmax = 0, second = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      key[i] = whole || index(base, i, whole) < vocab ? key_of(v[i]) : 0u;
      second = max(second, min(cmax, key[i]));
      cmax = max(cmax, key[i]);
    }
    at = index(base, 0, whole);
#pragma unroll
    for (int i = kPer - 1; i >= 0; --i) at = key[i] == cmax ? index(base, i, whole) : at;
  };
  auto reduce = [&](const float* v, int c, int base, bool whole) {  // inlined: `whole` folds away
    uint32_t cmax, second;
    int at;
    if (whole) {
      // The keys are a non-decreasing function of the logit (NaN counts as -inf, scaled_logit and order_key), so
      // the largest and second largest keys are the keys of the largest and second largest logits: per token a
      // max and a min, no key. A NaN makes the running second too large at worst (min.f32 yields the other
      // operand), which only sends the thread to the keyed path or to the emission's scan. The first token with
      // the largest key is the one holding the largest logit unless two tokens share that key (the second's key
      // is then the maximum's, NaN included): the keyed path decides those.
      float m = v[0], sec = -INFINITY;
#pragma unroll
      for (int i = 1; i < kPer; ++i) {
        sec = max_keep_subnormals(sec, min_keep_subnormals(m, v[i]));
        m = max_keep_subnormals(m, v[i]);
      }
      cmax = key_of(m);
      second = key_of(sec);
      // A tie of the two keys is mostly the maximum's logit repeated: at N(0, 3) in bf16 about 2% of threads hold
      // a repeat among their 16 tokens, so about half the warps of a chunk would take the keyed path (~280
      // instructions against ~60) for at least one lane. Where the float just below the maximum keys lower, every
      // token below the maximum keys lower too (keys are non-decreasing in the logit; NaN keys as -inf), so the
      // tokens with the largest key are those with the maximum's bits (a zero is excluded: -0.0 ties +0.0) and
      // the bit comparison below finds the first. Otherwise (scaling rounded or clamped distinct logits onto one
      // key, zeros, subnormals, a maximum of -inf or NaN) the keyed path decides.
      const uint32_t mb = float_bits(m);
      const float below = bits_float(m > 0.f ? mb - 1u : mb + 1u);
      const bool repeat = second == cmax && m > -INFINITY && m != 0.f && key_of(below) < cmax;
      if (second == cmax && !repeat) {
        keyed(v, base, true, cmax, second, at);
      } else {
        at = index(base, 0, true);
#pragma unroll
        for (int i = kPer - 1; i >= 0; --i) at = float_bits(v[i]) == mb ? index(base, i, true) : at;
      }
    } else {
      keyed(v, base, false, cmax, second, at);
    }
    chunk_max[c][tid] = cmax;
    chunk_second[c][tid] = second;
    chunk_at[c][tid] = at;
    tmax = max(tmax, cmax);
    const u64 best = warp_max(cmax == 0 ? u64(0) : (u64(cmax) << 32) | (0xffffffffu - unsigned(at)));
    if (lane == 0) red[c][warp] = best;
  };
  for (int c = 0; c < group; ++c) {
    const int base = (chunk0 + c) * kChunk;
    float v[kPer];  // every load issued before any is used
    if (is_whole(base)) {
#pragma unroll
      for (int q = 0; q < kPer / kVec; ++q)
        unpack16(__ldg(reinterpret_cast<const uint4*>(row + index(base, q * kVec, true))), v + q * kVec, row);
      reduce(v, c, base, true);
    } else {
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int j = index(base, i, false);
        v[i] = j < vocab ? to_float(row[j]) : -INFINITY;
      }
      reduce(v, c, base, false);
    }
  }
  uint32_t floor_key = 0;
  const int valid = min(kChunk, vocab - chunk0 * kChunk);  // the group's first chunk: its threads hold tokens
  // threads holding a token: every thread of a whole chunk, the first `valid` of a partial one
  const int holders = is_whole(chunk0 * kChunk) ? kFilterThreads : min(kFilterThreads, valid);
  if (tid < kRungs) rung[tid] = 0;
  if (tid == 0) floor_shared = 0;
  if (filter && holders >= k) {
    // The floor and the rungs are ranks among the 256 maxima, so the block sorts them (descending) with a bitonic
    // network, one value per thread: 36 compare-exchange stages, 30 of them between lanes of a warp (shuffles), 6
    // between warps (shared memory, double-buffered: one barrier each). Thread r then holds the (r+1)-th largest
    // maximum with multiplicity; keys of real tokens are > 0 and holders >= k, so the first k are real.
    uint32_t v = tmax;
    int sort_parity = 0;  // which buffer the next exchange between warps uses (a constant once unrolled)
#pragma unroll
    for (int size = 2; size <= kFilterThreads; size <<= 1) {
      const bool descending = (tid & size) == 0;  // the direction of this thread's run of `size` (all at the end)
#pragma unroll
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        uint32_t other;
        if (stride >= 32) {
          sort_buf[sort_parity][tid] = v;
          __syncthreads();
          other = sort_buf[sort_parity][tid ^ stride];
          sort_parity ^= 1;
        } else {
          other = __shfl_xor_sync(kFullMask, v, stride);
        }
        v = ((tid & stride) == 0) == descending ? max(v, other) : min(v, other);
      }
    }
    if (tid == k - 1) floor_shared = v;
#pragma unroll
    for (int i = 0; i < kRungs; ++i)
      if ((1 << i) <= k && tid == (1 << i) - 1) rung[i] = v;
    __syncthreads();
    floor_key = floor_shared;
  }
  if (tid < group) emitted[tid] = 0;
  __syncthreads();
  if (filter) {
    // Only threads whose maximum over a chunk reaches the floor hold candidates there (about top_k of the group's
    // 256 x group): most hold just that maximum, emitted from its index; a thread whose second largest reaches the
    // floor too loads its tokens again (cache hits) and keys them as above.
    auto emit = [&](int c, bool take, int j, float l) {
      const unsigned ballot = __ballot_sync(kFullMask, take);
      unsigned first = 0;
      if (lane == 0 && ballot) first = atomicAdd(&emitted[c], unsigned(__popc(ballot)));
      first = __shfl_sync(kFullMask, first, 0);
      const unsigned slot = first + __popc(ballot & ((1u << lane) - 1u));
      if (take && slot < unsigned(kChunkCands)) cands[c * kChunkCands + slot] = Candidate{j, l};
    };
    for (int c = 0; c < group; ++c) {
      const bool mine = chunk_max[c][tid] != 0 && chunk_max[c][tid] >= floor_key;
      const bool scan = mine && chunk_second[c][tid] != 0 && chunk_second[c][tid] >= floor_key;
      if (!__any_sync(kFullMask, mine)) continue;
      const int at = chunk_at[c][tid];
      emit(c, mine && !scan, at, mine && !scan ? to_float(row[at]) : 0.f);
      if (!__any_sync(kFullMask, scan)) continue;
      const int base = (chunk0 + c) * kChunk;
      const bool whole = is_whole(base);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int j = index(base, i, whole);
        const float l = scan && j < vocab ? to_float(row[j]) : -INFINITY;
        emit(c, scan && j < vocab && key_of(l) >= floor_key, j, l);
      }
    }
    __syncthreads();
  }
  if (tid < group) {
    u64 b = 0;
    for (int w = 0; w < kWarps; ++w) b = max(b, red[tid][w]);
    ChunkSummary cs{b, floor_key, filter ? int32_t(emitted[tid]) : -1, {}};
    if (tid == 0) {
#pragma unroll
      for (int i = 0; i < kRungs; ++i) cs.rung[i] = rung[i];
    }
    summary[tid] = cs;
  }
}

// Grid (rows, chunk groups): chunks blockIdx.y * group .. + group - 1 of row blockIdx.x, whose parameters are
// those of row / per_param. (In an unnamed namespace: each op's translation unit gets its own copy of the kernel.)
namespace {
template <typename T>
__global__ void __launch_bounds__(kFilterThreads, 4)
    filter_kernel(const T* __restrict__ logits, int vocab, int per_param, int group,
                  const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                  const float* __restrict__ top_p, int max_top_k, bool nucleus, ChunkSummary* __restrict__ sums,
                  Candidate* __restrict__ cands, PlainAcc* __restrict__ acc) {
  const int64_t n = blockIdx.x, p = n / per_param, chunk0 = int64_t(blockIdx.y) * group, chunks = chunks_of(vocab);
  // The plain-row pass after it is a dependent launch that waits for this grid to finish: it may launch now, so
  // that its launch is hidden behind this kernel (a no-op when the next kernel is an ordinary launch; the chain:
  // launch_chained in csrc/cuda/sampling_dispatch.cuh).
  kernels::release_dependents();
  if (acc != nullptr && chunk0 == 0 && threadIdx.x == 0) acc[n] = PlainAcc{};  // for the plain-row passes after
  filter_chunks(logits + n * vocab, vocab, int(chunk0), group, temperature[p], top_k[p], top_p[p], max_top_k,
                nucleus, sums + n * chunks + chunk0, cands + (n * chunks + chunk0) * kChunkCands);
}
}  // namespace

struct ListScratch {
  Candidate c[kRowCands];
  unsigned n;
  uint32_t keep_key;  // warp_thresholds' results, for the whole block
  u64 mass;
};

// Lists of at most kWarpList candidates are finished by one warp (no block barriers): 4 keys per lane.
constexpr int kWarpList = 128;
static_assert(kMaxSplitTopK <= kWarpList, "the top_k-th key is in the sorted list");

// Sorts the warp's 128 keys (v[j] of lane l is element 4l + j) into descending order: a bitonic network,
// exchanging across lanes for strides of 4 and more.
__device__ __forceinline__ void warp_sort_descending(uint32_t (&v)[4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int size = 2; size <= kWarpList; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      if (stride >= 4) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int i = lane * 4 + j;
          const uint32_t other = __shfl_xor_sync(kFullMask, v[j], stride >> 2);
          const bool keep_max = ((i & stride) == 0) == ((i & size) == 0);
          v[j] = keep_max ? max(v[j], other) : min(v[j], other);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j & stride) continue;
          const int i = lane * 4 + j;
          const uint32_t a = v[j], b = v[j | stride];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) {
            v[j] = b;
            v[j | stride] = a;
          }
        }
      }
    }
  }
}

__device__ __forceinline__ uint32_t pick(const uint32_t (&v)[4], int j) {
  return j == 0 ? v[0] : j == 1 ? v[1] : j == 2 ? v[2] : v[3];
}

// The thresholds of radix_select_by (top-k, then top-p) over a list of n <= kWarpList candidates, by sorting
// their keys: the top_k-th key, then the largest key whose at-or-above mass reaches the top-p target, and that
// mass (fixed point, so exactly the radix passes' sums). Warp 0 calls it; the results go to list.keep_key/mass.
// A nucleus row (row_total > 0: top-k off, the row's whole mass from the plain-row pass) keeps every candidate
// for the top-k step and takes its top-p target from row_total; list.mass = 0 where the candidates' mass does
// not reach it (the nucleus is larger than the list).
__device__ inline void warp_thresholds(ListScratch& list, int n, int32_t k, float top_p, const Warp& w,
                                       u64 row_total = 0) {
  const int lane = threadIdx.x & 31;
  uint32_t v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = lane * 4 + j;
    v[j] = i < n ? order_key(scaled_logit(list.c[i].logit, w.inv_temperature)) : 0u;  // 0: below every key
  }
  warp_sort_descending(v);
  // Keys of real tokens are > 0 (-inf maps to 0x007fffff), so 1 keeps every candidate and no padding.
  const uint32_t kth = row_total ? 1u : __shfl_sync(kFullMask, pick(v, (k - 1) & 3), (k - 1) >> 2);
  u64 m[4], lane_mass = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    m[j] = v[j] >= kth ? fixed_mass(exp_weight(key_float(v[j]) - w.zmax)) : 0;
    lane_mass += m[j];
  }
  const u64 total = warp_sum(lane_mass);
  uint32_t keep = kth;
  u64 mass = total;
  if (top_p_active(top_p)) {
    const u64 target = top_p_target(top_p, row_total ? row_total : total);
    u64 before = lane_mass;  // inclusive scan over lanes, then made exclusive
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 t = __shfl_up_sync(kFullMask, before, o);
      if (lane >= o) before += t;
    }
    before -= lane_mass;
    int first = kWarpList;  // the first sorted position whose running mass reaches the target
#pragma unroll
    for (int j = 3; j >= 0; --j) {
      u64 run = before;
#pragma unroll
      for (int q = 0; q <= j; ++q) run += m[q];
      if (run >= target) first = lane * 4 + j;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) first = min(first, __shfl_xor_sync(kFullMask, first, o));
    keep = __shfl_sync(kFullMask, pick(v, first & 3), (first >> 2) & 31);
    u64 kept = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) kept += v[j] >= keep ? m[j] : 0;
    mass = first < kWarpList ? warp_sum(kept) : 0;  // 0: not reached (only a nucleus row's target can be missed)
  }
  if (lane == 0) {
    list.keep_key = keep;
    list.mass = mass;
  }
}

// The row's warp from the filter's output, when the candidates suffice (else false: call warp_row). One-hot
// rows are always done here (argmax only). All threads call it and get the same. With `nucleus` (the filter's
// flag), a nucleus row's warp comes from its max_top_k candidates and its whole mass, acc_row->mass (from the
// plain-row pass), where the candidates hold the nucleus.
__device__ inline bool split_warp(int vocab, float temperature, int32_t top_k, float top_p, int max_top_k,
                           const ChunkSummary* sums, int chunks, const Candidate* cands, Scratch& s,
                           ListScratch& list, Warp& w, bool nucleus = false, const PlainAcc* acc_row = nullptr) {
  u64 best = 0, floor_key = 0, unfiltered = 0;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    const ChunkSummary cs = sums[c];
    best = max(best, cs.best);
    floor_key = max(floor_key, u64(cs.floor_key));
    unfiltered |= u64(cs.count < 0 || cs.count > kChunkCands);
  }
  best = block_reduce<true>(best, s);
  w = Warp{};
  const bool greedy = is_greedy(temperature);
  w.inv_temperature = greedy ? 1.f : inverse_temperature(temperature);
  w.argmax = race_winner(best);
  w.zmax = key_float(uint32_t(best >> 32));
  w.mass = 1.f;
  w.one_hot = greedy || w.zmax == -INFINITY;
  if (w.one_hot) return true;
  const int32_t k = split_top_k(top_k, top_p, vocab, max_top_k, nucleus);
  const bool nucleus_row = k > 0 && effective_top_k(top_k, vocab) == 0;
  if (block_reduce<true>(unfiltered, s) != 0 || k == 0) return false;
  // A bound on the row's top_k-th key from the rungs: when m = ceil(k / 2^i) chunks have rung i >= x, the row
  // holds m * 2^i >= k tokens >= x. Thread t ranks rung t / chunks of chunk t % chunks among that rung's.
  uint32_t* rungs = reinterpret_cast<uint32_t*>(&s.sub[0][0]);
  static_assert(sizeof(s.sub) >= sizeof(uint32_t) * kRungs * 256, "rungs of up to 256 chunks fit the scratch");
  for (int t = threadIdx.x; t < kRungs * chunks; t += blockDim.x) rungs[t] = sums[t % chunks].rung[t / chunks];
  __syncthreads();
  for (int t = threadIdx.x; t < kRungs * chunks; t += blockDim.x) {
    const int i = t / chunks, r = 1 << i, m = (k + r - 1) / r;
    const uint32_t x = rungs[t];
    if (r > k || m > chunks || x == 0) continue;
    int greater = 0, at_least = 0;
    for (int c = 0; c < chunks; ++c) {
      greater += rungs[i * chunks + c] > x;
      at_least += rungs[i * chunks + c] >= x;
    }
    if (greater < m && m <= at_least) floor_key = max(floor_key, u64(x));
  }
  const uint32_t row_floor = uint32_t(block_reduce<true>(floor_key, s));
  if (threadIdx.x == 0) list.n = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int c = threadIdx.x >> 5; c < chunks; c += blockDim.x >> 5) {
    const int count = sums[c].count;
    for (int i0 = 0; i0 < count; i0 += 32) {
      Candidate cand{};
      bool take = false;
      if (i0 + lane < count) {
        cand = cands[int64_t(c) * kChunkCands + i0 + lane];
        take = order_key(scaled_logit(cand.logit, w.inv_temperature)) >= row_floor;
      }
      const unsigned ballot = __ballot_sync(kFullMask, take);
      unsigned first = 0;
      if (lane == 0 && ballot) first = atomicAdd(&list.n, unsigned(__popc(ballot)));
      first = __shfl_sync(kFullMask, first, 0);
      const unsigned slot = first + __popc(ballot & ((1u << lane) - 1u));
      if (take && slot < unsigned(kRowCands)) list.c[slot] = cand;
    }
  }
  __syncthreads();
  const int n = int(list.n);
  if (n > kRowCands) return false;
  if (nucleus_row && n <= kWarpList) {  // the list holds every token at or above row_floor: the nucleus?
    if (threadIdx.x < 32) warp_thresholds(list, n, k, top_p, w, acc_row->mass);
    __syncthreads();
    if (list.mass == 0) return false;
    w.keep_key = list.keep_key;
    w.mass = float(double(list.mass) * kMassUnit);
    return true;
  }
  if (n <= kWarpList) {  // n >= k: the list holds every token at or above the row's top_k-th key
    if (threadIdx.x < 32) warp_thresholds(list, n, k, top_p, w);
    __syncthreads();
    w.keep_key = list.keep_key;
    w.mass = float(double(list.mass) * kMassUnit);
    return true;
  }
  const int rounds = (n + int(blockDim.x) - 1) / int(blockDim.x);
  auto visit = [&](auto&& f) {
    for (int r = 0; r < rounds; ++r) {
      const int i = r * int(blockDim.x) + int(threadIdx.x);
      f(i < n ? scaled_logit(list.c[i].logit, w.inv_temperature) : -INFINITY, i < n);
    }
  };
  if (nucleus_row) {  // a longer list: it holds the nucleus where its mass reaches the target
    const u64 target = top_p_target(top_p, acc_row->mass);
    u64 listed = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) listed += fixed_mass(w.weight(list.c[i].logit, list.c[i].index));
    if (block_reduce<false>(listed, s) < target) return false;
    u64 mass = 0;
    w.keep_key = radix_select_by<true>(visit, w.zmax, 0, target, top_p, s, &mass);
    w.mass = float(double(mass) * kMassUnit);
    return true;
  }
  w.keep_key = radix_select_by<false>(visit, w.zmax, 0, u64(k), 0.f, s, nullptr);
  u64 mass = 0;
  if (top_p_active(top_p)) {
    w.keep_key = radix_select_by<true>(visit, w.zmax, w.keep_key, 0, top_p, s, &mass);
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) mass += fixed_mass(w.weight(list.c[i].logit, list.c[i].index));
    mass = block_reduce<false>(mass, s);
  }
  w.mass = float(double(mass) * kMassUnit);
  return true;
}

// The exponential race over the list split_warp left (every token of positive weight under its warp).
template <typename WeightFn>
__device__ int32_t race_list(const ListScratch& list, const philox::Stream& rng, WeightFn&& weight_fn, Scratch& s) {
  u64 best = 0;
  const int n = int(list.n);
  const bool one_warp = n <= kWarpList;  // as split_warp: warp 0 alone, no barrier; the other threads get -1
  if (one_warp && threadIdx.x >= 32) return -1;
  for (int i = threadIdx.x; i < n; i += one_warp ? 32 : int(blockDim.x)) {
    const Candidate cand = list.c[i];
    const float x = weight_fn(cand.logit, cand.index);
    if (x > 0.f) {
      const philox::Block r = rng.group(uint32_t(cand.index) >> 2);
      best = max(best, u64(race_entry(race_score(x, r.v[cand.index & 3]), cand.index)));
    }
  }
  return race_winner(one_warp ? warp_max(best) : block_reduce<true>(best, s));
}

// The exponential race over a filtered row's chunk candidates (as race over the row: tokens outside them have
// weight 0 under the warp split_warp returned true for, and weight_fn must be 0 where that weight is).
template <typename WeightFn>
__device__ int32_t race_candidates(const ChunkSummary* sums, int chunks, const Candidate* cands,
                                   const philox::Stream& rng, WeightFn&& weight_fn, Scratch& s) {
  u64 best = 0;
  const int lane = threadIdx.x & 31;
  for (int c = threadIdx.x >> 5; c < chunks; c += blockDim.x >> 5) {
    const int count = min(sums[c].count, kChunkCands);
    for (int i = lane; i < count; i += 32) {
      const Candidate cand = cands[int64_t(c) * kChunkCands + i];
      const float x = weight_fn(cand.logit, cand.index);
      if (x > 0.f) {
        const philox::Block r = rng.group(uint32_t(cand.index) >> 2);
        best = max(best, u64(race_entry(race_score(x, r.v[cand.index & 3]), cand.index)));
      }
    }
  }
  return race_winner(block_reduce<true>(best, s));
}

// ---- Plain rows ---------------------------------------------------------------------------------------------------
// A sampled row with top-k and top-p off (the API's defaults) keeps every token: its warp is the maximum (from the
// chunk summaries) and the mass, and its draw a race over the whole row. The one-block passes made three passes over
// the row on one SM for it (argmax, mass, race: 149 µs per sample call at V = 151936 on the H200, against 23 µs for a
// top-k 50 row on the split path). Here blocks of kFilterThreads threads take (row, chunk) items and add their
// chunk's share into the row's PlainAcc with integer atomics: the fixed-point mass adds exactly in any order and a
// race entry is a maximum, so the warp and the draw are those of the one-block passes, bit for bit.

PASS_EXT_HD bool plain_row(float temperature, int32_t top_k, float top_p, int64_t vocab) {
  return !is_greedy(temperature) && effective_top_k(top_k, vocab) == 0 && !top_p_active(top_p);
}

// Nucleus rows: sampled, top-k off, top-p on. Their threshold needs the row's whole mass (the top-p target) and
// the highest tokens in order. The plain-row pass adds up the mass; the filter treats them as top-k max_top_k rows,
// so that split_warp lists every token down to a bound on the row's max_top_k-th key, sorts them and takes the
// threshold there when their mass reaches the target (an LM's nucleus is mostly that small); otherwise the
// one-block radix passes run as before. Same threshold and mass as those passes, bit for bit.
PASS_EXT_HD bool mass_row(float temperature, int32_t top_k, int64_t vocab) {
  return !is_greedy(temperature) && effective_top_k(top_k, vocab) == 0;
}

// Token of element i of thread threadIdx.x in the chunk at `base`: groups of four consecutive tokens.
__device__ __forceinline__ int chunk_token(int base, int i) {
  return base + ((i / 4) * kFilterThreads + int(threadIdx.x)) * 4 + i % 4;
}

// Visits this thread's groups of four tokens of chunk `chunk`: f(group index, first token, l[4]), every load issued
// before any use. Tokens past the row read as -inf; callers check j < vocab.
template <typename T, typename F>
__device__ __forceinline__ void for_chunk_groups(const T* row, int vocab, int chunk, F&& f) {
  constexpr int kPer = kChunk / kFilterThreads;
  const int base = chunk * kChunk;
  float l[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) l[i] = chunk_token(base, i) < vocab ? to_float(row[chunk_token(base, i)]) : -INFINITY;
#pragma unroll
  for (int g = 0; g < kPer / 4; ++g) {
    const int j0 = chunk_token(base, g * 4);
    if (j0 < vocab) f(j0 >> 2, j0, l + g * 4);
  }
}

// Max or sum over a block of kFilterThreads threads, every thread gets it; `red` holds one value per warp. The
// leading barrier lets consecutive calls reuse `red`.
template <bool kMax>
__device__ __forceinline__ u64 small_block_reduce(u64 v, u64* red) {
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  u64 r = 0;
#pragma unroll
  for (int w = 0; w < kFilterThreads / 32; ++w) r = kMax ? max(r, red[w]) : r + red[w];
  return r;
}

// The warp of a plain row before its mass is known (keep_key 0, mass 1): argmax and zmax from its chunk summaries,
// as split_warp and warp_row find them.
__device__ __forceinline__ Warp plain_warp(const ChunkSummary* sums, int chunks, float temperature, u64* red) {
  u64 best = 0;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) best = max(best, sums[c].best);
  best = small_block_reduce<true>(best, red);
  Warp w{};
  w.inv_temperature = inverse_temperature(temperature);
  w.argmax = race_winner(best);
  w.zmax = key_float(uint32_t(best >> 32));
  w.mass = 1.f;
  w.one_hot = w.zmax == -INFINITY;
  return w;
}

// The race over a plain row's chunk, as `race` visits it; returns this thread's best entry (reduce it over the
// block).
template <typename T, typename WeightFn>
__device__ __forceinline__ u64 race_chunk(const T* row, int vocab, int chunk, const philox::Stream& rng,
                                          WeightFn&& weight_fn) {
  u64 best = 0;
  for_chunk_groups(row, vocab, chunk,
                   [&](int g, int j0, const float* l) { race_group(best, rng, g, j0, l, vocab, weight_fn); });
  return best;
}

// Blocks per row of the plain-row kernels: each row's chunks are shared by enough blocks to fill the GPU about
// once (four resident per SM, the kernels' launch bounds) and no more, so that rows that are not plain cost one
// block each, which reads the row's parameters and exits.
inline unsigned plain_splits(int64_t rows, int chunks, int sms) {
  const int64_t want = (int64_t(4) * (sms > 0 ? sms : 1) + rows - 1) / (rows > 0 ? rows : 1);
  return unsigned(want < 1 ? 1 : (want > chunks ? chunks : want));
}

namespace {
// The plain-row pass, grid (rows, splits): block (n, s) takes chunks s, s + splits, ... of row n and, where the row
// is plain or a nucleus row and not one-hot, adds their fixed-point mass to acc[n].mass and, with `race` and a
// plain row, their best race entry under sample's stream of row n to acc[n].race. Row n's parameters are those of
// n / per_param. Launched as a dependent launch (csrc/cuda/launch.h): it reads nothing before the wait.
template <typename T>
__global__ void __launch_bounds__(kFilterThreads, 4)
    plain_pass_kernel(const T* __restrict__ logits, int vocab, int chunks, int per_param,
                      const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                      const float* __restrict__ top_p, const ChunkSummary* __restrict__ sums,
                      const int64_t* __restrict__ seed, const int64_t* __restrict__ offset, bool race,
                      PlainAcc* __restrict__ acc) {
  kernels::wait_for_inputs();
  kernels::release_dependents();
  __shared__ u64 red[kFilterThreads / 32];
  const int64_t n = blockIdx.x, p = n / per_param;
  if (!mass_row(temperature[p], top_k[p], vocab)) return;  // the whole block
  const Warp w = plain_warp(sums + n * chunks, chunks, temperature[p], red);
  if (w.one_hot) return;
  race = race && !top_p_active(top_p[p]);  // a nucleus row's race runs over its candidates
  const T* row = logits + n * int64_t(vocab);
  const philox::Stream rng(*seed, *offset, kStreamSample, uint32_t(n), 0);
  u64 mass = 0, best = 0;
  for (int chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    if (race) {
      best = max(best, race_chunk(row, vocab, chunk, rng, [&](float l, int32_t j) {
        const float x = w.weight(l, j);
        mass += fixed_mass(x);
        return x;
      }));
    } else {
      for_chunk_groups(row, vocab, chunk, [&](int, int j0, const float* l) {
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (j0 + c < vocab) mass += fixed_mass(w.weight(l[c], j0 + c));
      });
    }
  }
  mass = small_block_reduce<false>(mass, red);
  best = small_block_reduce<true>(best, red);
  if (threadIdx.x == 0) {
    atomicAdd(&acc[n].mass, mass);
    if (best != 0) atomicMax(&acc[n].race, best);
  }
}
}  // namespace

}  // namespace pass_ext::sampling::cuda
#endif  // __CUDACC__
