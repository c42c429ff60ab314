// NVRAR all-reduce on NVSHMEM symmetric memory, as an XLA FFI custom call.
//
// Protocol
// --------
// Group. A reduction group of n = N * G PEs: N nodes of G PEs each (member m
// is local rank m % G of node m / G; jax_nvrar/_schedule.py is the same
// description in Python). The group table comes from the mesh at lowering
// time; the FFI attributes carry the whole partition and each PE finds its
// own group in it.
//
// Buffers. Each PE owns one symmetric workspace slot per group layout (see
// runtime.h): two LL receive regions A and B, for the inter-node phase a
// receive region and a stage region, and a Lamport receive region, every
// region split by parity. Only the owner reads its receive regions; peers
// write them: LL and Lamport regions through nvshmem_ptr() stores over
// NVLink, inter-node regions the same way where the partner is reachable,
// else through NVSHMEM puts.
//
// Packets. Intra-node data travel as LL lines of 16 bytes written with one
// 16-byte store: {data0, flag, data1, flag}, 8 payload bytes, flag = the
// call's sequence number. Each 8-byte half is written atomically, so a reader
// that sees both flags equal to the sequence number has the data: no separate
// signal, no fence, no barrier. 16-byte lines (NCCL's LL layout) were chosen
// over the paper's 8-byte {4 B data, 4 B flag} packets because they move
// twice the payload per store instruction at the same 50% efficiency.
//
// Flag lines. For larger messages the LL lines' 50% payload costs more than
// a second hop: data then travel as plain 16-byte stores; once a block's
// slice is written (block barrier), thread j stores a 32-bit flag = sequence
// number at local peer j with system-scope release semantics; the reader
// polls the flags of its slice with acquire loads, then reads through L2.
// Header::flags_a / flags_b hold them, one per (parity, source, block).
//
// Inter-node data travel as LL lines stored into the partner's receive region
// where nvshmem_ptr() reaches it (virtual nodes of one host, nodes of one
// NVLink domain) and the message is at most kInterLinesMaxBytes; else as
// nvshmemx_putmem_signal_nbi_block: payload then a 64-bit signal set to the
// sequence number, one signal per (step, block), so the path works over any
// NVSHMEM transport (InfiniBand, Slingshot via libfabric). The two land in
// separate parts of a receive region. JAX_NVRAR_INTER_NODE=put (the "puts"
// attribute) forces puts.
//
// Sequence numbers. header->seq holds the number of the last call of this
// slot; a call uses seq + 1, and the last of its blocks to have read the old
// number writes the new one back. It lives in device memory and only kernels
// advance it, so replaying a captured CUDA graph stays correct and buffers
// are never reset. LL flags from older calls never equal the current number,
// so stale LL lines are ignored. Raw data of the flag variants lands in the
// same regions and could, by chance, carry words equal to a later LL call's
// number; so one slot must not carry both kinds of traffic. jax_nvrar.psum
// picks Lamport or LL variants (they use separate regions) unless
// JAX_NVRAR_ALGO names a flag variant.
//
// Buffering. A call uses the regions of parity seq & 1. A PE can only be one
// call ahead of any peer it exchanges with: finishing call k needs data every
// peer produced in call k, which a peer sends only after its call k - 1
// completed on its stream. So when a PE writes call k + 2 into the parity of
// call k, every reader of that parity is done with call k.
//
// Lamport lines (the default on one node; see the section before
// oneshot_lamport): plain data in a region kept "empty" between uses, no
// flags.
//
// Phases (one launch; no host synchronisation, no NVSHMEM collectives):
//   one-shot  (N = 1, small): every PE stores its whole input into every
//             peer's region A (Lamport: the Lamport region); each PE sums
//             the G copies. Lamport, LL or flag lines.
//   two-shot  (N = 1): reduce-scatter through region A (chunk j goes to local
//             rank j), all-gather of the reduced chunks through region B
//             (Lamport: both halves of the Lamport region). Lamport, LL or
//             flag lines.
//   hierarchical (N > 1): reduce-scatter as two-shot; then recursive doubling
//             between equal local ranks of the N nodes on the chunk, each
//             block on its own slice of the chunk, non-power-of-two N folded
//             into partners first and unfolded last; then all-gather. Lamport
//             lines on each node where they fit, LL lines when an LL variant
//             is asked for.
//
// Arithmetic. Half types accumulate in float32. The G sources of a chunk are
// added in local-rank order, starting from source 0 (not from 0.0, which
// would turn -0 into +0), and rounded once; an inter-node step rounds a + b
// (commutative, so both partners get the same bits). Every PE therefore gets
// bitwise-identical results, equal to the reference backend's (Lamport
// lines: but for the sign of a zero sum, see their section).
//
// Failure. Every spin-wait has a timeout (jax_nvrar.initialize's timeout_s):
// it prints the PE, block, phase and sequence number and traps. Testing: the
// fault switch 1 makes the LL, flag and inter-node signal waits return at
// once and the Lamport reads take what is there before waiting (the wait and
// emptying still run, so later calls stay clean); switch 2 skips only the
// inter-node signal waits. Results must then go wrong. Switch 3 makes the
// kernel return at its first instruction (the cost of the call itself).
//
// Grid. Blocks come from the "blocks" attribute (psum's tuning table) or,
// for 0, from launch_grid's rule; never more than fit on the device at once
// (resident_blocks): blocks wait for data sent by peers' blocks, so every
// block of a launch must be running. PEs of a group launch the same grid
// (same attribute, same GPU model), which the flag and inter-node phases
// need: they pair blocks of equal index.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_nvrar {
namespace {

// ----------------------------------------------------------------- constants

constexpr int kMaxLocal = 8;      // PEs per node
constexpr int kMaxSteps = 8;      // inter-node regions: fold, 6 doublings, unfold
constexpr int kFoldStep = 0;      // region index of the fold (the unfold's is
                                  // the last, Params::regions - 1)
constexpr int kMaxBlocks = 128;
constexpr int kThreads = 512;
constexpr size_t kHeaderBytes = 64 << 10;
constexpr int64_t kPayload = 8;   // bytes of data in one 16-byte LL line

// Values of the "algo" attribute; jax_nvrar/_runtime.py has the same table.
enum Algo : int {
  kAuto = 0,
  kOneShotLL = 1,
  kTwoShotLL = 2,
  kOneShotFlag = 3,
  kTwoShotFlag = 4,
  kOneShotLamport = 5,
  kTwoShotLamport = 6,
  kHierLamport = 7,  // N > 1 only; the kernel picks it (not a table entry)
};
enum Role : int { kPlain = 0, kFoldReceiver = 1, kFoldSender = 2 };
enum Phase : int { kOneShotPhase, kReduceScatter, kAllGather, kInterNode };
// Values of the "fault" attribute (testing only).
enum Fault : int {
  kNoFault = 0,
  kSkipLocalWaits = 1,
  kSkipRemoteWaits = 2,
  kEmptyKernel = 3,  // return at once, output unwritten
};
constexpr int64_t kVec = 16;      // bytes of data in one flag-protocol store
// Largest message whose inter-node steps use LL lines where the partner is
// reachable; above it, lines' 50% payload costs more than a put's signal
// and fence (2x2 virtual nodes on 4xH100, LL lines within each node: lines
// 9.9-14.5 us against puts 17.7-22.5 us up to 128 KB, puts 3-5% faster at
// 512 KB, 47.7 against 36.8 us at 2 MB; the crossover was not measured
// more finely).
constexpr int64_t kInterLinesMaxBytes = 512 << 10;

struct Header {
  uint32_t seq;          // sequence number of the last call started
  uint32_t blocks_done;  // blocks of the running call that have read seq
  uint32_t reserved[30];
  uint64_t signals[2][kMaxSteps][kMaxBlocks];  // inter-node arrivals
  uint32_t flags_a[2][kMaxLocal][kMaxBlocks];  // flag lines into region A
  uint32_t flags_b[2][kMaxLocal][kMaxBlocks];  // flag lines into region B
};
static_assert(sizeof(Header) <= kHeaderBytes, "header does not fit");

// Everything a launch needs, passed by value (captured into CUDA graphs).
struct Params {
  const char* in;
  char* out;
  int64_t nbytes;
  int64_t packets;        // ceil(nbytes / kPayload)
  int64_t chunk;          // packets per local rank (two-shot, hierarchical)
  int64_t ll_packets;     // packets per parity of one LL region
  int64_t inter_bytes;    // bytes per (parity, step) of an inter-node region
  int64_t raw_offset;     // where its raw packets (puts) start, after LL lines
  int regions;            // inter-node steps per parity: fold, doublings, unfold
  char* peer_recv[kMaxSteps];  // the partner's receive region at each step
                               // where it is load/store reachable, else null
  bool puts;              // some step of this PE goes through NVSHMEM puts
  uint4* ll_a[kMaxLocal]; // region A of every local peer (parity 0)
  uint4* ll_b[kMaxLocal]; // region B of every local peer (parity 0)
  uint4* lp[kMaxLocal];   // Lamport region of every local peer (parity 0)
  int64_t lp_vecs;        // 16-byte vectors per parity of a Lamport region
  char* recv;             // this PE's inter-node receive region (symmetric)
  char* stage;            // this PE's inter-node stage region (symmetric)
  Header* header;         // this PE's slot header (symmetric)
  Header* peer_header[kMaxLocal];  // every local peer's header
  int algo;
  int node_size;
  int local_rank;
  int role;               // fold role of this PE's node
  int fold_pe;
  int steps;              // recursive-doubling steps
  int step_pe[kMaxSteps];
  int pe;
  int fault;              // testing only: a Fault value; results must
                          // go wrong
  int64_t timeout_ns;
};

// ----------------------------------------------------------- device helpers

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __noinline__ void report_timeout(const Params& p, Phase phase,
                                            uint32_t seq, int64_t index) {
  const char* names[] = {"one-shot", "reduce-scatter", "all-gather",
                         "inter-node"};
  printf("jax_nvrar: PE %d block %d timed out after %lld ns in phase %s "
         "waiting for sequence number %u (index %lld): a peer PE is missing, "
         "stalled or running a different program\n",
         p.pe, blockIdx.x, (long long)p.timeout_ns, names[phase], seq,
         (long long)index);
  __trap();
}

__device__ __forceinline__ void store_line(uint4* dst, uint2 data,
                                           uint32_t flag) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst),
               "r"(data.x), "r"(flag), "r"(data.y), "r"(flag)
               : "memory");
}

