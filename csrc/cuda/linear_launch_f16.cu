// decode_linear's kernels and launch for __half (see linear_launch.cuh).
#include "linear_launch.cuh"

namespace pass_ext::linear_launch {
template void launch_mode<__half>(const LinearParams&, int, int, cudaStream_t);
}  // namespace pass_ext::linear_launch
