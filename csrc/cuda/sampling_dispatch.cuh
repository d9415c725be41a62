// Host side shared by the sampling kernels: the dtype dispatch and the split-row workspace.
#pragma once
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/sampling.cuh"
#include "launch.h"

namespace pass_ext::cuda_dispatch {

// Maps a torch floating dtype to the CUDA element type of the sampling kernels (float, __nv_bfloat16, __half)
// and calls f with a value of that type's pointer; other dtypes are rejected at the op boundary already.
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

namespace pass_ext::sampling::cuda::split {

// The largest top-k a row may have to take the split path. PASS_EXT_SAMPLE_SPLIT=0 (read on every call)
// sends every sampled row through the one-block passes over the row instead; greedy rows keep the split argmax.
inline int max_top_k() { return env_is("PASS_EXT_SAMPLE_SPLIT", "0") ? 0 : kMaxSplitTopK; }

// Whether rows with top-k off take the grid-wide passes ("Plain rows" and "Nucleus rows" in sampling.cuh): by
// default, unless the split path is off (PASS_EXT_SAMPLE_SPLIT=0, the one-block passes for every row) or
// PASS_EXT_SAMPLE_GRID=0 (read on every call, for A/B runs in one process).
inline bool grid_plain() { return max_top_k() > 0 && !env_is("PASS_EXT_SAMPLE_GRID", "0"); }

// Chunks per filter block (filter_chunks in sampling.cuh: one select of the floor per block): PASS_EXT_SAMPLE_GROUP
// = 1, 2, 4 or 8 (read on every call, for A/B runs in one process). By default ("auto"): eight where that still
// leaves two waves of blocks (four resident per SM), else the largest of four and two that still gives every block
// slot a block; small grids keep one chunk per block for their latency, and rows that need no select (plain and
// greedy rows: the host cannot tell) lose little where the grid stays full. On the H200 (V = 151936, bf16,
// bench/NOTES.md): four chunks per block at 32 top-k rows took 36 against 38 µs with two, but plain rows 51
// against 44; eight against four 0.88-0.91x for verify at 320 positions and more, 1.05-1.07x at 128-160.
inline int filter_group(int64_t rows, int chunks, int sms) {
  const int choice = env_choice("PASS_EXT_SAMPLE_GROUP", {"auto", "1", "2", "4", "8"});
  if (choice > 0) return 1 << (choice - 1);
  if (rows * ((chunks + 7) / 8) >= 8 * int64_t(sms)) return 8;
  for (int group = 4; group > 1; group /= 2)
    if (rows * ((chunks + group - 1) / group) >= 4 * int64_t(sms)) return group;
  return 1;
}

// Launches kernel<<<grid, threads>>>(args...) on `stream`, as a programmatic dependent launch where the kernel runs
// sm_90 code and `dependent` is set. Such a kernel waits for the kernel before it first thing (kernels/pdl.cuh);
// each kernel of the sampling chains releases the next one right after that wait (filter_kernel, the first, at
// once), so that a launch overlaps the kernel before it: the grid-wide plain-row passes, which most calls do not
// need (their blocks read a row's parameters and exit), then cost little more than their wait.
template <typename Kernel, typename... Args>
void launch_chained(Kernel* kernel, dim3 grid, unsigned threads, cudaStream_t stream, int device, bool dependent,
                    const Args&... args) {
  launch_kernel_ex(kernel, grid, dim3(threads), 0, stream, dim3(1), dependent && launches_dependent(kernel, device),
                   args...);
}

// Scratch of one call in one allocation (from the caching allocator, so a captured graph keeps it): chunk
// summaries and candidates of each row, each row's warp, how verify races at it (split_ok: 0 over the row, 1 over
// its candidates, 2 raced by the plain-row passes) and the plain-row accumulators (zeroed by filter_kernel).
struct Workspace {
  at::Tensor buffer;
  ChunkSummary* sums;
  Candidate* cands;
  Warp* warps;
  int32_t* split_ok;
  PlainAcc* acc;

  Workspace(const at::Tensor& like, int64_t rows, int chunks) {
    static_assert(std::is_trivially_copyable_v<Warp> && alignof(Warp) <= 16 && alignof(ChunkSummary) <= 16);
    const auto round = [](int64_t bytes) { return (bytes + 15) / 16 * 16; };
    const int64_t sums_bytes = round(rows * chunks * int64_t(sizeof(ChunkSummary)));
    const int64_t cands_bytes = round(rows * chunks * kChunkCands * int64_t(sizeof(Candidate)));
    const int64_t warps_bytes = round(rows * int64_t(sizeof(Warp)));
    const int64_t flags_bytes = round(rows * int64_t(sizeof(int32_t)));
    const int64_t acc_bytes = round(rows * int64_t(sizeof(PlainAcc)));
    buffer = at::empty({sums_bytes + cands_bytes + warps_bytes + flags_bytes + acc_bytes},
                       like.options().dtype(at::kByte));
    uint8_t* base = buffer.data_ptr<uint8_t>();
    sums = reinterpret_cast<ChunkSummary*>(base);
    cands = reinterpret_cast<Candidate*>(base + sums_bytes);
    warps = reinterpret_cast<Warp*>(base + sums_bytes + cands_bytes);
    split_ok = reinterpret_cast<int32_t*>(base + sums_bytes + cands_bytes + warps_bytes);
    acc = reinterpret_cast<PlainAcc*>(base + sums_bytes + cands_bytes + warps_bytes + flags_bytes);
  }
};

}  // namespace pass_ext::sampling::cuda::split
