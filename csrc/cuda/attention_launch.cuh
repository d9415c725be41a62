// Host side of attention_with_kv_cache on CUDA, shared by its translation units: picks the kernel (tensor cores or
// CUDA cores), row tile, head-dim path and number of KV splits, and launches it (+ the split combine) from
// csrc/kernels/attention*.cuh. run<T> is instantiated once per dtype of q in its own file (attention_launch_*.cu),
// so that the kernels of the three dtypes compile in parallel; attention_with_kv_cache.cu validates and dispatches.
//
//
// Kernel choice: fp16/bf16 with D = 64 or 128 and at least 4 packed query rows per KV head (Q * Hq / Hkv >= 4;
// PASS_EXT_ATTENTION_TC_MIN_ROWS moves the threshold) run on tensor cores (attention_mma.cuh, sm_80+ code);
// everything else, and every call when the environment sets PASS_EXT_ATTENTION_TC=0 (both read once per
// process), runs the CUDA-core kernel (attention.cuh). Both have the same semantics, down to the clamping below.
//
// Differences from the CPU reference, by design:
//  * cache_lens is read on the device only (no host sync, so the op can be captured in a CUDA graph).
//    The CPU kernel raises when cache_lens[b] < 0 or cache_lens[b] + Q > S_max; here such a row cannot be
//    checked, so the kernel clamps instead: it attends to slots [0, clamp(cache_lens[b], 0, S_max)) and
//    writes only the new tokens whose slot cache_lens[b] + j lies in [0, S_max). Memory outside the
//    cache is never touched; callers keep rows in range (DESIGN §2: a row that would overflow stops).
//  * Limits: Q <= 128 new tokens per row, D a multiple of 8 up to 256 (64 and 128 have tuned paths),
//    float32/float16/bfloat16 (no float64), tensors 16-byte aligned.
//
// KV splits: on sm_90, the splits of a tile of at most 16 rows run as one thread-block cluster (up to 16 blocks)
// that merges through distributed shared memory at the end of the kernel (pick_cluster; PASS_EXT_ATTENTION_CLUSTER=0
// turns it off, =all uses it wherever it fits, PASS_EXT_ATTENTION_CLUSTER_ROWS moves the 16; read at every call).
// Otherwise the last block of a row tile to finish
// merges the splits' partials (the fused combine) where that is a small job (at most kFusedCombineMaxRows rows
// per tile: decode), else a combine kernel runs after. The fused combine counts finished blocks in a
// per-(device, stream) buffer of counters that every launch leaves zeroed; launches that may overlap must run on
// different streams (CUDA graphs replay on the stream they are launched on, so two graphs captured on one stream
// must not be replayed concurrently). PASS_EXT_ATTENTION_FUSED_COMBINE=0 keeps the combine kernel (read once).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "kernels/attention.cuh"
#include "kernels/attention_mma.cuh"
#include "launch.h"
#include "op_checks.h"