__device__ __forceinline__ uint4 load_line(const uint4* src) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(src)
               : "memory");
  return v;
}

// Polls load() until done(value), starting from the value v already loaded,
// and returns the value; reports and traps once the wait lasts longer than
// the timeout (the clock is read every 256 polls: a read costs more than a
// poll).
template <typename V, typename Load, typename Done>
__device__ __forceinline__ V spin(V v, Load load, Done done, const Params& p,
                                  Phase phase, uint32_t seq, int64_t index) {
  if (done(v)) return v;
  const uint64_t start = now_ns();
  for (uint32_t polls = 1; !done(v); ++polls) {
    v = load();
    if (polls % 256 == 0 && now_ns() - start > (uint64_t)p.timeout_ns)
      report_timeout(p, phase, seq, index);
  }
  return v;
}

// Fault switch: 1 skips every wait for data, 2 only for inter-node data.
__device__ __forceinline__ bool skips_wait(const Params& p, Phase phase) {
  return phase == kInterNode ? p.fault != kNoFault
                             : (p.fault & kSkipLocalWaits) != 0;
}

// Waits until the LL line at src carries seq, starting from `first`, the
// value already loaded from it, and returns its data. Callers load several
// lines before waiting on any, so that their loads are in flight together.
__device__ __forceinline__ uint2 wait_line(const uint4* src, uint4 first,
                                           uint32_t seq, const Params& p,
                                           Phase phase, int64_t index) {
  if (skips_wait(p, phase)) return make_uint2(first.x, first.z);
  const uint4 v = spin(first, [&] { return load_line(src); },
                       [&](uint4 v) { return v.y == seq && v.w == seq; }, p,
                       phase, seq, index);
  return make_uint2(v.x, v.z);
}

// System-scope acquire load of a flag or signal word written by a peer.
__device__ __forceinline__ uint32_t load_acquire(const uint32_t* word) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(word) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t load_acquire(const uint64_t* word) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(word) : "memory");
  return v;
}

// Waits (acquire) until a peer set `word` to this call's sequence number.
template <typename W>
__device__ __forceinline__ void wait_seq(const W* word, uint32_t seq,
                                         const Params& p, Phase phase,
                                         int64_t index) {
  if (skips_wait(p, phase)) return;
  auto load = [&] { return load_acquire(word); };
  spin(load(), load, [&](W v) { return v == seq; }, p, phase, seq, index);
}

// Counts this block in; returns how many blocks came before. Release: the
// block's reads of the sequence number (ordered before by the barrier) come
// before it. The caller acquires (fence) before acting on the count, so the
// round trip overlaps the block's work.
__device__ __forceinline__ uint32_t arrive(uint32_t* counter) {
  uint32_t old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;"
               : "=r"(old)
               : "l"(counter)
               : "memory");
  return old;
}

__device__ __forceinline__ void post_flag(uint32_t* flag, uint32_t seq) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(flag), "r"(seq)
               : "memory");
}

// After every thread of the block wrote its part of a slice: thread j raises
// this block's flag at local peer j. The barrier orders the block's data
// stores before each flag's system-scope release (release is cumulative), so
// a peer that acquires the flag sees the slice; no separate fence needed.
__device__ __forceinline__ void publish(const Params& p, uint32_t* (*flag)(
                                           Header*, int, int, int),
                                       int parity, uint32_t seq) {
  __syncthreads();
  if (threadIdx.x < p.node_size)
    post_flag(flag(p.peer_header[threadIdx.x], parity, p.local_rank,
                   blockIdx.x),
              seq);
}

// Waits until every local rank raised this block's flag.
__device__ __forceinline__ void await(const Params& p, uint32_t* (*flag)(
                                          Header*, int, int, int),
                                      int parity, uint32_t seq, Phase phase) {
  if (threadIdx.x < p.node_size)
    wait_seq(flag(p.header, parity, threadIdx.x, blockIdx.x), seq, p, phase,
             threadIdx.x);
  __syncthreads();
}

__device__ uint32_t* flag_a(Header* h, int parity, int source, int block) {
  return &h->flags_a[parity][source][block];
}
__device__ uint32_t* flag_b(Header* h, int parity, int source, int block) {
  return &h->flags_b[parity][source][block];
}

// 8 payload bytes as float32 values, and back.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int n = 2;
  __device__ static void unpack(uint2 v, float (&f)[n]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
  }
  __device__ static uint2 pack(const float (&f)[n]) {
    return make_uint2(__float_as_uint(f[0]), __float_as_uint(f[1]));
  }
};

template <typename H, typename H2, float2 (*ToFloat2)(H2),
          H2 (*FromFloat2)(float2)>
struct HalfLanes {
  static constexpr int n = 4;
  __device__ static void unpack(uint2 v, float (&f)[n]) {
    float2 lo = ToFloat2(*reinterpret_cast<H2*>(&v.x));
    float2 hi = ToFloat2(*reinterpret_cast<H2*>(&v.y));
    f[0] = lo.x, f[1] = lo.y, f[2] = hi.x, f[3] = hi.y;
  }
  __device__ static uint2 pack(const float (&f)[n]) {
    H2 lo = FromFloat2(make_float2(f[0], f[1]));
    H2 hi = FromFloat2(make_float2(f[2], f[3]));
    return make_uint2(*reinterpret_cast<uint32_t*>(&lo),
                      *reinterpret_cast<uint32_t*>(&hi));
  }
};

