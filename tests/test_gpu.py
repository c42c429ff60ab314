"""Runs tests/gpu_suite.py one process per GPU; skipped without GPUs.

The suite itself is a launched program (NVSHMEM needs one process per GPU),
so this wrapper only starts it under the launcher in the configurations the
project supports and checks its exit status.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jax_nvrar.launch import visible_gpu_count

SUITE = Path(__file__).with_name("gpu_suite.py")
# XLA's defaults record the kernel into command buffers (CUDA graphs); the
# flag below turns them off, so each call is launched from the host.
COMMAND_BUFFERS = {"on": "", "off": "--xla_gpu_enable_command_buffer="}




def extension_built() -> bool:
    try:
        import jax_nvrar._C  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(visible_gpu_count() < 2, reason="needs 2 or more GPUs")
@pytest.mark.skipif(not extension_built(), reason="CUDA extension not built")
@pytest.mark.parametrize("command_buffers", ["off", "on"])
@pytest.mark.parametrize("nproc", [2, 3, 4])  # 3: three nodes of one
def test_gpu_suite(nproc, command_buffers):
    if nproc > visible_gpu_count():
        pytest.skip(f"needs {nproc} GPUs")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = COMMAND_BUFFERS[command_buffers]
    env.setdefault("JAX_NVRAR_TIMEOUT_S", "10")
    result = subprocess.run(
        [sys.executable, "-m", "jax_nvrar.launch", "--nproc-per-node",
         str(nproc), str(SUITE), "--quick"],
        env=env, timeout=900)
    assert result.returncode == 0
