// attention_with_kv_cache's kernels and launch for float q (see attention_launch.cuh).
#include "attention_launch.cuh"

namespace pass_ext::attention_launch {
template void run<float>(const k::AttentionParams&, const at::Tensor&, cudaStream_t, int);
}  // namespace pass_ext::attention_launch