__device__ float2 bf162_to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __nv_bfloat162 float2_to_bf162(float2 v) { return __float22bfloat162_rn(v); }
__device__ float2 half2_to_float2(__half2 v) { return __half22float2(v); }
__device__ __half2 float2_to_half2(float2 v) { return __float22half2_rn(v); }

template <>
struct Lanes<__nv_bfloat16>
    : HalfLanes<__nv_bfloat16, __nv_bfloat162, bf162_to_float2,
                float2_to_bf162> {};
template <>
struct Lanes<__half>
    : HalfLanes<__half, __half2, half2_to_float2, float2_to_half2> {};

// Rounds a + b in float32 (commutative: both partners get the same bits).
template <typename T>
__device__ __forceinline__ uint2 add_packets(uint2 a, uint2 b) {
  float fa[Lanes<T>::n], fb[Lanes<T>::n];
  Lanes<T>::unpack(a, fa);
  Lanes<T>::unpack(b, fb);
#pragma unroll
  for (int k = 0; k < Lanes<T>::n; ++k) fa[k] += fb[k];
  return Lanes<T>::pack(fa);
}

// The message as 8-byte packets; the last one is zero-padded.
__device__ __forceinline__ uint2 load_packet(const Params& p, int64_t i) {
  const int64_t off = i * kPayload;
  if (off + kPayload <= p.nbytes)
    return *reinterpret_cast<const uint2*>(p.in + off);
  uint2 v = make_uint2(0, 0);
  char* bytes = reinterpret_cast<char*>(&v);
  for (int64_t k = 0; off + k < p.nbytes; ++k) bytes[k] = p.in[off + k];
  return v;
}

__device__ __forceinline__ void store_packet(const Params& p, int64_t i,
                                             uint2 v) {
  const int64_t off = i * kPayload;
  if (off + kPayload <= p.nbytes) {
    *reinterpret_cast<uint2*>(p.out + off) = v;
    return;
  }
  const char* bytes = reinterpret_cast<const char*>(&v);
  for (int64_t k = 0; off + k < p.nbytes; ++k) p.out[off + k] = bytes[k];
}

// The message as 16-byte vectors for the flag protocol; the last is padded.
__device__ __forceinline__ uint4 load_vec(const Params& p, int64_t i) {
  const int64_t off = i * kVec;
  if (off + kVec <= p.nbytes) return *reinterpret_cast<const uint4*>(p.in + off);
  uint4 v = make_uint4(0, 0, 0, 0);
  char* bytes = reinterpret_cast<char*>(&v);
  for (int64_t k = 0; off + k < p.nbytes; ++k) bytes[k] = p.in[off + k];
  return v;
}

__device__ __forceinline__ void store_vec(const Params& p, int64_t i, uint4 v) {
  const int64_t off = i * kVec;
  if (off + kVec <= p.nbytes) {
    *reinterpret_cast<uint4*>(p.out + off) = v;
    return;
  }
  const char* bytes = reinterpret_cast<const char*>(&v);
  for (int64_t k = 0; off + k < p.nbytes; ++k) p.out[off + k] = bytes[k];
}

// float32 accumulators for the 16 bytes of one vector.
template <typename T>
struct VecSum {
  static constexpr int n = Lanes<T>::n;
  float lo[n], hi[n];
  __device__ void set(uint4 v) {
    Lanes<T>::unpack(make_uint2(v.x, v.y), lo);
    Lanes<T>::unpack(make_uint2(v.z, v.w), hi);
  }
  __device__ void add(uint4 v) {
    float f[n];
    Lanes<T>::unpack(make_uint2(v.x, v.y), f);
#pragma unroll
    for (int k = 0; k < n; ++k) lo[k] += f[k];
    Lanes<T>::unpack(make_uint2(v.z, v.w), f);
#pragma unroll
    for (int k = 0; k < n; ++k) hi[k] += f[k];
  }
  __device__ uint4 get() const {
    const uint2 a = Lanes<T>::pack(lo), b = Lanes<T>::pack(hi);
    return make_uint4(a.x, a.y, b.x, b.y);
  }
};

// Sum of the G vectors at stride `stride` (in vectors) in `src`, in
// local-rank order, read through L2 (peers wrote them over NVLink).
template <typename T>
__device__ __forceinline__ uint4 reduce_vecs(const uint4* src, int64_t stride,
                                             int G) {
  VecSum<T> acc;
  acc.set(__ldcg(src));
  for (int s = 1; s < G; ++s) acc.add(__ldcg(src + s * stride));
  return acc.get();
}

// Sum of the G lines at stride `stride` in `src`, in local-rank order.
template <typename T>
__device__ __forceinline__ uint2 reduce_lines(const uint4* src, int64_t stride,
                                              uint32_t seq, const Params& p,
                                              Phase phase, int64_t index) {
  uint4 first[kMaxLocal];
#pragma unroll
  for (int s = 0; s < kMaxLocal; ++s)
    if (s < p.node_size) first[s] = load_line(src + s * stride);
  float acc[Lanes<T>::n], f[Lanes<T>::n];
  Lanes<T>::unpack(wait_line(src, first[0], seq, p, phase, index), acc);
#pragma unroll
  for (int s = 1; s < kMaxLocal; ++s) {
    if (s >= p.node_size) break;
    Lanes<T>::unpack(
        wait_line(src + s * stride, first[s], seq, p, phase, index), f);
#pragma unroll
    for (int k = 0; k < Lanes<T>::n; ++k) acc[k] += f[k];
  }
  return Lanes<T>::pack(acc);
}

// ------------------------------------------------------------------- tracing
//
// Built with -DJAX_NVRAR_TRACE (JAX_NVRAR_NVCC_FLAGS), block 0's thread 0
// records the global timer (ns) at marks of every launch: kernel entry, its
// sends issued, its last wait over, exit (the middle two in the Lamport
// variants only; 0 elsewhere). The exit writes them, after the call's
// sequence number, into row seq % kTraceCalls of a device ring that
// trace_rows() copies out: where a call's time goes, per GPU
// (benchmarks/kernel_trace.py). Off by default, and then compiled out.

enum TraceMark : int { kEntry = 0, kSent = 1, kWaited = 2, kExit = 3 };
#ifdef JAX_NVRAR_TRACE
constexpr int kTraceMarks = 4;
constexpr int kTraceCalls = 1 << 14;
__device__ uint64_t g_trace[kTraceCalls][1 + kTraceMarks];
__shared__ uint64_t s_trace[kTraceMarks];
__device__ __forceinline__ void trace(TraceMark mark) {
  if (blockIdx.x == 0 && threadIdx.x == 0) s_trace[mark] = now_ns();
}
// Clears the marks a variant may not set, and marks the entry.
__device__ __forceinline__ void trace_begin() {
  if (blockIdx.x == 0 && threadIdx.x < kTraceMarks) s_trace[threadIdx.x] = 0;
  trace(kEntry);
}
__device__ __forceinline__ void trace_store(uint32_t seq) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  trace(kExit);
  uint64_t* row = g_trace[seq % kTraceCalls];
  row[0] = seq;
  for (int k = 0; k < kTraceMarks; ++k) row[1 + k] = s_trace[k];
}
#else
__device__ __forceinline__ void trace(TraceMark) {}
__device__ __forceinline__ void trace_begin() {}
__device__ __forceinline__ void trace_store(uint32_t) {}
#endif

// -------------------------------------------------------------------- kernel

// Purpose: one-shot all-reduce with flag lines.
// Requirement: G * vectors fits one parity of region A.
// Use-case: one node, messages past the LL sweet spot up to ~1 MB.
template <typename T>
__device__ void oneshot_flag(const Params& p, uint32_t seq, int parity) {
  const int G = p.node_size, me = p.local_rank;
  const int64_t V = (p.nbytes + kVec - 1) / kVec;
  const int64_t per_block = (V + gridDim.x - 1) / gridDim.x;
  const int64_t lo = imin(V, int64_t(blockIdx.x) * per_block);
  const int64_t hi = imin(V, lo + per_block);
  const int64_t base = parity * p.ll_packets;  // same bytes as LL lines
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const uint4 v = load_vec(p, i);
    for (int j = 0; j < G; ++j) (p.ll_a[j] + base)[me * V + i] = v;
  }
  publish(p, flag_a, parity, seq);
  await(p, flag_a, parity, seq, kOneShotPhase);
  const uint4* mine = p.ll_a[me] + base;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
    store_vec(p, i, reduce_vecs<T>(mine + i, V, G));
}