namespace pass_ext::attention_launch {

namespace k = kernels;

constexpr int64_t kMaxQ = 128;
constexpr int64_t kMaxSplits = k::kMaxSplits;

// Keys of capacity a KV split covers at least: PASS_EXT_ATTENTION_SPLIT_KEYS, a multiple of k::kKeyTile (32),
// default kMinSplitKeys (64), which is also the tensor-core kernel's minimum (split_keys_mma). Fewer splits trade
// parallelism for the merge: a capacity at or below the value runs one split and no merge. Read at every call
// (host only, a few hundred ns), so that one process can compare settings (bench/profile_step.py --ab); a
// captured graph keeps the split count it was captured with.
inline int64_t split_keys() {
  const int64_t n = env_int("PASS_EXT_ATTENTION_SPLIT_KEYS", k::kMinSplitKeys, 1, int64_t{1} << 30);
  TORCH_CHECK(n % k::kKeyTile == 0, "PASS_EXT_ATTENTION_SPLIT_KEYS must be a positive multiple of ", k::kKeyTile,
              ", got ", n);
  return n;
}

inline int64_t split_keys_mma() { return std::max<int64_t>(split_keys(), k::kMinSplitKeys); }

// Number of KV splits. The host cannot see cache_lens (graph-safe, no sync), so it sizes for the capacity
// S_max and the kernel divides each row's actual length by this count on the device; splits that get no
// keys exit at once. Aim for two blocks per SM; a split covers at least `keys` keys of capacity.
inline int64_t pick_splits(int64_t base_blocks, int64_t capacity_keys, int sms, int64_t keys) {
  const int64_t target = 2 * static_cast<int64_t>(sms);
  if (base_blocks >= target) return 1;
  int64_t splits = (target + base_blocks - 1) / base_blocks;
  splits = std::min(splits, (capacity_keys + keys - 1) / keys);
  return std::max<int64_t>(1, std::min(splits, kMaxSplits));
}

// Scratch of the split combine, when there are splits: fp32 partials [B*Hkv, splits, R, D] and (max, sum)
// [B*Hkv, splits, R]. The tensors are returned so they outlive the launches (the caching allocator keeps
// them stream-ordered).
inline std::pair<at::Tensor, at::Tensor> alloc_partials(k::AttentionParams& p, const at::Tensor& q) {
  if (p.splits <= 1 || p.cluster) return {};
  const int64_t bh = int64_t(p.B) * p.Hkv;
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor part_acc = at::empty({bh * p.splits * p.R * p.D}, opts);
  at::Tensor part_ml = at::empty({bh * p.splits * p.R * 2}, opts);
  p.part_acc = part_acc.data_ptr<float>();
  p.part_ml = reinterpret_cast<float2*>(part_ml.data_ptr<float>());
  return {part_acc, part_ml};
}

// Opt a kernel into `smem` bytes of dynamic shared memory (beyond the default 48 KB), or say why not.
template <typename Kernel>
void set_smem(Kernel* kernel, size_t smem, int64_t D) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, "attention_with_kv_cache: head dim D=", D, " needs ", smem,
              " bytes of shared memory per block, this GPU allows ", prop->sharedMemPerBlockOptin);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// The fused combine's bound: a tile's last block merges at most this many query rows (two per warp; a
// combine kernel's warp merges one). With more, its warps would merge row after row while the combine
// kernel spreads them over the GPU: measured on the H200, 64 rows made SmolLM2's PaSS attention 9x slower.
constexpr int64_t kFusedCombineMaxRows = 2 * k::kWarps;

inline bool fused_combine_allowed() {
  static const bool allowed = !env_is("PASS_EXT_ATTENTION_FUSED_COMBINE", "0");
  return allowed;
}

// Zeroed int32 counters for the fused combine, at least n of them, for launches on `stream`; nullptr when
// there are none to give (a graph capture cannot allocate and zero a new buffer: the combine kernel runs).
// Buffers are never freed: a captured graph keeps the pointer it was captured with.
inline int* combine_counters(int64_t n, cudaStream_t stream, const at::Tensor& like) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> buffers;
  static std::vector<at::Tensor> retired;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(like.get_device()), stream);
  auto it = buffers.find(key);
  if (it != buffers.end() && it->second.numel() >= n) return it->second.data_ptr<int32_t>();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone) return nullptr;
  at::Tensor fresh = at::zeros({std::max<int64_t>(n, 4096)}, like.options().dtype(at::kInt));  // on `stream`
  if (it != buffers.end()) {
    retired.push_back(it->second);
    it->second = fresh;
  } else {
    buffers.emplace(key, fresh);
  }
  return fresh.data_ptr<int32_t>();
}

