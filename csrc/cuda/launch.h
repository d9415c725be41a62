// Kernel launches shared by the CUDA launchers: thread-block clusters and programmatic dependent launch, both
// sm_90 features that the launchers use only where the loaded kernel code is sm_90 code.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

namespace pass_ext {

// compute() for `kernel` on `device` (and `variant`, a launcher's own key: a cluster size) the first time, the
// cached value after that: for facts about a kernel on a GPU that launchers need at every launch (its code
// version, its occupancy). Each call site has its own cache (the lambda's type is part of the instantiation).
template <typename Kernel, typename Compute>
auto once_per_kernel(Kernel* kernel, int device, Compute compute, int variant = 0) -> decltype(compute()) {
  using Value = decltype(compute());
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, Value> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, variant);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, compute()).first;
  return it->second;
}

// Whether `kernel` runs sm_90 code on the current device (clusters, griddepcontrol), once per kernel and device.
template <typename Kernel>
bool runs_sm90(Kernel* kernel, int device) {
  return once_per_kernel(kernel, device, [&] {
    cudaFuncAttributes attr{};
    const bool ok = at::cuda::getCurrentDeviceProperties()->major >= 9 &&
                    cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.binaryVersion >= 90;
    (void)cudaGetLastError();
    return ok;
  });
}

// Whether the environment sets `name` to exactly `value`: the on/off switches of the launchers ("0" turns a
// default off, "1" a default-off variant on).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// Which of `choices` the environment sets `name` to: its index, 0 (the first, the default) where it is unset or
// empty; any other value is an error that names the variable and the values it allows. For the launchers' settings
// with more than an on/off switch's two values, or with names for them.
inline int env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  int i = 0;
  for (const char* c : choices) {
    if (std::strcmp(v, c) == 0) return i;
    ++i;
  }
  std::string allowed;  // "a, b or c"
  i = 0;
  for (const char* c : choices) {
    allowed += i == 0 ? "" : i + 1 == static_cast<int>(choices.size()) ? " or " : ", ";
    allowed += c;
    ++i;
  }
  TORCH_CHECK(false, name, " must be ", allowed, ", got '", v, "'");
  return 0;
}

// The integer the environment sets `name` to, `fallback` where it is unset or empty; anything but an integer in
// [lo, hi] is an error that names the variable and its allowed values.
inline int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= lo && n <= hi, name, " must be an integer from ", lo, " to ", hi, ", got '", v,
              "'");
  return static_cast<int64_t>(n);
}

// PASS_EXT_PDL=0 in the environment launches every kernel after the one before it has finished (no programmatic
// dependent launch), for A/B runs and as a bypass. Read at every launch (a getenv, host only), so that one process
// can compare both (bench/profile_step.py --ab; the 8B step with every weight on decode_linear took 7.1 ms with
// them and 5.9 without, in two processes); a captured CUDA graph keeps the launches it was captured with.
inline bool dependent_launch_allowed() { return !env_is("PASS_EXT_PDL", "0"); }

// Whether launches of `kernel` (which must wait for its inputs: kernels/pdl.cuh) may overlap the kernel before.
template <typename Kernel>
bool launches_dependent(Kernel* kernel, int device) {
  return dependent_launch_allowed() && runs_sm90(kernel, device);
}

// The launch attribute that groups blocks into clusters of `cluster` (sm_90).
inline cudaLaunchAttribute cluster_attribute(dim3 cluster) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster.x;
  attr.val.clusterDim.y = cluster.y;
  attr.val.clusterDim.z = cluster.z;
  return attr;
}

// Launches kernel(args...) over `grid`: as clusters of `cluster` blocks when that has more than one block, and
// with programmatic dependent launch when `dependent` (see launches_dependent).
template <typename... Params, typename... Args>
void launch_kernel_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      dim3 cluster, bool dependent, const Args&... args) {
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (cluster.x * cluster.y * cluster.z > 1) attrs[n++] = cluster_attribute(cluster);
  if (dependent) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (n == 0) {
    kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  } else {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attrs;
    config.numAttrs = n;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pass_ext