// Purpose: two-shot all-reduce with flag lines: reduce-scatter, all-gather.
// Requirement: G * ceil(vectors / G) fits one parity of regions A and B.
// Use-case: one node, large messages.
template <typename T>
__device__ void twoshot_flag(const Params& p, uint32_t seq, int parity) {
  const int G = p.node_size, me = p.local_rank;
  const int64_t V = (p.nbytes + kVec - 1) / kVec;
  const int64_t C = (V + G - 1) / G;
  const int64_t per_block = (C + gridDim.x - 1) / gridDim.x;
  const int64_t lo = imin(C, int64_t(blockIdx.x) * per_block);
  const int64_t hi = imin(C, lo + per_block);
  const int64_t base = parity * p.ll_packets;
  auto valid = [&](int j) { return imin(hi, imax(0, V - j * C)); };
  for (int j = 0; j < G; ++j) {
    uint4* dst = p.ll_a[j] + base + me * C;
    for (int64_t i = lo + threadIdx.x; i < valid(j); i += blockDim.x)
      dst[i] = load_vec(p, j * C + i);
  }
  publish(p, flag_a, parity, seq);
  await(p, flag_a, parity, seq, kReduceScatter);
  const uint4* mine = p.ll_a[me] + base;
  for (int64_t i = lo + threadIdx.x; i < valid(me); i += blockDim.x) {
    const uint4 r = reduce_vecs<T>(mine + i, C, G);
    for (int j = 0; j < G; ++j) (p.ll_b[j] + base + me * C)[i] = r;
  }
  publish(p, flag_b, parity, seq);
  await(p, flag_b, parity, seq, kAllGather);
  const uint4* gathered = p.ll_b[me] + base;
  for (int s = 0; s < G; ++s)
    for (int64_t i = lo + threadIdx.x; i < valid(s); i += blockDim.x)
      store_vec(p, s * C + i, __ldcg(gathered + s * C + i));
}

// ------------------------------------------------------------ Lamport lines
//
// A Lamport region holds plain data, and "empty" is a value: the 32-bit word
// kEmpty (-0.0f). Regions start empty; a writer stores its 16-byte vectors
// and nothing else; the reader polls its own region until no word of the
// vector is kEmpty, and empties it again right after reading. No flag and no
// sequence number travel: the payload is 100% of the bytes moved, with the
// one-way latency of LL lines. A payload word equal to kEmpty is sent as 0
// (scrub): for float32 that is -0.0 sent as +0.0; for 16-bit types only the
// pair (+0, -0) is affected, sent as (+0, +0). Two-shot (on one node or
// several) scrubs its reduced chunks too, so a result word (+0, -0) comes out
// (+0, +0). The sign of a zero sum can therefore differ from lax.psum's; its
// value cannot. Every PE reduces the same scrubbed words, so results stay
// bitwise identical across PEs.
//
// Reuse: call k reads and empties the parity k & 1 of its region; a peer
// writes that parity again in call k + 2, which it starts only after this PE
// finished call k + 1 (see Buffering) and so after the emptying stores of
// call k were performed (kernel boundary).

constexpr uint32_t kEmpty = 0x80000000u;

__device__ __forceinline__ uint32_t scrub(uint32_t w) {
  return w == kEmpty ? 0u : w;
}
__device__ __forceinline__ uint4 scrub(uint4 v) {
  return make_uint4(scrub(v.x), scrub(v.y), scrub(v.z), scrub(v.w));
}
__device__ __forceinline__ bool filled(uint4 v) {
  return v.x != kEmpty && v.y != kEmpty && v.z != kEmpty && v.w != kEmpty;
}