// Sets p.counters for a grid of `row_tiles` tiles of `tile_rows` rows per (row, KV head), or leaves it null.
inline void pick_combine(k::AttentionParams& p, int64_t row_tiles, int64_t tile_rows, cudaStream_t stream,
                  const at::Tensor& q) {
  p.counters = nullptr;
  if (p.splits <= 1 || !fused_combine_allowed()) return;
  if (std::min<int64_t>(tile_rows, p.R) > kFusedCombineMaxRows) return;
  p.counters = combine_counters(int64_t(p.B) * p.Hkv * row_tiles, stream, q);
}

template <typename T>
void launch_combine(const k::AttentionParams& p, cudaStream_t stream) {
  if (p.splits <= 1 || p.counters != nullptr || p.cluster) return;
  const int64_t rows = int64_t(p.B) * p.Hkv * p.R;
  k::attention_combine_kernel<T><<<static_cast<unsigned>((rows + k::kWarps - 1) / k::kWarps), k::kThreads, 0,
                                   stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- cluster merge (sm_90) ----

// When splits merge in a cluster: kClusterNever (PASS_EXT_ATTENTION_CLUSTER=0: global memory always),
// kClusterDecode (default: see pick_cluster), kClusterWherever (=all: every split launch a cluster fits, for
// benchmarks). Read at every call (host only), so that one process can compare them (bench/profile_step.py --ab);
// a captured graph keeps the launches it was captured with.
enum ClusterMode { kClusterNever, kClusterDecode, kClusterWherever };

// The rows of a tile up to which kClusterDecode merges in a cluster: PASS_EXT_ATTENTION_CLUSTER_ROWS, default 16
// (one m16 tile; read at every call, like the mode, for A/B runs in one process). On the H200, the cluster against
// the combine kernel in the fused PaSS step at k = 1, B = 1 (replayed, random weights): SmolLM2 (12 rows) 0.898x
// the step's time, the 8B (16 rows) 1.003x, the 1.5B (24 rows, 32-row tiles) 1.023x, so not past 16 (bench/NOTES.md).
constexpr int64_t kClusterMaxRows = 16;
inline int64_t cluster_max_rows() { return env_int("PASS_EXT_ATTENTION_CLUSTER_ROWS", kClusterMaxRows, 1, kMaxQ * 16); }

inline ClusterMode cluster_mode() {
  switch (env_choice("PASS_EXT_ATTENTION_CLUSTER", {"1", "0", "all"})) {
    case 1: return kClusterNever;
    case 2: return kClusterWherever;
    default: return kClusterDecode;
  }
}

// How many clusters of `size` blocks of `kernel` (its shared-memory opt-in made, `smem` bytes each) can be
// resident at once here: 0 without sm_90 code on an sm_90+ GPU (sizes above 8 need the non-portable opt-in,
// which the H100/H200 grant up to 16). A cluster's blocks share one GPC, so this is less than the block slots
// over `size`: 14 clusters of 16 two-block-per-SM blocks on the H200, not 16. Queried once per (kernel, size,
// device).
template <typename Kernel>
int max_active_clusters(Kernel* kernel, int size, size_t smem, int device) {
  return once_per_kernel(kernel, device, [&] {
    int clusters = 0;
    if (runs_sm90(kernel, device) &&
        (size <= 8 || cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess)) {
      cudaLaunchConfig_t config{};
      cudaLaunchAttribute attrs[1] = {cluster_attribute(dim3(static_cast<unsigned>(size)))};
      config.gridDim = dim3(static_cast<unsigned>(size));
      config.blockDim = dim3(k::kThreads);
      config.dynamicSmemBytes = smem;
      config.attrs = attrs;
      config.numAttrs = 1;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) clusters = 0;
    }
    (void)cudaGetLastError();  // a refused query leaves no error behind: such calls merge through global memory
    return clusters;
  }, size);
}

