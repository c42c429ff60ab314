// NVSHMEM start-up and shut-down for jax_nvrar, and the symmetric workspace.
//
// The extension calls nvshmemx_init_attr itself: NVSHMEM's device library is
// linked statically into this module, and initialising from here is what
// registers that library's device state. A later init of the same runtime by
// another user of NVSHMEM in the process (e.g. nvshmem4py) only bumps a
// reference count.

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "runtime.h"

namespace jax_nvrar {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("jax_nvrar: ") + what + ": " +
                             cudaGetErrorString(err));
}

__global__ void fill_words(uint32_t* dst, size_t words, uint32_t value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words;
       i += size_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

}  // namespace

Runtime& runtime() {
  static Runtime rt;
  return rt;
}

int device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

std::string unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0)
    throw std::runtime_error("jax_nvrar: nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void init(const std::string& uid, int rank, int nranks, int device,
          size_t slot_bytes, int slots, double timeout_s) {
  Runtime& rt = runtime();
  if (rt.initialized)
    throw std::runtime_error("jax_nvrar: the runtime is already initialized");
  if (uid.size() != sizeof(nvshmemx_uniqueid_t))
    throw std::invalid_argument("jax_nvrar: malformed NVSHMEM unique id");
  if (rank < 0 || rank >= nranks)
    throw std::invalid_argument("jax_nvrar: rank out of range");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");

  // NVLink multicast stays off; the heap must hold the workspace. Values the
  // user set are kept.
  const size_t total = slot_bytes * size_t(slots);
  setenv("NVSHMEM_DISABLE_NVLS", "1", 0);
  setenv("NVSHMEM_SYMMETRIC_SIZE", std::to_string(total + (64 << 20)).c_str(), 0);

  nvshmemx_uniqueid_t id;
  std::memcpy(&id, uid.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, nranks, &id, &attr) != 0)
    throw std::runtime_error("jax_nvrar: nvshmemx_set_attr_uniqueid_args failed");
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0)
    throw std::runtime_error("jax_nvrar: nvshmemx_init_attr failed");

  char* workspace = static_cast<char*>(nvshmem_malloc(total));
  if (workspace == nullptr) {
    nvshmem_finalize();
    throw std::runtime_error(
        "jax_nvrar: nvshmem_malloc of " + std::to_string(total) +
        " bytes failed; raise NVSHMEM_SYMMETRIC_SIZE or lower the workspace");
  }
  check_cuda(cudaMemset(workspace, 0, total), "cudaMemset");
  const SlotLayout layout = slot_layout(slot_bytes);
  for (int s = 0; s < slots; ++s) {
    fill_words<<<256, 256>>>(reinterpret_cast<uint32_t*>(
                                 workspace + s * slot_bytes + layout.lamport_offset()),
                             layout.lamport_bytes / 4, lamport_empty_word());
    check_cuda(cudaGetLastError(), "filling the Lamport regions");
  }
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  // No PE writes into a peer's slot before it is initialised.
  nvshmem_barrier_all();

  rt.pe = nvshmem_my_pe();
  rt.n_pes = nvshmem_n_pes();
  rt.device = device;
  rt.slot_bytes = slot_bytes;
  rt.slots = slots;
  rt.workspace = workspace;
  rt.timeout_ns = int64_t(timeout_s * 1e9);
  rt.node_pes.clear();
  const int node_pes = nvshmem_team_n_pes(NVSHMEMX_TEAM_NODE);
  for (int i = 0; i < node_pes; ++i)
    rt.node_pes.push_back(
        nvshmem_team_translate_pe(NVSHMEMX_TEAM_NODE, i, NVSHMEM_TEAM_WORLD));
  rt.initialized = true;
}

void finalize() {
  Runtime& rt = runtime();
  if (!rt.initialized) return;
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  forget_plans();
  nvshmem_free(rt.workspace);
  nvshmem_finalize();
  rt = Runtime{};
}

}  // namespace jax_nvrar