__device__ __forceinline__ void store_vec_remote(uint4* dst, uint4 v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Waits until the vector at src is filled, starting from `early`, the value
// already loaded from it; empties it and returns it. With the fault switch
// the early value is taken (it must then be wrong); the real wait and
// emptying still happen so later calls stay clean. Callers load several
// vectors before taking any, so that their loads are in flight together.
__device__ __forceinline__ uint4 take_vec(uint4* src, uint4 early,
                                          const Params& p, Phase phase,
                                          uint32_t seq, int64_t index) {
  const uint4 v = spin(early, [&] { return load_line(src); }, filled, p,
                       phase, seq, index);
  *src = make_uint4(kEmpty, kEmpty, kEmpty, kEmpty);
  return (p.fault & kSkipLocalWaits) ? early : v;
}

// Sum in local-rank order of `own` (source me) and the G - 1 vectors that
// the peers store at slots[s * stride], each taken (waited for, emptied).
template <typename T>
__device__ __forceinline__ uint4 take_sum(uint4* slots, int64_t stride,
                                          uint4 own, const Params& p,
                                          Phase phase, uint32_t seq,
                                          int64_t index) {
  const int G = p.node_size, me = p.local_rank;
  uint4 early[kMaxLocal];
#pragma unroll
  for (int s = 0; s < kMaxLocal; ++s)
    if (s < G && s != me) early[s] = load_line(slots + s * stride);
  VecSum<T> acc;
#pragma unroll
  for (int s = 0; s < kMaxLocal; ++s) {
    if (s >= G) break;
    const uint4 v = s == me ? own
                            : take_vec(slots + s * stride, early[s], p, phase,
                                       seq, index);
    if (s == 0) acc.set(v); else acc.add(v);
  }
  return acc.get();
}

constexpr int kTakeBatch = 4;  // all-gather vectors a thread loads at once

// For i = start, start + stride, ... below end where valid(i): loads the
// 16-byte word src[i] of kTakeBatch such i, then calls use(i, loaded) for
// each, so that a thread's loads are in flight together before it waits on
// any (use waits, from the loaded value).
template <typename Valid, typename Use>
__device__ __forceinline__ void batched(const uint4* src, int64_t start,
                                        int64_t end, int64_t stride,
                                        Valid valid, Use use) {
  for (int64_t i0 = start; i0 < end; i0 += kTakeBatch * stride) {
    uint4 first[kTakeBatch];
#pragma unroll
    for (int u = 0; u < kTakeBatch; ++u)
      if (i0 + u * stride < end && valid(i0 + u * stride))
        first[u] = load_line(src + i0 + u * stride);
#pragma unroll
    for (int u = 0; u < kTakeBatch; ++u) {
      const int64_t i = i0 + u * stride;
      if (i < end && valid(i)) use(i, first[u]);
    }
  }
}

// Purpose: one-shot all-reduce on Lamport lines: each PE stores its whole
// (scrubbed) input into every peer's region, slot `me`; each PE sums the G
// inputs in local-rank order, its own read again from its input.
// Requirement: G * vectors fits one parity of the Lamport region.
// Use-case: one node, small and mid-size messages.
template <typename T>
__device__ void oneshot_lamport(const Params& p, uint32_t seq, int parity) {
  const int G = p.node_size, me = p.local_rank;
  const int64_t V = (p.nbytes + kVec - 1) / kVec;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t base = parity * p.lp_vecs;
  for (int64_t i = tid; i < V; i += nthreads) {
    const uint4 v = scrub(load_vec(p, i));
    for (int k = 1; k < G; ++k) {
      const int j = (me + k) % G;  // spread the stores over the links
      store_vec_remote(p.lp[j] + base + me * V + i, v);
    }
  }
  trace(kSent);
  uint4* mine = p.lp[me] + base;
  for (int64_t i = tid; i < V; i += nthreads)
    store_vec(p, i, take_sum<T>(mine + i, V, scrub(load_vec(p, i)), p,
                                kOneShotPhase, seq, i));
  trace(kWaited);
}

// Inter-node phase for this block's slice [lo, hi) of the chunk, whose
// node-reduced packets are in stage region 0. Returns where the group-reduced
// slice ends up (indexed by packet like the chunk).
//
// Two transports, chosen per step by the partner (the choice is symmetric:
// NVLink peers reach each other both ways):
// - partner load/store reachable (p.peer_recv[step] set; e.g. virtual nodes
//   on one host, or nodes of one NVLink domain): LL lines stored straight
//   into the partner's receive region. Each thread sends, awaits and sums the
//   same packets, so such a step needs no block barrier, fence or signal.
// - otherwise: the block puts its slice with a signal (any NVSHMEM
//   transport), after a block barrier; the receiver awaits the signal.
template <typename T>
__device__ const uint2* inter_node(const Params& p, uint32_t seq, int parity,
                                   int64_t lo, int64_t hi) {
  const int unfold = p.regions - 1;
  auto offset = [&](int step) {
    return (int64_t(parity) * p.regions + step) * p.inter_bytes;
  };
  auto region = [&](char* base, int step) {
    return reinterpret_cast<uint2*>(base + offset(step));
  };
  auto raw = [&](int step) {  // where puts land
    return reinterpret_cast<uint2*>(p.recv + offset(step) + p.raw_offset);
  };
  auto signal = [&](int step) {
    return &p.header->signals[parity][step][blockIdx.x];
  };
  auto send = [&](int step, const uint2* src, int pe) {
    if (p.peer_recv[step] != nullptr) {
      uint4* dst = reinterpret_cast<uint4*>(p.peer_recv[step] + offset(step));
      for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
        store_line(dst + i, src[i], seq);
      return;
    }
    __syncthreads();  // the block's slice of src is complete
    if (hi > lo) {
      nvshmemx_putmem_signal_nbi_block(raw(step) + lo, src + lo,
                                       size_t(hi - lo) * kPayload,
                                       signal(step), seq, NVSHMEM_SIGNAL_SET,
                                       pe);
    } else if (threadIdx.x == 0) {  // an empty slice still reports arrival
      nvshmemx_signal_op(signal(step), seq, NVSHMEM_SIGNAL_SET, pe);
    }
  };
  // sum[i] = mine[i] + (what arrived at `step`)[i]; without mine, a copy.
  auto receive = [&](int step, const uint2* mine, uint2* sum) {
    auto take = [&](int64_t i, uint2 got) {
      sum[i] = mine ? add_packets<T>(mine[i], got) : got;
    };
    if (p.peer_recv[step] == nullptr) {
      if (threadIdx.x == 0) wait_seq(signal(step), seq, p, kInterNode, step);
      __syncthreads();
      const uint2* got = raw(step);
      for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
        take(i, __ldcg(got + i));
      return;
    }
    const uint4* got = reinterpret_cast<const uint4*>(p.recv + offset(step));
    batched(got, lo + threadIdx.x, hi, blockDim.x, [](int64_t) { return true; },
            [&](int64_t i, uint4 first) {
              take(i, wait_line(got + i, first, seq, p, kInterNode, i));
            });
  };

  if (p.role == kFoldSender) {
    send(kFoldStep, region(p.stage, 0), p.fold_pe);
    receive(unfold, nullptr, region(p.stage, 1));
    return region(p.stage, 1);
  }
  int version = 0;  // stage region holding the running sum
  if (p.role == kFoldReceiver) {
    receive(kFoldStep, region(p.stage, 0), region(p.stage, 1));
    version = 1;
  }
  for (int s = 0; s < p.steps; ++s) {
    send(1 + s, region(p.stage, version), p.step_pe[s]);
    receive(1 + s, region(p.stage, version), region(p.stage, version + 1));
    ++version;
  }
  if (p.role == kFoldReceiver)
    send(unfold, region(p.stage, version), p.fold_pe);
  return region(p.stage, version);
}

// Purpose: two-shot all-reduce on Lamport lines: reduce-scatter (chunk j of
// every PE goes to local rank j, slot = source), all-gather of the reduced
// chunks (second half of the region, indexed like the message). With kNodes
// (N > 1, the hierarchical path) the inter-node phase runs between the two,
// on each block's slice of the chunk.
// Requirement: 2 * G * ceil(vectors / G) fits one parity of the region; with
// kNodes, 2 * ceil(vectors / G) packets fit an inter-node step.
// Use-case: one node, messages where one-shot moves too many bytes; several
// nodes, messages where LL lines' 50% payload costs.
template <typename T, bool kNodes>
__device__ void twoshot_lamport(const Params& p, uint32_t seq, int parity) {
  const int G = p.node_size, me = p.local_rank;
  const int64_t V = (p.nbytes + kVec - 1) / kVec;
  const int64_t C = (V + G - 1) / G;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t base = parity * p.lp_vecs, gather = base + G * C;
  for (int64_t i = tid; i < V; i += nthreads) {
    const int64_t j = i / C;
    if (j != me)
      store_vec_remote(p.lp[j] + base + me * C + (i - j * C),
                       scrub(load_vec(p, i)));
  }
  trace(kSent);
  uint4* mine = p.lp[me];
  if constexpr (kNodes) {
    // This PE's chunk, one contiguous slice of vectors per block (blocks of
    // equal index on other nodes hold the same slice: the put path pairs
    // them).
    const int64_t own = imax(0, imin(C, V - me * C));
    const int64_t per_block = (own + gridDim.x - 1) / gridDim.x;
    const int64_t lo = imin(own, int64_t(blockIdx.x) * per_block);
    const int64_t hi = imin(own, lo + per_block);
    uint4* stage0 = reinterpret_cast<uint4*>(
        p.stage + int64_t(parity) * p.regions * p.inter_bytes);
    for (int64_t t = lo + threadIdx.x; t < hi; t += blockDim.x)
      stage0[t] = take_sum<T>(mine + base + t, C,
                              scrub(load_vec(p, me * C + t)), p,
                              kReduceScatter, seq, t);
    __syncthreads();  // inter_node's threads take packets, not vectors
    const uint4* reduced = reinterpret_cast<const uint4*>(
        inter_node<T>(p, seq, parity, 2 * lo, 2 * hi));
    __syncthreads();
    for (int64_t t = lo + threadIdx.x; t < hi; t += blockDim.x) {
      const uint4 r = scrub(__ldcg(reduced + t));
      for (int k = 1; k < G; ++k)
        store_vec_remote(p.lp[(me + k) % G] + gather + me * C + t, r);
      store_vec(p, me * C + t, r);
    }
  } else {
    const int64_t own = imin(C, V - me * C);
    for (int64_t t = tid; t < own; t += nthreads) {
      const uint4 r = scrub(take_sum<T>(mine + base + t, C,
                                        scrub(load_vec(p, me * C + t)), p,
                                        kReduceScatter, seq, t));
      for (int k = 1; k < G; ++k)
        store_vec_remote(p.lp[(me + k) % G] + gather + me * C + t, r);
      store_vec(p, me * C + t, r);
    }
  }
  batched(mine + gather, tid, V, nthreads,
          [&](int64_t i) { return i / C != me; },
          [&](int64_t i, uint4 early) {
            store_vec(p, i, take_vec(mine + gather + i, early, p, kAllGather,
                                     seq, i));
          });
  trace(kWaited);
}

// One kernel per variant A (an Algo value), so that each gets the registers
// its own path needs: one kernel for all of them spilled (128 registers, the
// cap of 512-thread blocks).
template <typename T, int A>
__global__ void __launch_bounds__(kThreads) allreduce_kernel(const Params p) {
  if (p.fault == kEmptyKernel) return;
  trace_begin();
  const uint32_t seq =
      *reinterpret_cast<volatile uint32_t*>(&p.header->seq) + 1;
  // Once every block has read the number, the last to arrive advances it
  // (at the end of the kernel, so the atomic's round trip overlaps the
  // work); the next launch on this stream starts after this one ends.
  __syncthreads();
  uint32_t ticket = 0;
  if (threadIdx.x == 0) ticket = arrive(&p.header->blocks_done);
  const int parity = seq & 1;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int G = p.node_size, me = p.local_rank;
  const int64_t P = p.packets, base = parity * p.ll_packets;
  const uint4* my_a = p.ll_a[me] + base;
  const uint4* my_b = p.ll_b[me] + base;

  if constexpr (A == kHierLamport) {
    twoshot_lamport<T, true>(p, seq, parity);
  } else if constexpr (A == kOneShotLamport) {
    oneshot_lamport<T>(p, seq, parity);
  } else if constexpr (A == kTwoShotLamport) {
    twoshot_lamport<T, false>(p, seq, parity);
  } else if constexpr (A == kOneShotFlag) {
    oneshot_flag<T>(p, seq, parity);
  } else if constexpr (A == kTwoShotFlag) {
    twoshot_flag<T>(p, seq, parity);
  } else if constexpr (A == kOneShotLL) {
    for (int64_t i = tid; i < P; i += nthreads) {
      const uint2 v = load_packet(p, i);
      for (int j = 0; j < G; ++j) store_line(p.ll_a[j] + base + me * P + i, v, seq);
    }
    for (int64_t i = tid; i < P; i += nthreads)
      store_packet(p, i, reduce_lines<T>(my_a + i, P, seq, p, kOneShotPhase, i));
  } else {  // kTwoShotLL, on one node or as the hierarchical path
    static_assert(A == kTwoShotLL, "no kernel for this variant");
    const int64_t C = p.chunk;
    for (int64_t i = tid; i < P; i += nthreads) {
      const int64_t j = i / C;
      store_line(p.ll_a[j] + base + me * C + (i - j * C), load_packet(p, i), seq);
    }
    // This PE's chunk, cut into one contiguous slice per block.
    const int64_t mine = imax(0, imin(C, P - me * C));
    const int64_t per_block = (mine + gridDim.x - 1) / gridDim.x;
    const int64_t lo = imin(mine, int64_t(blockIdx.x) * per_block);
    const int64_t hi = imin(mine, lo + per_block);
    const uint2* reduced = nullptr;
    if (p.steps > 0 || p.role != kPlain) {
      uint2* stage0 = reinterpret_cast<uint2*>(
          p.stage + int64_t(parity) * p.regions * p.inter_bytes);
      for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
        stage0[i] = reduce_lines<T>(my_a + i, C, seq, p, kReduceScatter, i);
      reduced = inter_node<T>(p, seq, parity, lo, hi);
    }
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      const uint2 v = reduced ? __ldcg(reduced + i)
                              : reduce_lines<T>(my_a + i, C, seq, p,
                                                kReduceScatter, i);
      for (int j = 0; j < G; ++j) store_line(p.ll_b[j] + base + me * C + i, v, seq);
    }
    batched(my_b, tid, P, nthreads, [](int64_t) { return true; },
            [&](int64_t i, uint4 first) {
              store_packet(p, i, wait_line(my_b + i, first, seq, p, kAllGather, i));
            });
  }

  if (threadIdx.x == 0 && p.puts) nvshmem_quiet();
  trace_store(seq);
  if (threadIdx.x == 0 && ticket == gridDim.x - 1) {
    __threadfence();  // acquire: every block has read the old number
    p.header->blocks_done = 0;
    *reinterpret_cast<volatile uint32_t*>(&p.header->seq) = seq;
  }
}

