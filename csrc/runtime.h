// The process-wide NVSHMEM runtime of jax_nvrar: one PE per process, one
// symmetric workspace cut into communicator slots. runtime.cu owns it; the
// all-reduce handler (allreduce.cu) reads it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace jax_nvrar {

// A slot serves one reduction-group layout (e.g. the 'tp' groups of a mesh).
// Its symmetric bytes, at the same offset on every PE, are laid out as
//   [Header][LL receive A][LL receive B][inter-node receive][inter-node stage]
//   [Lamport receive]
// Header, receive and stage sizes are fixed by the slot size; see SlotLayout.
struct SlotLayout {
  size_t header_bytes;
  size_t ll_bytes;       // each of the two LL regions, both parities
  size_t inter_bytes;    // each of the two inter-node regions, all steps/parities
  size_t lamport_bytes;  // the Lamport region, both parities
  size_t a_offset() const { return header_bytes; }
  size_t b_offset() const { return header_bytes + ll_bytes; }
  size_t recv_offset() const { return header_bytes + 2 * ll_bytes; }
  size_t stage_offset() const { return recv_offset() + inter_bytes; }
  size_t lamport_offset() const { return stage_offset() + inter_bytes; }
  // Capacities of one parity: 16-byte lines of an LL region, 16-byte vectors
  // of the Lamport region, bytes of one inter-node step (of `regions`).
  int64_t ll_lines() const { return int64_t(ll_bytes / 2 / 16); }
  int64_t lamport_vecs() const { return int64_t(lamport_bytes / 2 / 16); }
  int64_t inter_step_bytes(int regions) const {
    return int64_t(inter_bytes / (2 * regions)) / 16 * 16;
  }
};

SlotLayout slot_layout(size_t slot_bytes);
// The 32-bit word that marks an empty Lamport line; regions start filled
// with it.
uint32_t lamport_empty_word();

struct Runtime {
  bool initialized = false;
  int pe = -1;
  int n_pes = 0;
  int device = -1;
  size_t slot_bytes = 0;
  int slots = 0;
  char* workspace = nullptr;  // symmetric, slots * slot_bytes
  int64_t timeout_ns = 0;
  std::vector<int> node_pes;  // PEs of NVSHMEM's node team, in team order
};

Runtime& runtime();

// Largest message (bytes) one kernel launch reduces for a group layout.
size_t max_message_bytes(size_t slot_bytes, int node_size, int num_nodes);

std::string unique_id();
void init(const std::string& uid, int rank, int nranks, int device,
          size_t slot_bytes, int slots, double timeout_s);
void finalize();
int device_count();
// Drops the all-reduce plans, which point into the workspace.
void forget_plans();
// The kernel's trace ring (rows of the sequence number, then the global
// timer at entry, sends issued, last wait over, exit); false where the
// extension was built without -DJAX_NVRAR_TRACE or the copy failed.
bool trace_rows(std::vector<uint64_t>* rows);

}  // namespace jax_nvrar
