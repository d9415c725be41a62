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

__device__ __forceinline__ void release_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace pass_ext::kernels