// ------------------------------------------------------------- host launcher

// Recursive-doubling steps between the largest power of two of N nodes
// (the core; the other nodes fold into it).
int doubling_steps(int num_nodes) {
  int steps = 0;
  while ((2 << steps) <= num_nodes) ++steps;
  return steps;
}

// Inter-node regions per parity of a group of N nodes: fold, doublings,
// unfold. Every PE of a group has the same N, so the same region offsets.
int inter_regions(int num_nodes) { return doubling_steps(num_nodes) + 2; }

// A receive region of one (parity, step) holds LL lines first, then raw
// packets (puts) from raw_offset on: apart, so that neither transport can
// take the other's leftovers for its own data.
int64_t raw_offset(int64_t step_bytes) { return step_bytes / 3 * 2 / 16 * 16; }

// Packets of a chunk that one step's region holds both ways.
int64_t inter_capacity(int64_t step_bytes) {
  const int64_t off = raw_offset(step_bytes);
  return std::min<int64_t>(off / int64_t(sizeof(uint4)),
                           (step_bytes - off) / kPayload);
}

// Whether a message of `chunk` packets per local rank fits a slot: one parity
// of an LL region (every variant can fall back to LL lines) holds node_size
// chunks, an inter-node step one chunk.
bool fits_slot(int64_t chunk, int node_size, int num_nodes, int64_t ll_lines,
               int64_t inter_step_bytes) {
  return node_size * chunk <= ll_lines &&
         (num_nodes == 1 || chunk <= inter_capacity(inter_step_bytes));
}

// The variant a call runs: the one asked for, or for kAuto the default
// table. Then a variant whose region is too small for the message hands it
// to the next one that fits (the same sum; every PE makes the same choice).
// Measured on 4xH100 (benchmarks/results): Lamport one-shot is fastest to
// 512 KB, Lamport two-shot above. On one node jax_nvrar.psum always names a
// variant (from its tuning table, jax_nvrar/_tuning.py), so that rule serves
// other callers of the handler. Several nodes take the hierarchical path:
// with Lamport lines on each node, or LL lines where an LL variant is asked
// for or the Lamport region or an inter-node step is too small.
int pick_variant(const Params& p, int G, int N, int requested) {
  const int64_t vecs = (p.nbytes + kVec - 1) / kVec;
  const int64_t chunk_vecs = (vecs + G - 1) / G;
  if (N > 1) {  // LL variants asked for: LL lines on each node too
    const bool ll = requested == kOneShotLL || requested == kTwoShotLL;
    const bool fits = 2 * G * chunk_vecs <= p.lp_vecs &&
                      2 * chunk_vecs <= inter_capacity(p.inter_bytes);
    return !ll && fits ? kHierLamport : kTwoShotLL;
  }
  int algo = requested;
  if (algo == kAuto)
    algo = p.nbytes <= (512 << 10) ? kOneShotLamport : kTwoShotLamport;
  if (algo == kOneShotLamport && G * vecs > p.lp_vecs) algo = kTwoShotLamport;
  if (algo == kTwoShotLamport && 2 * G * chunk_vecs > p.lp_vecs) algo = kTwoShotLL;
  if (algo == kOneShotLL && G * p.packets > p.ll_packets) algo = kTwoShotLL;
  if (algo == kOneShotFlag && G * vecs > p.ll_packets) algo = kTwoShotFlag;
  return algo;
}

// Grid of a launch: enough threads for a few units of work each.
struct Grid {
  int blocks;
  int threads;
};

// The default grid of a variant for a message of nbytes (the "blocks"
// attribute, when not 0, replaces the block count).
Grid launch_grid(int algo, int64_t nbytes, int num_nodes) {
  if (algo == kOneShotLamport || algo == kTwoShotLamport ||
      algo == kHierLamport) {
    // One 16-byte vector per thread, in small blocks up to 256 KB: the
    // stores then leave from many SMs at once.
    const int64_t vecs = (nbytes + kVec - 1) / kVec;
    const int threads = vecs <= 128 * kMaxBlocks ? 128 : kThreads;
    const int64_t blocks = (vecs + threads - 1) / threads;
    return {int(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks))), threads};
  }
  int64_t units, per_thread, cap;
  if (algo == kOneShotLL || algo == kTwoShotLL) {
    // The hierarchical path waits on three hops in turn: one packet per
    // thread (2x2 on 4xH100, 128 KB: 32 blocks 11.7 us, 8 blocks 14.1 us).
    units = (nbytes + kPayload - 1) / kPayload;
    per_thread = num_nodes > 1 ? 1 : algo == kOneShotLL ? 2 : 4;
    cap = algo == kOneShotLL ? 32 : 64;
  } else {
    units = (nbytes + kVec - 1) / kVec, per_thread = 4, cap = 64;
  }
  const int64_t blocks = (units + kThreads * per_thread - 1) / (kThreads * per_thread);
  return {int(std::max<int64_t>(1, std::min<int64_t>(blocks, cap))), kThreads};
}

