// The parts of an all-reduce's time that no kernel goes below, measured on
// the GPUs of one host: the one-way latency of a store to a peer GPU (a flag
// or a 16-byte line, as the kernel's Lamport and LL lines travel), and the
// bandwidth of 16-byte stores into peers, one pair alone and every GPU into
// every other at once (what a one-shot all-reduce does). One process, CUDA
// peer access, no NVSHMEM, no JAX:
//   nvcc -O2 -arch=sm_90 -o nvlink_floor benchmarks/nvlink_floor.cu
//   ./nvlink_floor [out.json]
// Every spin-wait gives up after 1 s, reports and traps.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#define CK(x)                                                              \
  do {                                                                     \
    cudaError_t e = (x);                                                   \
    if (e != cudaSuccess) {                                                \
      fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

constexpr uint64_t kTimeoutNs = 1000000000ull;

__device__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A 16-byte line {i, i, i, i} (line = true) or a 32-bit release store of i.
__device__ void put(uint4* remote, uint32_t i, bool line) {
  if (line)
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %1, %1, %1};" ::"l"(remote), "r"(i)
                 : "memory");
  else
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(remote), "r"(i) : "memory");
}

// Waits until the local word (line: every word of the line) equals i.
__device__ void await(const uint4* local, uint32_t i, bool line, const char* who) {
  const uint64_t start = now_ns();
  for (uint32_t polls = 1;; ++polls) {
    uint4 v;
    if (line) {
      asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(local) : "memory");
      if (v.x == i && v.y == i && v.z == i && v.w == i) return;
    } else {
      asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v.x) : "l"(local) : "memory");
      if (v.x == i) return;
    }
    if (polls % 256 == 0 && now_ns() - start > kTimeoutNs) {
      printf("nvlink_floor: %s timed out waiting for %u\n", who, i);
      __trap();
    }
  }
}

// Ping sends first and times the round trips; pong answers.
__global__ void ping(uint4* remote, const uint4* local, uint32_t base, int iters,
                     bool line, uint64_t* ns) {
  const uint64_t t0 = now_ns();
  for (int k = 1; k <= iters; ++k) {
    put(remote, base + k, line);
    await(local, base + k, line, "ping");
  }
  *ns = now_ns() - t0;
}
__global__ void pong(uint4* remote, const uint4* local, uint32_t base, int iters,
                     bool line) {
  for (int k = 1; k <= iters; ++k) {
    await(local, base + k, line, "pong");
    put(remote, base + k, line);
  }
}

// Stores `vecs` 16-byte vectors of src into each destination in turn (the
// caller orders them from the next GPU on, spreading the stores over the
// links as the kernel does).
struct Dsts {
  uint4* p[8];
  int n;
};
__global__ void store_all(const uint4* src, Dsts d, int64_t vecs) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += stride) {
    const uint4 v = src[i];
    for (int k = 0; k < d.n; ++k) {
      uint4* dst = d.p[k] + i;
      asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(v.x),
                   "r"(v.y), "r"(v.z), "r"(v.w)
                   : "memory");
    }
  }
}