// Makes the launch a cluster merge where it pays (sets p.cluster and p.splits): the splits of a row tile as one
// cluster (one per row tile and KV head of a row: `tiles`), as many as the global merge would use up to
// kMaxClusterSplits. By default for tiles of at most cluster_max_rows() rows, where the merge is a short
// job at the end of a short kernel. On the H200: B = 1, 8 KV heads, L = 4096, 33 splits -> 16, 19.2 -> 16.1 us;
// SmolLM2 decode (3 rows, 7 splits) 6.9 -> 5.6 us per call; but the 64-row tiles of its fused PaSS step (75 rows)
// 6.4 -> 12.9 us, where the combine kernel spreads the rows over the GPU (bench/NOTES.md). Capping costs
// parallelism, so it is done only while the capped grid still gives half the SMs a block. Every cluster must be
// resident at once: a second wave of clusters cost more than the merge saves (64 clusters of 4 where 62 fit:
// B = 8, Q = 16, 57 -> 79 us), so such launches merge through global memory.
template <typename Kernel>
void pick_cluster(k::AttentionParams& p, Kernel* kernel, size_t smem, int64_t tiles, int64_t tile_rows, int sms,
                  int device) {
  p.cluster = 0;
  const ClusterMode mode = cluster_mode();
  if (p.splits <= 1 || mode == kClusterNever) return;
  if (mode == kClusterDecode && std::min<int64_t>(tile_rows, p.R) > cluster_max_rows()) return;
  int64_t size = p.splits;
  if (size > k::kMaxClusterSplits) {
    if (tiles * k::kMaxClusterSplits * 2 < sms) return;
    size = k::kMaxClusterSplits;
  }
  if (max_active_clusters(kernel, static_cast<int>(size), smem, device) < tiles) return;
  p.splits = static_cast<int>(size);
  p.cluster = 1;
}

// Launches `kernel` over `grid`, as clusters of p.splits blocks along the split dimension (`split_dim`: 0 = x,
// 1 = y) when p.cluster is set; as a dependent launch (launch.h) where the GPU runs the kernel's sm_90 code.
template <typename Kernel>
void launch_kernel(Kernel* kernel, dim3 grid, size_t smem, cudaStream_t stream, const k::AttentionParams& p,
                   int split_dim, int device) {
  const unsigned size = p.cluster ? static_cast<unsigned>(p.splits) : 1u;
  launch_kernel_ex(kernel, grid, dim3(k::kThreads), smem, stream, split_dim == 0 ? dim3(size) : dim3(1, size),
                   launches_dependent(kernel, device), p);
}

template <typename T, int D_MAX, int E, bool EXACT, int RT>
void launch(k::AttentionParams p, const at::Tensor& q, cudaStream_t stream, int sms) {
  using Tile = k::AttentionTile<T, D_MAX, E, EXACT, RT>;
  const int64_t row_tiles = (p.R + RT - 1) / RT;
  const int64_t bh = int64_t(p.B) * p.Hkv;
  TORCH_CHECK(row_tiles <= 65535, "attention_with_kv_cache: Q * Hq / Hkv = ", p.R, " query rows per KV head is too many");
  auto* kernel = &k::attention_kernel<T, D_MAX, E, EXACT, RT>;
  const size_t smem = Tile::kSmemBytes;
  set_smem(kernel, smem, p.D);
  p.split_keys = static_cast<int>(split_keys());
  p.splits = static_cast<int>(pick_splits(bh * row_tiles, int64_t(p.S) + p.Q, sms, p.split_keys));
  pick_cluster(p, kernel, smem, bh * row_tiles, RT, sms, q.get_device());
  const auto partials = alloc_partials(p, q);
  if (!p.cluster) pick_combine(p, row_tiles, RT, stream, q);

  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(row_tiles), static_cast<unsigned>(bh));
  launch_kernel(kernel, grid, smem, stream, p, 0, q.get_device());
  launch_combine<T>(p, stream);
}

