// Maps a torch floating dtype to the CUDA element type of the sampling kernels (float, __nv_bfloat16, __half)
// and calls f with a value of that type's pointer; other dtypes are rejected at the op boundary already.
#pragma once
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pass_ext::cuda_dispatch {

template <typename F>
void by_logits_dtype(const at::Tensor& logits, F&& f) {
  switch (logits.scalar_type()) {
    case at::kFloat: f(static_cast<const float*>(logits.const_data_ptr())); break;
    case at::kBFloat16: f(static_cast<const __nv_bfloat16*>(logits.const_data_ptr())); break;
    case at::kHalf: f(static_cast<const __half*>(logits.const_data_ptr())); break;
    default: TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
}

}  // namespace pass_ext::cuda_dispatch
