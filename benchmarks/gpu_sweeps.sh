#!/usr/bin/env bash
# The all-reduce results of one machine with N GPUs (one host), in one go:
# build; the sweep against XLA psum on 1xN, on 1x2 and on the two-node
# virtual layout 2x(N/2); the same sweep with the kernel returning at once
# (JAX_NVRAR_FAULT_INJECT=3: the chain's own cost per call); NVLink's floor
# parts (nvlink_floor.cu); the lower bound and the targets from them
# (floor.py). Files go to ${OUT:-benchmarks/results} as
# PREFIX_{allreduce,empty_kernel,nvlink_floor,floor}.*; SIZES overrides the
# message sizes.
#   PREFIX=h100x4 bash benchmarks/gpu_sweeps.sh
set -euo pipefail
out=${OUT:-benchmarks/results}
prefix=${PREFIX:-gpu}
sizes=${SIZES:-4K,32K,128K,256K,512K,1M,2M}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0

n=$(nvidia-smi -L | grep -c '^GPU ')
if [ "$n" -lt 2 ]; then
  echo "gpu_sweeps.sh: needs 2 or more GPUs, nvidia-smi lists $n" >&2
  exit 1
fi
layouts="1x$n,2x$((n / 2))"
if [ "$n" -gt 2 ]; then layouts="$layouts,1x2"; fi

python -m pip install --no-build-isolation --no-deps -e . >"$out/${prefix}_build.log" 2>&1 ||
  { tail -40 "$out/${prefix}_build.log"; exit 1; }

sweep() {  # prefix-suffix, then allreduce.py's arguments
  local name=$1; shift
  echo "=== $name ($(date -u +%T))" >&2
  python benchmarks/allreduce.py --sizes "$sizes" --layouts "$layouts" --algos auto \
    --decode-models= --repeats 7 --out-dir "$out" --prefix "${prefix}_$name" "$@"
}
sweep allreduce --backends xla,nvshmem --time-budget 240
JAX_NVRAR_FAULT_INJECT=3 sweep empty_kernel --backends nvshmem --time-budget 150

echo "=== nvlink_floor ($(date -u +%T))" >&2
nvcc -O2 -arch=sm_90 -o "$out/${prefix}_nvlink_floor.bin" benchmarks/nvlink_floor.cu
"$out/${prefix}_nvlink_floor.bin" "$out/${prefix}_nvlink_floor.json" | tee "$out/${prefix}_nvlink_floor.txt"
rm -f "$out/${prefix}_nvlink_floor.bin"

python benchmarks/floor.py --links "$out/${prefix}_nvlink_floor.json" \
  --empty "$out/${prefix}_empty_kernel.json" --measured "$out/${prefix}_allreduce.json" \
  --out-dir "$out" --prefix "${prefix}_floor"
