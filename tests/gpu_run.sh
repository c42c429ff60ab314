#!/usr/bin/env bash
# The GPU suite as run on the 4xH100 machine: build, then the suite in each
# configuration given (default: 4 processes with command buffers as the
# launcher sets them up, 4 with XLA's own command-buffer update mode
# (ALWAYS_UPDATE), 4 with command buffers off, 3 processes -- a
# non-power-of-two node count as 3x1 -- and 2 processes), logs under
# ${OUT:-tests/gpu_logs}. Suite options go in GPU_SUITE_ARGS.
#   GPU_SUITE_ARGS="--quick --calls 1000" bash tests/gpu_run.sh "4 off" "2 on"
set -uo pipefail
out=${OUT:-tests/gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_NVRAR_TIMEOUT_S=${JAX_NVRAR_TIMEOUT_S:-10}
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
python -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
status=0
[ $# -gt 0 ] || set -- "4 on" "4 always" "4 off" "3 on" "2 on"
for config in "$@"; do
  read -r nproc cb <<<"$config"
  flags=""  # command buffers record the kernel; the launcher picks the update mode
  [ "$cb" = always ] && flags="--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"
  [ "$cb" = off ] && flags="--xla_gpu_enable_command_buffer="
  log="$out/gpu_suite_${nproc}proc_cb${cb}.log"
  echo "=== $nproc processes, command buffers $cb ==="
  XLA_FLAGS="$flags" timeout 400 python -m jax_nvrar.launch \
    --nproc-per-node "$nproc" tests/gpu_suite.py ${GPU_SUITE_ARGS:-} \
    >"$log" 2>&1
  rc=$?
  grep "^\[rank 0\] \(ok\|FAIL\|GPU suite\|[0-9]* passed\)" "$log"
  echo "exit status $rc"
  [ "$rc" = 0 ] || status=1
done
exit $status
