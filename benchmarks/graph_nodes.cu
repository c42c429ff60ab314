// Per-node cost of a chain of dependent nodes in one CUDA graph: kernel nodes,
// child-graph nodes (one kernel each, as XLA records a traced custom call),
// and kernel nodes with programmatic dependent launch (PDL). One GPU, no JAX:
//   nvcc -O2 -arch=sm_90 -o graph_nodes benchmarks/graph_nodes.cu && ./graph_nodes
#include <cstdio>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); return 1; } } while (0)
__global__ void empty_k(float* p) {}
__global__ void pdl_k(float* p) { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__global__ void work_k(float* p) { int i = blockIdx.x * blockDim.x + threadIdx.x; p[i] = p[i] * 0.5f + 1.f; }
__global__ void pdl_work_k(float* p) { asm volatile("griddepcontrol.wait;" ::: "memory"); int i = blockIdx.x * blockDim.x + threadIdx.x; p[i] = p[i] * 0.5f + 1.f; }

int main() {
  const int N = 64, iters = 50;
  float* buf; CK(cudaMalloc(&buf, 1 << 24));
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  for (int blocks : {1, 16, 128}) {
    for (int mode = 0; mode < 6; ++mode) {
      // modes: 0 empty kernel nodes, 1 empty child nodes, 2 empty PDL, 3 work kernel, 4 work child, 5 work PDL
      bool work = mode >= 3; int m = mode % 3;
      void (*k)(float*) = work ? (m == 2 ? pdl_work_k : work_k) : (m == 2 ? pdl_k : empty_k);
      cudaGraph_t g;
      if (m == 1) {
        CK(cudaGraphCreate(&g, 0));
        cudaGraphNode_t prev = nullptr;
        for (int i = 0; i < N; ++i) {
          cudaGraph_t child;
          CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
          k<<<blocks, 128, 0, s>>>(buf);
          CK(cudaStreamEndCapture(s, &child));
          cudaGraphNode_t node;
          CK(cudaGraphAddChildGraphNode(&node, g, prev ? &prev : nullptr, prev ? 1 : 0, child));
          prev = node;
        }
      } else {
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < N; ++i) {
          cudaLaunchConfig_t cfg = {}; cfg.gridDim = blocks; cfg.blockDim = 128; cfg.stream = s;
          cudaLaunchAttribute attr; attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
          attr.val.programmaticStreamSerializationAllowed = 1;
          cfg.attrs = &attr; cfg.numAttrs = (m == 2 && i > 0) ? 1 : 0;
          CK(cudaLaunchKernelEx(&cfg, k, buf));
        }
        CK(cudaStreamEndCapture(s, &g));
      }
      cudaGraphExec_t ge; CK(cudaGraphInstantiate(&ge, g, 0));
      for (int w = 0; w < 5; ++w) CK(cudaGraphLaunch(ge, s));
      CK(cudaStreamSynchronize(s));
      float best = 1e9;
      for (int r = 0; r < 7; ++r) {
        CK(cudaEventRecord(a, s));
        for (int it = 0; it < iters; ++it) CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(b, s)); CK(cudaEventSynchronize(b));
        float ms; CK(cudaEventElapsedTime(&ms, a, b)); if (ms < best) best = ms;
      }
      const char* names[] = {"kernel nodes", "child-graph nodes", "PDL kernel nodes"};
      printf("%-6s %-18s blocks %4d: %.2f us/node\n", work ? "work" : "empty", names[m], blocks, best * 1e3 / (iters * N));
      CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
    }
  }
  return 0;
}
