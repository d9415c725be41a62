// A captured decode step as the body of a CUDA graph IF node (CUDA 12.4+), for generate's stop checks one check
// late (pass_ext/engine.py, StepGraph): each launch first runs a one-warp guard kernel that sets the node's
// condition to "some row is not done" (the rows' done flags as the last step left them) and counts the bodies
// that run. Launches queued past a call's end then cost the guard alone, so the host can queue steps ahead of
// its checks and the GPU never waits for it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>

namespace pass_ext {
namespace {

#if CUDART_VERSION >= 12040
constexpr bool kHasConditionalNodes = true;

__global__ void guard_kernel(cudaGraphConditionalHandle handle, const bool* __restrict__ done, int rows,
                             int64_t* __restrict__ bodies) {
  bool running = false;
  for (int b = threadIdx.x; b < rows; b += 32) running |= !done[b];
  running = __any_sync(0xffffffffu, running);
  if (threadIdx.x == 0) {
    cudaGraphSetConditional(handle, running ? 1u : 0u);
    if (running) *bodies += 1;
  }
}
#else
constexpr bool kHasConditionalNodes = false;
#endif

void check_graph_call(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // graph API errors are not sticky; leave none behind for the next launch check
  TORCH_CHECK(false, "GuardedGraph: ", what, " failed: ", cudaGetErrorString(err));
}

// The outer graph [guard kernel] -> [IF node: a child copy of the captured body]. The body's kernels keep
// pointing into the memory pool of the torch graph they were captured in: its owner keeps that graph alive.
class GuardedGraph : public torch::CustomClassHolder {
 public:
  GuardedGraph(int64_t body, at::Tensor done, at::Tensor bodies) : done_(done), bodies_(bodies) {
    TORCH_CHECK(kHasConditionalNodes, "GuardedGraph: this build's CUDA runtime (", CUDART_VERSION,
                ") has no conditional graph nodes; they need CUDA 12.4 or later");
    TORCH_CHECK(body != 0, "GuardedGraph: body must be a captured cudaGraph_t (torch.cuda.CUDAGraph(keep_graph="
                "True).raw_cuda_graph()), got 0");
    TORCH_CHECK(done.is_cuda() && done.scalar_type() == at::kBool && done.dim() == 1 && done.is_contiguous() &&
                    done.numel() >= 1 && done.numel() <= INT32_MAX,
                "GuardedGraph: done must be a contiguous 1-d bool CUDA tensor with at least one row, got ",
                done.scalar_type(), " on ", done.device(), " with shape ", done.sizes());
    TORCH_CHECK(bodies.is_cuda() && bodies.scalar_type() == at::kLong && bodies.numel() == 1 &&
                    bodies.device() == done.device(),
                "GuardedGraph: bodies must be one int64 element on done's device (", done.device(), "), got ",
                bodies.scalar_type(), " on ", bodies.device(), " with ", bodies.numel(), " elements");
#if CUDART_VERSION >= 12040
    const c10::cuda::CUDAGuard guard(done.device());
    try {
      build(body, done, bodies);
    } catch (...) {  // a constructor that throws runs no destructor: free what was made
      release();
      throw;
    }
#endif
  }

  ~GuardedGraph() override { release(); }

  // One step on the current stream (the guard, then the body where some row is running).
  void launch() {
    const c10::cuda::CUDAGuard guard(done_.device());
    C10_CUDA_CHECK(cudaGraphLaunch(exec_, at::cuda::getCurrentCUDAStream()));
  }

 private:
  void release() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
    exec_ = nullptr;
    graph_ = nullptr;
  }

#if CUDART_VERSION >= 12040
  void build(int64_t body, const at::Tensor& done, const at::Tensor& bodies) {
    check_graph_call(cudaGraphCreate(&graph_, 0), "cudaGraphCreate");
    cudaGraphConditionalHandle handle{};
    check_graph_call(cudaGraphConditionalHandleCreate(&handle, graph_, 0, 0), "cudaGraphConditionalHandleCreate");

    const bool* done_ptr = done.data_ptr<bool>();
    int rows = static_cast<int>(done.numel());
    int64_t* bodies_ptr = bodies.data_ptr<int64_t>();
    void* args[] = {&handle, &done_ptr, &rows, &bodies_ptr};
    cudaKernelNodeParams kp{};
    kp.func = reinterpret_cast<void*>(&guard_kernel);
    kp.gridDim = dim3(1);
    kp.blockDim = dim3(32);
    kp.kernelParams = args;
    cudaGraphNode_t guard_node{};
    check_graph_call(cudaGraphAddKernelNode(&guard_node, graph_, nullptr, 0, &kp), "adding the guard kernel");

    cudaGraphNodeParams cp{};
    cp.type = cudaGraphNodeTypeConditional;
    cp.conditional.handle = handle;
    cp.conditional.type = cudaGraphCondTypeIf;
    cp.conditional.size = 1;
    cudaGraphNode_t if_node{};
    check_graph_call(cudaGraphAddNode(&if_node, graph_, &guard_node, nullptr, 1, &cp), "adding the IF node");
    cudaGraphNode_t child{};
    check_graph_call(cudaGraphAddChildGraphNode(&child, cp.conditional.phGraph_out[0], nullptr, 0,
                                                reinterpret_cast<cudaGraph_t>(static_cast<uintptr_t>(body))),
                     "putting the step into the IF node's body");
    check_graph_call(cudaGraphInstantiate(&exec_, graph_, 0), "cudaGraphInstantiate");
  }
#endif

  at::Tensor done_, bodies_;  // held: the guard kernel reads and writes them at every launch
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(pass_ext, m) {
  // GuardedGraph(body, done, bodies): the captured step `body` (a cudaGraph_t as an integer) under an IF node on
  // "some row of done [B] bool is false", checked at each launch(); bodies (int64, one element) += 1 per body run.
  m.class_<GuardedGraph>("GuardedGraph")
      .def(torch::init<int64_t, at::Tensor, at::Tensor>())
      .def("launch", &GuardedGraph::launch);
}

}  // namespace pass_ext