// Blocks of this kernel that fit on the device at once. Every block of a
// launch must be resident: blocks spin on data that peers' blocks of the
// same index range send, so a block left waiting for an SM that spinning
// blocks hold could wait until the timeout (e.g. 128 blocks of 512 threads
// on an H100 PCIe, 114 SMs, one such block per SM at this register count).
template <typename T, int A>
int resident_blocks(int threads) {
  auto count = [](int t) {
    int device = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, allreduce_kernel<T, A>, t, 0) != cudaSuccess) {
      cudaGetLastError();  // clear it: the launch check reads the last error
      return -1;
    }
    return sms * per_sm;
  };
  // A failed query is asked again; handlers may run on several threads.
  static std::atomic<int> small{-1}, large{-1};
  std::atomic<int>& cached = threads == 128 ? small : large;
  int blocks = cached.load(std::memory_order_relaxed);
  if (blocks < 1) {
    blocks = count(threads);
    cached.store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// Per (slot, node_size, group) state computed once: peers and partners.
struct Plan {
  Params base;    // everything but the call's buffers, size and variant
  int num_nodes;  // N (base.node_size is G)
};

ffi::Unexpected<ffi::Error> invalid(std::string message) {
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(std::move(message)));
}

std::string describe(const std::vector<int64_t>& group) {
  std::string s = "[";
  for (size_t i = 0; i < group.size(); ++i)
    s += (i ? ", " : "") + std::to_string(group[i]);
  return s + "]";
}

ffi::ErrorOr<Plan> make_plan(const Runtime& rt, const std::vector<int64_t>& group,
                             int member, int node_size, int slot) {
  const int n = int(group.size());
  const int G = node_size, N = n / G;
  if (G > kMaxLocal)
    return invalid(
        "jax_nvrar: node_size " + std::to_string(G) + " exceeds the kernel's " +
        std::to_string(kMaxLocal) + " PEs per node");
  const int steps = doubling_steps(N), core = 1 << steps;
  if (inter_regions(N) > kMaxSteps)
    return invalid(
        "jax_nvrar: " + std::to_string(N) + " nodes exceed the kernel's " +
        std::to_string(1 << (kMaxSteps - 2)) + "-node limit");
  const SlotLayout layout = slot_layout(rt.slot_bytes);
  char* slot_base = rt.workspace + size_t(slot) * rt.slot_bytes;

  Plan plan{};
  Params& p = plan.base;
  plan.num_nodes = N;
  p.node_size = G;
  p.local_rank = member % G;
  const int node = member / G;
  for (int j = 0; j < G; ++j) {
    const int peer = int(group[node * G + j]);
    char* remote = static_cast<char*>(nvshmem_ptr(slot_base, peer));
    if (remote == nullptr)
      return invalid(
          "jax_nvrar: PEs " + std::to_string(rt.pe) + " and " +
          std::to_string(peer) + " form one node (node_size=" +
          std::to_string(G) + ") but are not peer-to-peer reachable; use a "
          "node_size that matches the GPUs linked by NVLink");
    p.peer_header[j] = reinterpret_cast<Header*>(remote);
    p.ll_a[j] = reinterpret_cast<uint4*>(remote + layout.a_offset());
    p.ll_b[j] = reinterpret_cast<uint4*>(remote + layout.b_offset());
    p.lp[j] = reinterpret_cast<uint4*>(remote + layout.lamport_offset());
  }
  p.lp_vecs = layout.lamport_vecs();
  p.ll_packets = layout.ll_lines();
  p.regions = inter_regions(N);
  p.inter_bytes = layout.inter_step_bytes(p.regions);
  p.raw_offset = raw_offset(p.inter_bytes);
  p.recv = slot_base + layout.recv_offset();
  p.stage = slot_base + layout.stage_offset();
  p.header = reinterpret_cast<Header*>(slot_base);
  auto pe_of = [&](int other_node) { return int(group[other_node * G + p.local_rank]); };
  p.role = node >= core ? kFoldSender : (node < N - core ? kFoldReceiver : kPlain);
  p.fold_pe = p.role == kFoldSender ? pe_of(node - core)
              : p.role == kFoldReceiver ? pe_of(node + core) : -1;
  p.steps = node < core ? steps : 0;
  for (int s = 0; s < p.steps; ++s) p.step_pe[s] = pe_of(node ^ (1 << s));
  // Each step's transport: stores where the partner's receive region is
  // mapped here, else puts.
  auto link = [&](int step, int pe) {
    p.peer_recv[step] = static_cast<char*>(nvshmem_ptr(p.recv, pe));
    p.puts |= p.peer_recv[step] == nullptr;
  };
  if (p.role != kPlain) link(kFoldStep, p.fold_pe), link(p.regions - 1, p.fold_pe);
  for (int s = 0; s < p.steps; ++s) link(1 + s, p.step_pe[s]);
  p.pe = rt.pe;
  p.timeout_ns = rt.timeout_ns;
  return plan;
}

// Plans keyed by (group members, slot, node_size); built on first use.
// `generation` changes when forget_plans() drops them.
struct PlanCache {
  std::mutex mutex;
  std::map<std::vector<int64_t>, Plan> plans;
  std::atomic<uint64_t> generation{0};
};

// The last plan a thread used, found again without locking or allocating
// when a launch repeats the attributes of the one before (the common case:
// with command buffers off the handler runs on every call).
struct LastPlan {
  std::vector<int64_t> groups;
  int64_t group_size = -1, node_size = -1, slot = -1;
  uint64_t generation = 0;
  const Plan* plan = nullptr;
};

PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

ffi::ErrorOr<const Plan*> find_plan(const Runtime& rt,
                                    ffi::Span<const int64_t> groups,
                                    int64_t group_size, int64_t node_size,
                                    int64_t slot) {
  PlanCache& cache = plan_cache();
  thread_local LastPlan last;
  if (last.plan != nullptr && last.generation == cache.generation &&
      last.group_size == group_size && last.node_size == node_size &&
      last.slot == slot &&
      std::equal(groups.begin(), groups.end(), last.groups.begin(),
                 last.groups.end()))
    return last.plan;
  if (group_size < 1 || groups.size() % group_size != 0)
    return invalid("jax_nvrar: malformed group table");
  if (node_size < 1 || group_size % node_size != 0)
    return invalid(
        "jax_nvrar: node_size " + std::to_string(node_size) +
        " does not divide the group size " + std::to_string(group_size));
  if (slot < 0 || slot >= rt.slots)
    return invalid("jax_nvrar: workspace slot out of range");
  int64_t start = -1, member = -1;
  for (size_t i = 0; i < groups.size(); ++i)
    if (groups[i] == rt.pe) start = int64_t(i) / group_size * group_size,
                            member = int64_t(i) % group_size;
  if (start < 0)
    return invalid(
        "jax_nvrar: this process (PE " + std::to_string(rt.pe) +
        ") is in none of the reduction groups of the program; the mesh and "
        "the NVSHMEM runtime disagree about processes");
  std::vector<int64_t> group(groups.begin() + start,
                             groups.begin() + start + group_size);
  for (int64_t pe : group)
    if (pe < 0 || pe >= rt.n_pes)
      return invalid(
          "jax_nvrar: group " + describe(group) + " names a PE outside the " +
          std::to_string(rt.n_pes) + " NVSHMEM PEs");
  std::vector<int64_t> key = group;
  key.push_back(slot);
  key.push_back(node_size);
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto it = cache.plans.find(key);
  if (it == cache.plans.end()) {
    auto plan = make_plan(rt, group, int(member), int(node_size), int(slot));
    if (plan.has_error()) return ffi::Unexpected<ffi::Error>(plan.error());
    it = cache.plans.emplace(key, *plan).first;
  }
  last.groups.assign(groups.begin(), groups.end());
  last.group_size = group_size, last.node_size = node_size, last.slot = slot;
  last.generation = cache.generation;
  last.plan = &it->second;
  return last.plan;
}

