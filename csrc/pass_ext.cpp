// pass_ext's op schemas (one comment each) and the Python module entry point.
// Kernels register themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels live in pass_ext/ops.py.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>

#include "trace.h"

extern "C" {
// `import pass_ext._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

static std::string build_info() {
#ifdef PASS_EXT_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

#ifdef PASS_EXT_TRACE
namespace pass_ext {
namespace {
std::mutex trace_mutex;
at::Tensor* trace_held = new at::Tensor();  // the buffer while set (never destroyed: no free at exit)
int64_t trace_next = 0;
}  // namespace

uint64_t* next_trace_slot() {
  const std::lock_guard<std::mutex> lock(trace_mutex);
  if (!trace_held->defined()) return nullptr;
  const int64_t slot = trace_next++ % (trace_held->numel() / kTraceSlotWords);
  return reinterpret_cast<uint64_t*>(trace_held->data_ptr<int64_t>()) + slot * kTraceSlotWords;
}
}  // namespace pass_ext
#endif

// Sets (buf) or clears (None) the buffer of a trace build (csrc/trace.h); true where this build has the marks.
static bool trace_buffer(const std::optional<at::Tensor>& buf) {
#ifdef PASS_EXT_TRACE
  if (buf.has_value()) {
    const at::Tensor& t = *buf;
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() > 0 &&
                    t.numel() % pass_ext::kTraceSlotWords == 0,
                "trace_buffer: buf must be a contiguous int64 CUDA tensor of a positive multiple of ",
                pass_ext::kTraceSlotWords, " elements (slots of ", pass_ext::kTraceBlocks, " blocks x ",
                pass_ext::kTracePoints, " marks), got ", t.scalar_type(), " on ", t.device(), " with ", t.numel(),
                " elements", t.is_contiguous() ? "" : ", not contiguous");
  }
  const std::lock_guard<std::mutex> lock(pass_ext::trace_mutex);
  *pass_ext::trace_held = buf.has_value() ? *buf : at::Tensor();
  pass_ext::trace_next = 0;
  return true;
#else
  TORCH_CHECK(!buf.has_value(), "trace_buffer: this build of pass_ext has no trace marks; rebuild it with "
              "PASS_EXT_TRACE=1 in the environment (FORCE_CUDA=1 PASS_EXT_TRACE=1 pip install -e .)");
  return false;
#endif
}

TORCH_LIBRARY(pass_ext, m) {
  // Append Q new tokens' K/V per row at slots cache_lens[b]..cache_lens[b]+Q-1 of the cache and attend
  // to the cached prefix (slots < cache_lens[b]) plus the new tokens allowed by the tree mask.
  //   q [B,Q,Hq,D], k_new/v_new [B,Q,Hkv,D], k_cache/v_cache [B,Hkv,S_max,D] (written), cache_lens [B] int32,
  //   tree_mask: bit-packed int64 [Q, ceil(Q/64)] (bit j of row i: new token i sees new token j) or None = causal,
  //   out [B,Q,Hq,D] (written). cache_lens itself is not changed: commit/rollback is the caller's length update.
  m.def("attention_with_kv_cache(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_lens, Tensor? tree_mask, float scale, Tensor(c!) out, bool prefetch_cache=False) -> ()");
  // Verify k drafts per row against the target's k+1 distributions (speculative sampling, greedy when the
  // row's temperature is 0): out_tokens [B,k+1] int64 gets the accepted drafts, then the correction or bonus
  // token, then -1; accepted [B] int32 the number of accepted drafts. draft_probs [B,k,V] are the warped
  // draft distributions the drafts were sampled from (None: greedy drafts). seed/offset: int64 [1] on device.
  m.def("speculative_verify(Tensor target_logits, Tensor draft_tokens, Tensor? draft_probs, Tensor temperature, "
        "Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, Tensor(a!) out_tokens, Tensor(b!) accepted) -> ()");
  // Warp logits [N,V] per row (temperature [N] float32, 0 = greedy; top_k [N] int32, 0 = off; top_p [N] float32)
  // and draw one token per row into out [N] int64; probs_out [N,V] float32, when given, gets the warped distribution.
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, "
        "Tensor(a!) out, Tensor(b!)? probs_out) -> ()");
  // out = x weight^T (+ bias) for x [M, K], weight [N, K], bias [N]; with swiglu, out [M, N/2] = silu(gate) * up
  // where gate and up are the first and second halves of that product's columns, each rounded to the dtype
  // first; with rope_cos/rope_sin [P, D] float32 and positions [M] int64, the rotary embedding of the heads of
  // D channels in columns [0, rope_rows) (q and k of a fused projection) at each row's position. norm_weight [K]:
  // x goes through RMSNorm (eps) first; residual [M, N]: added to the product. On CUDA (bf16/fp16, M <= 32) a
  // weight-streaming kernel for the few rows of a decode step; prefetch_weights: on sm_90 it may start streaming
  // weight and bias before the kernel before it on the stream has finished (that kernel must not write them).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias, bool swiglu, Tensor? rope_cos, Tensor? rope_sin, "
        "Tensor? positions, int rope_rows, Tensor? norm_weight, float eps, Tensor? residual, Tensor(a!) out, "
        "bool prefetch_weights=False) -> ()");
  // "cpu" or "cpu+cuda": which kernels this build holds.
  m.def("build_info() -> str", &build_info);
  // Sets (or with None clears) the int64 CUDA buffer whose slots a trace build's kernels write their per-block
  // timestamps into, one slot per launch from the first (csrc/trace.h); returns whether this build has the marks
  // (a buffer given to another build is an error).
  m.def("trace_buffer(Tensor? buf) -> bool", &trace_buffer);
}