// Row tile: a block holds RT = 4, 16 or 64 query rows (32 for the generic head dim, whose per-lane
// accumulators are larger). Small tiles keep decode (Q * G <= 4) from computing padding rows.
template <typename T, int D_MAX, int E, bool EXACT>
void dispatch_rows(const k::AttentionParams& p, const at::Tensor& q, cudaStream_t stream, int sms) {
  constexpr int kBig = D_MAX > 128 ? 32 : 64;
  if (p.R <= 4)
    launch<T, D_MAX, E, EXACT, 4>(p, q, stream, sms);
  else if (p.R <= 16)
    launch<T, D_MAX, E, EXACT, 16>(p, q, stream, sms);
  else
    launch<T, D_MAX, E, EXACT, kBig>(p, q, stream, sms);
}

template <typename T>
void dispatch_head_dim(const k::AttentionParams& p, const at::Tensor& q, cudaStream_t stream, int sms) {
  if (p.D == 64)
    dispatch_rows<T, 64, 2, true>(p, q, stream, sms);
  else if (p.D == 128)
    dispatch_rows<T, 128, 4, true>(p, q, stream, sms);
  else
    dispatch_rows<T, 256, 2, false>(p, q, stream, sms);  // any multiple of 8 up to 256
}

// ---- tensor-core path ----

// PASS_EXT_ATTENTION_TC=0 keeps every call on the CUDA-core kernel (a bypass should the tensor-core path
// misbehave on some GPU). Read once: a CUDA graph captured earlier keeps the kernel it captured anyway.
inline bool tensor_cores_allowed() {
  static const bool allowed = !env_is("PASS_EXT_ATTENTION_TC", "0");
  return allowed;
}

// Packed query rows per KV head from which the tensor-core kernel runs: PASS_EXT_ATTENTION_TC_MIN_ROWS, default
// 4: a padded m16 tile with 4 rows (GQA 4 at Q = 1) beat the CUDA-core kernel on the H200 (B = 8, L = 4096:
// 49 against 63 µs; bench/NOTES.md); the variable lets a benchmark decide without a rebuild. Read once.
inline int64_t tensor_core_min_rows() {
  static const int64_t rows = env_int("PASS_EXT_ATTENTION_TC_MIN_ROWS", 4, 1, INT64_MAX);
  return rows;
}

// Tensor-core kernel instance on one device: whether it can run there, and how many of its blocks an SM holds.
// It cannot when its loaded code lacks the sm_80 instructions (a build whose architecture list stops below 8.0
// JIT-compiles PTX in which the kernel only traps) or when its shared memory exceeds the GPU's opt-in limit
// (about 100 KB on sm_86/sm_89 against 104 KB at D=128); such calls take the CUDA-core kernel. Queried once
// per (kernel, device), after the shared-memory opt-in, which the occupancy depends on.
struct MmaKernelInfo {
  bool usable;
  int blocks_per_sm;
};

template <typename Kernel>
MmaKernelInfo mma_kernel_info(Kernel* kernel, size_t smem, int device) {
  return once_per_kernel(kernel, device, [&] {
    MmaKernelInfo info{false, 0};
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
      (void)cudaGetLastError();  // no code for this GPU at all: the CUDA-core launch reports it
    } else if (attr.binaryVersion >= 80 && smem <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, kernel, k::kThreads, smem));
      info.usable = info.blocks_per_sm >= 1;
    }
    return info;
  });
}

// KV splits of the tensor-core kernel: as many as fill the resident block slots (SMs x blocks per SM) in
// one wave. Rounding up instead (pick_splits) can leave a second, nearly empty wave: 320 blocks on 264
// slots take two block times.
inline int64_t pick_splits_one_wave(int64_t base_blocks, int64_t capacity_keys, int64_t slots) {
  if (base_blocks >= slots) return 1;
  int64_t splits = slots / base_blocks;
  const int64_t keys = split_keys_mma();
  splits = std::min(splits, (capacity_keys + keys - 1) / keys);
  return std::max<int64_t>(1, std::min(splits, kMaxSplits));
}

