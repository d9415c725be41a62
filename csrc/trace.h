// Per-block timestamps of the decode kernels, to see where a replayed step's time goes (bench/trace_step.py).
// A build with PASS_EXT_TRACE=1 in the environment (setup.py defines PASS_EXT_TRACE) compiles the marks into the
// attention and decode_linear kernels; every other build compiles them to nothing. Once a buffer is set
// (torch.ops.pass_ext.trace_buffer), each launch of those kernels, at capture for a CUDA graph, takes the next slot
// of the buffer, and thread 0 of each of its first kTraceBlocks blocks stores %globaltimer (ns) at its marks: point 0
// at entry, 1 when the wait for the kernel before returns, then the kernel's own points (trace_mark's callers), and
// at 15 the kernel's kind in the low 8 bits and the block's SM (%smid) above them. A replay rewrites the same slots.
#pragma once
#include <cstdint>

namespace pass_ext {

constexpr int kTraceBlocks = 1024;  // blocks of a launch that a slot records
constexpr int kTracePoints = 16;    // marks per block; the last one holds the kind
constexpr int64_t kTraceSlotWords = int64_t(kTraceBlocks) * kTracePoints;

// The slot of the next traced launch (slots are taken in turn, from the first again after the last), or nullptr
// when no buffer is set; always nullptr, at no cost, in other builds.
#ifdef PASS_EXT_TRACE
uint64_t* next_trace_slot();
#else
inline uint64_t* next_trace_slot() { return nullptr; }
#endif

#ifdef __CUDACC__
// A kernel's mark: thread 0 of each of the first kTraceBlocks blocks stores %globaltimer at `point` of its block's
// record in the launch's slot, and `kind | smid << 8` at the last point (which SMs a launch's blocks shared). Nothing
// in other builds or without a slot. Kinds: 1 attention_mma_kernel, 2 decode_linear_bulk_kernel, 3
// decode_linear_kernel, 4 attention_kernel.
__device__ __forceinline__ void trace_mark(unsigned long long* slot, int point, int kind) {
#if defined(PASS_EXT_TRACE) && defined(__CUDA_ARCH__)
  if (slot != nullptr && threadIdx.x == 0) {
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (block < unsigned(kTraceBlocks)) {
      unsigned long long ns;
      unsigned sm;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
      asm("mov.u32 %0, %%smid;" : "=r"(sm));
      slot[block * kTracePoints + point] = ns;
      slot[block * kTracePoints + kTracePoints - 1] =
          static_cast<unsigned long long>(kind) | static_cast<unsigned long long>(sm) << 8;
    }
  }
#else
  (void)slot, (void)point, (void)kind;
#endif
}
#endif

}  // namespace pass_ext