// Launches variant A's kernel on at most the blocks that fit at once.
template <typename T, int A>
ffi::Error start(cudaStream_t stream, Grid grid, const Params& p) {
  const int resident = resident_blocks<T, A>(grid.threads);
  if (resident < 1)
    return ffi::Error::Internal(
        "jax_nvrar: cannot query how many blocks of the kernel fit on the "
        "device (cudaOccupancyMaxActiveBlocksPerMultiprocessor failed)");
  grid.blocks = std::min(grid.blocks, resident);
  allreduce_kernel<T, A><<<grid.blocks, grid.threads, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_nvrar: kernel launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

template <typename T>
ffi::Error launch(cudaStream_t stream, const Plan& plan, const void* in,
                  void* out, int64_t nbytes, int64_t algo, int64_t blocks,
                  int64_t puts, int64_t fault) {
  Params p = plan.base;
  const int G = p.node_size, N = plan.num_nodes;
  p.in = static_cast<const char*>(in);
  p.out = static_cast<char*>(out);
  p.nbytes = nbytes;
  p.packets = (nbytes + kPayload - 1) / kPayload;
  p.chunk = (p.packets + G - 1) / G;
  if (fault < kNoFault || fault > kEmptyKernel)
    return ffi::Error::InvalidArgument(
        "jax_nvrar: fault switch " + std::to_string(fault) + " is not 0, 1, 2 or 3");
  p.fault = int(fault);
  if (puts || nbytes > kInterLinesMaxBytes) {  // every step through puts
    std::fill(p.peer_recv, p.peer_recv + kMaxSteps, nullptr);
    p.puts = N > 1;
  }
  if (!fits_slot(p.chunk, G, N, p.ll_packets, p.inter_bytes))
    return ffi::Error::InvalidArgument(
        "jax_nvrar: a message of " + std::to_string(nbytes) +
        " bytes exceeds the workspace slot; jax_nvrar.psum splits larger "
        "messages, so this call bypassed it");
  p.algo = pick_variant(p, G, N, int(algo));
  Grid grid = launch_grid(p.algo, nbytes, N);
  if (blocks > 0) grid.blocks = int(std::min<int64_t>(blocks, kMaxBlocks));
  switch (p.algo) {
    case kOneShotLL: return start<T, kOneShotLL>(stream, grid, p);
    case kTwoShotLL: return start<T, kTwoShotLL>(stream, grid, p);
    case kOneShotFlag: return start<T, kOneShotFlag>(stream, grid, p);
    case kTwoShotFlag: return start<T, kTwoShotFlag>(stream, grid, p);
    case kOneShotLamport: return start<T, kOneShotLamport>(stream, grid, p);
    case kTwoShotLamport: return start<T, kTwoShotLamport>(stream, grid, p);
    case kHierLamport: return start<T, kHierLamport>(stream, grid, p);
    default:
      return ffi::Error::InvalidArgument(
          "jax_nvrar: algo " + std::to_string(p.algo) + " names no kernel variant");
  }
}

ffi::Error allreduce(cudaStream_t stream, ffi::AnyBuffer x,
                     ffi::Result<ffi::AnyBuffer> y,
                     ffi::Span<const int64_t> groups, int64_t group_size,
                     int64_t node_size, int64_t slot, int64_t algo,
                     int64_t blocks, int64_t puts, int64_t fault) {
  const Runtime& rt = runtime();
  if (!rt.initialized)
    return ffi::Error::InvalidArgument(
        "jax_nvrar: the NVSHMEM runtime is not initialized; call "
        "jax_nvrar.initialize() before running programs with "
        "backend='nvshmem'");
  if (x.size_bytes() != y->size_bytes())
    return ffi::Error::InvalidArgument("jax_nvrar: input and output differ in size");
  if (x.size_bytes() == 0) return ffi::Error::Success();
  auto plan = find_plan(rt, groups, group_size, node_size, slot);
  if (plan.has_error()) return plan.error();
  const int64_t nbytes = int64_t(x.size_bytes());
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch<float>(stream, **plan, x.untyped_data(), y->untyped_data(), nbytes, algo, blocks, puts, fault);
    case ffi::DataType::BF16:
      return launch<__nv_bfloat16>(stream, **plan, x.untyped_data(), y->untyped_data(), nbytes, algo, blocks, puts, fault);
    case ffi::DataType::F16:
      return launch<__half>(stream, **plan, x.untyped_data(), y->untyped_data(), nbytes, algo, blocks, puts, fault);
    default:
      return ffi::Error::InvalidArgument(
          "jax_nvrar: the kernel sums float32, bfloat16 and float16 only");
  }
}

}  // namespace

void forget_plans() {
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.plans.clear();
  ++cache.generation;
}

SlotLayout slot_layout(size_t slot_bytes) {
  // Six units: LL regions A and B, inter-node receive and stage, and two for
  // the Lamport region (it carries 16 payload bytes per 16 stored).
  const size_t rest = slot_bytes > kHeaderBytes ? slot_bytes - kHeaderBytes : 0;
  const size_t unit = rest / 6 / 4096 * 4096;
  return SlotLayout{kHeaderBytes, unit, unit, 2 * unit};
}

uint32_t lamport_empty_word() { return kEmpty; }

size_t max_message_bytes(size_t slot_bytes, int node_size, int num_nodes) {
  const SlotLayout layout = slot_layout(slot_bytes);
  // A multiple of 256 bytes whose chunk (packets over node_size, rounded up)
  // passes fits_slot, the check every launch makes.
  int64_t packets = layout.ll_lines() - node_size;  // G * ceil(P / G) <= P + G - 1
  if (num_nodes > 1)
    packets = std::min<int64_t>(
        packets,
        (inter_capacity(layout.inter_step_bytes(inter_regions(num_nodes))) - 1) *
            node_size);
  return size_t(std::max<int64_t>(0, packets) * kPayload / 256 * 256);
}

bool trace_rows(std::vector<uint64_t>* rows) {
#ifdef JAX_NVRAR_TRACE
  rows->assign(size_t(kTraceCalls) * (1 + kTraceMarks), 0);
  return cudaDeviceSynchronize() == cudaSuccess &&
         cudaMemcpyFromSymbol(rows->data(), g_trace,
                              rows->size() * sizeof(uint64_t)) == cudaSuccess;
#else
  rows->clear();
  return false;
#endif
}

}  // namespace jax_nvrar

// One handler: input and output buffers, the group table and layout as
// attributes, the stream from XLA. Safe to capture into command buffers:
// all per-call state lives in device memory.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    NvrarAllReduce, jax_nvrar::allreduce,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // XLA's compute stream
        .Arg<ffi::AnyBuffer>()                     // x: this PE's input
        .Ret<ffi::AnyBuffer>()                     // the sum, same shape
        .Attr<ffi::Span<const int64_t>>("groups")  // all groups, flattened PEs
        .Attr<int64_t>("group_size")               // PEs per group
        .Attr<int64_t>("node_size")                // PEs per (virtual) node
        .Attr<int64_t>("slot")                     // workspace slot of layout
        .Attr<int64_t>("algo")                     // Algo: variant or 0 (auto)
        .Attr<int64_t>("blocks")                   // grid size or 0 (the rule)
        .Attr<int64_t>("puts")                     // 1: inter-node data always
                                                   // through NVSHMEM puts
        .Attr<int64_t>("fault"),                   // testing: Fault
    {ffi::Traits::kCmdBufferCompatible});          // cudaGraph enabled