// One block = kRows packed query rows of one KV head; row tiles innermost in the grid (see the kernel).
// Returns false, launching nothing, when the kernel cannot run on this GPU (see MmaKernelInfo).
template <typename T, int D, int KW>
bool launch_mma(k::AttentionParams p, const at::Tensor& q, cudaStream_t stream, int sms) {
  using Tile = k::MmaTile<T, D, KW>;
  auto* kernel = &k::attention_mma_kernel<T, D, KW>;
  const MmaKernelInfo info = mma_kernel_info(kernel, Tile::kSmemBytes, q.get_device());
  if (!info.usable) return false;
  const int64_t row_tiles = (p.R + Tile::kRows - 1) / Tile::kRows;
  const int64_t bh = int64_t(p.B) * p.Hkv;
  p.splits = static_cast<int>(
      pick_splits_one_wave(bh * row_tiles, int64_t(p.S) + p.Q, int64_t(sms) * info.blocks_per_sm));
  pick_cluster(p, kernel, Tile::kSmemBytes, bh * row_tiles, Tile::kRows, sms, q.get_device());
  const auto partials = alloc_partials(p, q);  // the smem opt-in was made with the info query
  if (!p.cluster) pick_combine(p, row_tiles, Tile::kRows, stream, q);
  TORCH_CHECK(p.counters == nullptr || KW == k::kWarps, "attention_with_kv_cache: internal error: the fused "
              "combine is compiled into the 16-row tensor-core tiles only");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.splits), static_cast<unsigned>(bh));
  launch_kernel(kernel, grid, Tile::kSmemBytes, stream, p, 1, q.get_device());
  launch_combine<T>(p, stream);
  return true;
}

// Warps per block split 4 = row warps x key warps: 16 rows need one m16 tile, so its 4 warps split each
// stage's keys; 17..32 rows use 2 x 2; more use 4 m16 tiles per block (the last may be partly padding).
template <typename T, int D>
bool dispatch_mma_rows(const k::AttentionParams& p, const at::Tensor& q, cudaStream_t stream, int sms) {
  if (p.R <= 16) return launch_mma<T, D, 4>(p, q, stream, sms);
  if (p.R <= 32) return launch_mma<T, D, 2>(p, q, stream, sms);
  return launch_mma<T, D, 1>(p, q, stream, sms);
}

// Runs the tensor-core kernel when the call qualifies (see the file header); false: nothing launched.
template <typename T>
bool try_tensor_cores(const k::AttentionParams& p, const at::Tensor& q, cudaStream_t stream, int sms) {
  if (!tensor_cores_allowed() || p.R < tensor_core_min_rows() || at::cuda::getCurrentDeviceProperties()->major < 8)
    return false;
  if (p.D == 64) return dispatch_mma_rows<T, 64>(p, q, stream, sms);
  if (p.D == 128) return dispatch_mma_rows<T, 128>(p, q, stream, sms);
  return false;
}

// The launch for one dtype of q: the tensor-core kernel where the call qualifies (fp16/bf16, see above), else
// the CUDA-core kernel.
template <typename T>
void run(const k::AttentionParams& p, const at::Tensor& q, cudaStream_t stream, int sms) {
  if constexpr (!std::is_same_v<T, float>)
    if (try_tensor_cores<T>(p, q, stream, sms)) return;
  dispatch_head_dim<T>(p, q, stream, sms);
}

// Each instantiated in its own translation unit (attention_launch_f32.cu, _f16.cu, _bf16.cu).
extern template void run<float>(const k::AttentionParams&, const at::Tensor&, cudaStream_t, int);
extern template void run<__half>(const k::AttentionParams&, const at::Tensor&, cudaStream_t, int);
extern template void run<__nv_bfloat16>(const k::AttentionParams&, const at::Tensor&, cudaStream_t, int);

}  // namespace pass_ext::attention_launch
