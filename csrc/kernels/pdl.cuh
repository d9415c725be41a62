// Programmatic dependent launch (sm_90): a kernel launched with it (csrc/cuda/launch.h) may start while the
// kernel before it on the stream is still running, so that its launch, its block setup and the loads that do
// not depend on that kernel (weights) overlap the end of it. Such a kernel must call wait_for_inputs() before it
// reads anything an earlier kernel writes, and before it writes anything. Every kernel here calls
// release_dependents() right after its wait: the next kernel then starts only once this one's predecessor has
// finished, so before its own wait it may read whatever the kernel right before it does not write.
// Without the launch attribute (or below sm_90) both are no-ops.
#pragma once

namespace pass_ext::kernels {

__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// A trace build's mark (csrc/trace.h): thread 0 of the first kTraceBlocks blocks stores %globaltimer at point
// `point` of its block's record in the launch's slot, and `kind` at point 7. Nothing in other builds or without a
// slot. Kinds: 1 attention_mma_kernel, 2 decode_linear_bulk_kernel, 3 decode_linear_kernel, 4 attention_kernel.
__device__ __forceinline__ void trace_mark(unsigned long long* slot, int point, int kind) {
#if defined(PASS_EXT_TRACE) && defined(__CUDA_ARCH__)
  if (slot != nullptr && threadIdx.x == 0) {
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (block < 1024u) {
      unsigned long long ns;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
      slot[block * 8 + point] = ns;
      slot[block * 8 + 7] = static_cast<unsigned long long>(kind);
    }
  }
#else
  (void)slot, (void)point, (void)kind;
#endif
}

__device__ __forceinline__ void release_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace pass_ext::kernels
