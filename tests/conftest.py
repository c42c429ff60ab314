"""Every CPU test sees 8 simulated devices. Set before any backend starts.

``cpu_benchmark`` runs a script of benchmarks/ as a user would on a machine
without GPUs (``--platform cpu --quick``), in a subprocess of its own."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cpu_benchmark(tmp_path_factory):
    """run(script) -> (output folder, completed process) of ``python
    benchmarks/SCRIPT --platform cpu --quick``; fails unless it exits 0."""

    def run(script: str):
        out = tmp_path_factory.mktemp(Path(script).stem)
        proc = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / script), "--platform", "cpu",
             "--quick", "--out-dir", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out, proc

    return run