int main(int argc, char** argv) {
  int n = 0;
  CK(cudaGetDeviceCount(&n));
  n = std::min(n, 8);
  if (n < 2) {
    fprintf(stderr, "nvlink_floor: needs at least 2 GPUs, found %d\n", n);
    return 1;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  for (int a = 0; a < n; ++a) {
    CK(cudaSetDevice(a));
    for (int b = 0; b < n; ++b) {
      if (a == b) continue;
      int ok = 0;
      CK(cudaDeviceCanAccessPeer(&ok, a, b));
      if (!ok) {
        fprintf(stderr, "nvlink_floor: GPU %d cannot access GPU %d\n", a, b);
        return 1;
      }
      CK(cudaDeviceEnablePeerAccess(b, 0));
    }
  }
  std::string json = "{\"device\": \"" + std::string(prop.name) + "\", \"gpus\": " +
                     std::to_string(n) + ", \"latency\": [";

  // 1. One-way latency, GPU 0 and each peer: round trips / 2, best of 5.
  std::vector<uint4*> word(n);
  for (int g = 0; g < n; ++g) {
    CK(cudaSetDevice(g));
    CK(cudaMalloc(&word[g], 256));
    CK(cudaMemset(word[g], 0, 256));
  }
  uint64_t* ns;
  CK(cudaSetDevice(0));
  CK(cudaMallocManaged(&ns, sizeof(uint64_t)));
  const int iters = 2000;
  uint32_t base = 0;
  bool first = true;
  for (int line = 0; line < 2; ++line) {
    for (int peer = 1; peer < n; ++peer) {
      double best = 1e30;
      for (int rep = 0; rep < 6; ++rep, base += iters) {  // rep 0: warm-up
        CK(cudaSetDevice(peer));
        pong<<<1, 1>>>(word[0], word[peer], base, iters, line);
        CK(cudaSetDevice(0));
        ping<<<1, 1>>>(word[peer], word[0], base, iters, line, ns);
        CK(cudaDeviceSynchronize());
        CK(cudaSetDevice(peer));
        CK(cudaDeviceSynchronize());
        if (rep > 0) best = std::min(best, *ns / 1e3 / iters / 2);
      }
      const char* what = line ? "16-byte line (volatile)" : "32-bit flag (release/acquire)";
      printf("one-way latency, GPU 0 <-> GPU %d, %-29s %.2f us\n", peer, what, best);
      char buf[160];
      snprintf(buf, sizeof buf, "%s{\"peer\": %d, \"kind\": \"%s\", \"one_way_us\": %.3f}",
               first ? "" : ", ", peer, line ? "line" : "flag", best);
      json += buf;
      first = false;
    }
  }
  json += "], \"bandwidth\": [";

  // 2. Store bandwidth: GPU 0 into GPU 1 alone, then every GPU into every
  // other at once. Per GPU: bytes it stores / its time, best of 5 timed
  // batches of 20 launches.
  const int64_t max_bytes = 64ll << 20;
  std::vector<uint4*> src(n), dst(n);
  std::vector<cudaStream_t> stream(n);
  std::vector<cudaEvent_t> t0(n), t1(n);
  for (int g = 0; g < n; ++g) {
    CK(cudaSetDevice(g));
    CK(cudaMalloc(&src[g], max_bytes));
    CK(cudaMemset(src[g], 1, max_bytes));
    CK(cudaMalloc(&dst[g], max_bytes * (n - 1)));
    CK(cudaStreamCreateWithFlags(&stream[g], cudaStreamNonBlocking));
    CK(cudaEventCreate(&t0[g]));
    CK(cudaEventCreate(&t1[g]));
  }
  first = true;
  for (int all = 0; all < 2; ++all) {
    for (int64_t bytes : {1ll << 20, 16ll << 20, 64ll << 20}) {
      const int senders = all ? n : 1;
      const int64_t vecs = bytes / 16;
      const int launches = 20;
      double best = 0;  // GB/s per sender, the slowest sender of a batch
      for (int rep = 0; rep < 6; ++rep) {
        for (int g = 0; g < senders; ++g) {
          Dsts d{};
          d.n = all ? n - 1 : 1;
          for (int k = 0; k < d.n; ++k) {
            const int peer = all ? (g + 1 + k) % n : 1;
            const int slot = g < peer ? g : g - 1;  // sender g's part at the peer
            d.p[k] = dst[peer] + slot * vecs;
          }
          CK(cudaSetDevice(g));
          CK(cudaEventRecord(t0[g], stream[g]));
          for (int l = 0; l < launches; ++l)
            store_all<<<prop.multiProcessorCount, 512, 0, stream[g]>>>(src[g], d, vecs);
          CK(cudaEventRecord(t1[g], stream[g]));
        }
        double worst = 1e30;
        for (int g = 0; g < senders; ++g) {
          CK(cudaSetDevice(g));
          CK(cudaEventSynchronize(t1[g]));
          float ms;
          CK(cudaEventElapsedTime(&ms, t0[g], t1[g]));
          const double gbps = double(bytes) * (all ? n - 1 : 1) * launches / (ms * 1e6);
          worst = std::min(worst, gbps);
        }
        if (rep > 0) best = std::max(best, worst);
      }
      const char* what = all ? "every GPU into every other" : "GPU 0 into GPU 1 alone";
      printf("store bandwidth, %-26s %6lld KB per destination: %.0f GB/s out of each sender\n",
             what, (long long)(bytes >> 10), best);
      char buf[200];
      snprintf(buf, sizeof buf,
               "%s{\"pattern\": \"%s\", \"bytes_per_destination\": %lld, \"gbps_per_sender\": %.1f}",
               first ? "" : ", ", all ? "all_to_all" : "pair", (long long)bytes, best);
      json += buf;
      first = false;
    }
  }
  json += "]}\n";
  if (argc > 1) {
    FILE* f = fopen(argv[1], "w");
    if (!f) {
      fprintf(stderr, "nvlink_floor: cannot write %s\n", argv[1]);
      return 1;
    }
    fputs(json.c_str(), f);
    fclose(f);
  }
  return 0;
}
