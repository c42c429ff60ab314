#!/usr/bin/env bash
# The GPU suite as run on the 4xH100 machine: build, then the suite in every
# configuration, logs under ${OUT:-tests/gpu_logs}. Suite options go in
# GPU_SUITE_ARGS, e.g. GPU_SUITE_ARGS=--quick bash tests/gpu_run.sh
set -uo pipefail
out=${OUT:-tests/gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_NVRAR_TIMEOUT_S=${JAX_NVRAR_TIMEOUT_S:-10}
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
python -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
grep "jax_nvrar build" "$out/build.log"
status=0
cb_off="--xla_gpu_enable_command_buffer="
cb_on="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
for config in "4 off" "4 on" "2 off"; do
  set -- $config
  nproc=$1 cb=$2
  flags=$cb_off; [ "$cb" = on ] && flags=$cb_on
  echo "=== $nproc processes, command buffers $cb ==="
  XLA_FLAGS="$flags" timeout 400 python -m jax_nvrar.launch \
    --nproc-per-node "$nproc" tests/gpu_suite.py ${GPU_SUITE_ARGS:-} \
    2>&1 | tee "$out/gpu_suite_${nproc}proc_cb${cb}.log" | grep -v "^\[rank [1-9]"
  rc=${PIPESTATUS[0]}
  echo "exit status $rc"
  [ "$rc" = 0 ] || status=1
done
exit $status
