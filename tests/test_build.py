"""The CUDA extension jax_nvrar._C as built by setup.py.

Where it was built (nvcc and NVSHMEM present at install time, as on CI), it must import without a GPU
or driver and register its FFI targets: that is how a CPU machine catches link errors. Where it was
not built, those tests skip; the build script's own parsing is checked everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _setup_module():
    name = "jax_nvrar_setup"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "setup.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return sys.modules[name]


def _extension():
    if importlib.util.find_spec("jax_nvrar._C") is None:
        pytest.skip("jax_nvrar._C was not built (no nvcc or NVSHMEM when the package was installed)")
    # Built but not importable is a failure, not a skip: a missing symbol or library shows up here.
    return importlib.import_module("jax_nvrar._C")


@pytest.mark.parametrize("spec, gencode", [
    ("90", ["-gencode=arch=compute_90,code=sm_90"]),
    ("90;100", ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_100,code=sm_100"]),
    ("sm_90a, 9.0", ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=sm_90"]),
    ("100+PTX", ["-gencode=arch=compute_100,code=sm_100",
                 "-gencode=arch=compute_100,code=compute_100"]),
])
def test_cuda_arch_list(spec, gencode):
    setup = _setup_module()
    assert setup._gencode_flags(setup._parse_archs(spec)) == gencode


@pytest.mark.parametrize("spec", ["hopper", "", "90;x"])
def test_cuda_arch_list_rejects_garbage(spec):
    with pytest.raises(ValueError, match="JAX_NVRAR_CUDA_ARCHS"):
        _setup_module()._parse_archs(spec)


def test_extension_imports():
    assert _extension().__name__ == "jax_nvrar._C"


def test_ffi_targets_register():
    extension = _extension()
    if not hasattr(extension, "ffi_targets"):
        pytest.skip("jax_nvrar._C has no ffi_targets()")
    import jax

    targets = extension.ffi_targets()
    assert isinstance(targets, dict) and targets, targets
    for name, capsule in targets.items():
        assert isinstance(name, str)
        assert type(capsule).__name__ == "PyCapsule", (name, capsule)
        # Registering again is harmless (same handler), so this does not depend on import order.
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


def test_link_recipe():
    """No libcudart.so or libcuda.so dependency, NVSHMEM found through the wheel, symbols private."""
    spec = importlib.util.find_spec("jax_nvrar._C")
    if spec is None:
        pytest.skip("jax_nvrar._C was not built")
    path = spec.origin
    if not (shutil.which("readelf") and shutil.which("nm")):
        pytest.skip("binutils (readelf, nm) not installed")
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True,
                             check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert "libnvshmem_host.so.3" in needed
    assert not [lib for lib in needed if lib.startswith(("libcudart", "libcuda."))], needed
    assert "$ORIGIN/../nvidia/nvshmem/lib" in dynamic
    exported = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                              check=True).stdout.split()
    assert not [s for s in exported if s.startswith(("nvshmem", "cuda", "__cuda"))]


def test_graph_nodes_benchmark_compiles(tmp_path):
    # benchmarks/graph_nodes.cu is built by hand on a GPU machine; CI's nvcc keeps it compiling.
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    proc = subprocess.run([nvcc, "-O2", "-arch=sm_90", "-o", str(tmp_path / "graph_nodes"),
                           str(REPO / "benchmarks" / "graph_nodes.cu")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "graph_nodes").exists()
