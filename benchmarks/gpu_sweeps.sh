#!/usr/bin/env bash
# The all-reduce results of one machine (one host, its GPUs), in one go:
# build; allreduce.py's sweep against XLA psum on its default layouts for
# the machine (1x2 and every NODESxGPUS of all GPUs); the same sweep with
# the kernel returning at once (JAX_NVRAR_FAULT_INJECT=3: the chain's own
# cost per call); NVLink's floor parts (nvlink_floor.cu); the lower bound
# and the targets from them (floor.py). Files go to
# ${OUT:-benchmarks/results} as PREFIX_{allreduce,empty_kernel,nvlink_floor,floor}.*;
# SIZES overrides the message sizes.
#   PREFIX=h100x4 bash benchmarks/gpu_sweeps.sh
set -euo pipefail
out=${OUT:-benchmarks/results}
prefix=${PREFIX:-gpu}
sizes=${SIZES:-4K,32K,128K,256K,512K,1M,2M}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python -m pip install --no-build-isolation --no-deps -e . >"$out/${prefix}_build.log" 2>&1 ||
  { tail -40 "$out/${prefix}_build.log"; exit 1; }

sweep() {  # prefix-suffix, then allreduce.py's arguments
  local name=$1; shift
  echo "=== $name ($(date -u +%T))" >&2
  python benchmarks/allreduce.py --sizes "$sizes" --algos auto --decode-models= \
    --repeats 7 --out-dir "$out" --prefix "${prefix}_$name" "$@"
}
sweep allreduce --backends xla,nvshmem --time-budget 300
JAX_NVRAR_FAULT_INJECT=3 sweep empty_kernel --backends nvshmem --time-budget 180

echo "=== nvlink_floor ($(date -u +%T))" >&2
bin=$(mktemp -d)/nvlink_floor
nvcc -O2 -arch=sm_90 -o "$bin" benchmarks/nvlink_floor.cu
"$bin" "$out/${prefix}_nvlink_floor.json" | tee "$out/${prefix}_nvlink_floor.txt"

python benchmarks/floor.py --links "$out/${prefix}_nvlink_floor.json" \
  --empty "$out/${prefix}_empty_kernel.json" --measured "$out/${prefix}_allreduce.json" \
  --out-dir "$out" --prefix "${prefix}_floor"
