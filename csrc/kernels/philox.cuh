// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based RNG
// that compiles for host and device, so the CPU and CUDA kernels draw bit-identical random numbers.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define PASS_EXT_HD __host__ __device__ __forceinline__
#else
#define PASS_EXT_HD inline
#endif

namespace pass_ext::philox {

struct Block {
  uint32_t v[4];
};

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments

// Ten rounds of Philox4x32 on one 128-bit counter under a 64-bit key. Pure integer arithmetic, so host and
// device agree bit for bit; constexpr so the known-answer vectors can be checked at compile time.
PASS_EXT_HD constexpr Block philox4x32_10(Block ctr, uint32_t key0, uint32_t key1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * ctr.v[0];
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * ctr.v[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = Block{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// A uniform in the open interval (0, 1): (2m + 1) / 2^24 for the top 23 bits m. Exactly representable in
// float32, never 0 and never 1, so -log(u) and -log1p(-u) are finite and positive.
PASS_EXT_HD constexpr float uniform_open(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// Counter layout shared by every op (one 128-bit counter per group of four elements):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (element / 4, row, offset & 0xffffffff, (offset >> 32) & 0xffff | draw << 16 | stream << 24)
//   element e of (stream, row, draw) is output word e % 4 of that block.
// `stream` separates the ops' uses so one offset can be shared safely; `draw` numbers the independent
// draws of one row (0..255); offsets wrap at 2^48.
struct Stream {
  uint32_t key0, key1, row, offset_lo, tag;

  PASS_EXT_HD constexpr Stream(int64_t seed, int64_t offset, uint32_t stream, uint32_t row_index, uint32_t draw)
      : key0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        key1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        row(row_index),
        offset_lo(static_cast<uint32_t>(static_cast<uint64_t>(offset))),
        tag((static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32) & 0xffffu) | ((draw & 0xffu) << 16) |
            (stream << 24)) {}

  // The four raw words of elements 4*group .. 4*group+3.
  PASS_EXT_HD constexpr Block group(uint32_t group_index) const {
    return philox4x32_10(Block{{group_index, row, offset_lo, tag}}, key0, key1);
  }
  // One element's uniform in (0, 1); kernels that visit four consecutive elements call group() once instead.
  PASS_EXT_HD constexpr float uniform(uint32_t element) const {
    return uniform_open(group(element >> 2).v[element & 3]);
  }
};

}  // namespace pass_ext::philox
