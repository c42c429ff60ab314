"""Build script for jax_nvrar: a pure-Python package plus the optional CUDA extension `jax_nvrar._C`.

Package metadata lives in pyproject.toml; this file only decides whether and how to build `_C`.

The extension is built from every `csrc/*.cu` with the NVSHMEM link recipe used by DeepEP and PyTorch:

  1. `nvcc -c -rdc=true` per file (in parallel, skipped when the object is newer than its source and
     every header in csrc/ and was built by the same command line);
  2. one `nvcc -dlink` of all objects together with `libnvshmem_device.a`, which resolves the device
     side of NVSHMEM and of any cross-file `__device__` calls;
  3. a host link with the C++ compiler: objects + device-link object + `libnvshmem_device.a` (its host
     half) + `-l:libnvshmem_host.so.3` (the wheel ships only the versioned name) + static cudart, with
     `--exclude-libs,ALL` so the static NVSHMEM/cudart symbols stay local to `_C`.

No `-lcuda`: cudart and NVSHMEM both load the driver with dlopen, so `_C` imports on a machine without
a GPU, which is how CI checks that the FFI targets register.

The build happens only where nvcc, the NVSHMEM headers/libraries and the XLA FFI headers (shipped in
jaxlib) are all found; elsewhere the package installs as pure Python. Environment variables:

  JAX_NVRAR_BUILD        auto (default): build when everything is found; 0: never; 1: fail if anything
                         is missing. Once a build starts, compile and link errors always fail install.
  JAX_NVRAR_CUDA_ARCHS   target GPUs, e.g. "90" (default), "90;100", "90a", "100+PTX", "9.0".
  JAX_NVRAR_NVCC_FLAGS   extra nvcc flags appended to every compile, e.g. "-G" or "-DNVRAR_DEBUG=1".
  JAX_NVRAR_BUILD_JOBS   parallel nvcc processes (default: CPU count).
  JAX_NVRAR_CSRC         directory of .cu sources (default: csrc/ next to this file; for testing).
  NVCC                   nvcc to use (default: nvcc on PATH, then $CUDA_HOME/bin/nvcc).
  NVSHMEM_HOME           NVSHMEM install (default: the nvidia-nvshmem-cu13 wheel's nvidia/nvshmem).
  CXX                    host linker (default: g++).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXTENSION_NAME = "jax_nvrar._C"
HEADER_SUFFIXES = (".cuh", ".h", ".hpp", ".inc")
# Objects persist here rather than in setuptools' build_temp, which editable installs put in a
# temporary directory; keeping them makes repeated `pip install -e .` incremental.
OBJECT_DIR = ROOT / "build" / f"cuda-{sysconfig.get_platform()}-{sys.implementation.cache_tag}"


def _log(message: str) -> None:
    print(f"jax_nvrar build: {message}", flush=True)


@dataclass(frozen=True)
class Nvshmem:
    home: Path
    version: str

    @property
    def include_dir(self) -> Path:
        return self.home / "include"

    @property
    def lib_dir(self) -> Path:
        return self.home / "lib"

    @property
    def device_lib(self) -> Path:
        return self.lib_dir / "libnvshmem_device.a"


@dataclass(frozen=True)
class Plan:
    """What the environment provides and whether `_C` gets built."""

    mode: str
    csrc: Path
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    nvcc: str | None
    nvcc_version: str
    nvshmem: Nvshmem | None
    ffi_include: Path | None
    archs: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def build(self) -> bool:
        return self.mode != "0" and not self.missing

    def summary(self) -> str:
        if self.mode == "0":
            return f"CUDA extension {EXTENSION_NAME} skipped (JAX_NVRAR_BUILD=0), pure-Python install"
        nvshmem = f"{self.nvshmem.version} at {self.nvshmem.home}" if self.nvshmem else "not found"
        decision = "build" if self.build else (
            "error: " if self.mode == "1" else "skip, pure-Python install: ") + "; ".join(self.missing)
        return "\n".join([
            f"CUDA extension {EXTENSION_NAME} (JAX_NVRAR_BUILD={self.mode})",
            f"  nvcc     {self.nvcc or 'not found'} {self.nvcc_version}",
            f"  NVSHMEM  {nvshmem}",
            f"  XLA FFI  {self.ffi_include or 'not found'}",
            f"  archs    {' '.join(self.archs)}",
            f"  sources  {len(self.sources)} .cu in {self.csrc}",
            f"  decision {decision}",
        ])


def _parse_archs(spec: str) -> tuple[str, ...]:
    """'90;100a,100+PTX' -> ('90', '100a', '100+PTX'); also accepts 'sm_90' and '9.0'."""
    archs = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(\+PTX)?", token, re.IGNORECASE)
        if match is None:
            raise ValueError(
                f"JAX_NVRAR_CUDA_ARCHS: cannot parse {token!r} in {spec!r}; "
                "expected compute capabilities like '90;100' or '90a' or '100+PTX'")
        major, minor, suffix, ptx = match.groups()
        archs.append(f"{major}{minor or ''}{suffix.lower()}{'+PTX' if ptx else ''}")
    if not archs:
        raise ValueError(f"JAX_NVRAR_CUDA_ARCHS={spec!r} names no architecture")
    return tuple(archs)


def _gencode_flags(archs: tuple[str, ...]) -> list[str]:
    flags = []
    for arch in archs:
        number = arch.removesuffix("+PTX")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    candidates += [str(Path(os.environ[v]) / "bin" / "nvcc")
                   for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in filter(None, candidates):
        path = shutil.which(candidate)
        if path:
            return path
    if os.environ.get("NVCC"):
        raise RuntimeError(f"NVCC={os.environ['NVCC']!r} is not an executable")
    return None


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"(CUDA {match.group(1)}, {match.group(2)})" if match else "(version unknown)"


def _cuda_lib_dir(nvcc: str) -> Path:
    """The toolkit's lib directory holding libcudart_static.a, asked of nvcc itself.

    nvcc is often a wrapper script or a symlink farm (here /usr/local/bin/nvcc execs the real one), so
    its own path says nothing; its dry run prints the toolkit root it resolved.
    """
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dry = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    here = re.search(r"^#\$ _HERE_=(.+)$", dry, re.MULTILINE)
    target = re.findall(r"^#\$ _TARGET_DIR_=(.+)$", dry, re.MULTILINE)
    if here:
        roots.append(Path(here.group(1).strip()).parent)
    for root in roots:
        for lib in [root / "lib64", *(root / t.strip() / "lib" for t in target), root / "lib"]:
            if (lib / "libcudart_static.a").is_file():
                return lib
    raise RuntimeError(f"libcudart_static.a not found under {[str(r) for r in roots]}; set CUDA_HOME")


def _nvshmem_candidates() -> list[Path]:
    if os.environ.get("NVSHMEM_HOME"):
        return [Path(os.environ["NVSHMEM_HOME"])]
    # nvidia/ is a namespace package shared by every nvidia-* wheel, so ask for the subpackage's
    # search locations instead of a __file__.
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except ModuleNotFoundError:
        spec = None
    found = [Path(p) for p in spec.submodule_search_locations] if spec else []
    site_dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return found + [Path(d) / "nvidia" / "nvshmem" for d in sorted(site_dirs)]


def _find_nvshmem() -> Nvshmem | None:
    for home in _nvshmem_candidates():
        if (home / "include" / "nvshmem.h").is_file() and (home / "lib" / "libnvshmem_device.a").is_file():
            header = (home / "include" / "non_abi" / "nvshmem_version.h")
            text = header.read_text() if header.is_file() else ""
            parts = [re.search(rf"NVSHMEM_VENDOR_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
            version = ".".join(m.group(1) for m in parts) if all(parts) else "unknown version"
            return Nvshmem(home=home, version=version)
    if os.environ.get("NVSHMEM_HOME"):
        raise RuntimeError(f"NVSHMEM_HOME={os.environ['NVSHMEM_HOME']!r} lacks include/nvshmem.h "
                           "or lib/libnvshmem_device.a")
    return None


def _find_ffi_include() -> Path | None:
    """jaxlib's include/ (what jax.ffi.include_dir() returns), found without importing jax."""
    spec = importlib.util.find_spec("jaxlib")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "include"
        if (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
            return include
    return None


def _plan() -> Plan:
    mode = os.environ.get("JAX_NVRAR_BUILD", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"JAX_NVRAR_BUILD={mode!r}: expected auto, 0 or 1")
    csrc = Path(os.environ.get("JAX_NVRAR_CSRC", ROOT / "csrc")).resolve()
    sources = tuple(sorted(csrc.glob("*.cu")))
    headers = tuple(sorted(p for p in csrc.rglob("*") if p.suffix in HEADER_SUFFIXES))
    archs = _parse_archs(os.environ.get("JAX_NVRAR_CUDA_ARCHS", "90"))
    if mode == "0":
        return Plan(mode, csrc, sources, headers, None, "", None, None, archs, ())

    nvcc = _find_nvcc()
    nvshmem = _find_nvshmem()
    ffi_include = _find_ffi_include()
    missing = []
    if nvcc is None:
        missing.append("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")
    if nvshmem is None:
        missing.append("NVSHMEM not found (pip install nvidia-nvshmem-cu13, or set NVSHMEM_HOME)")
    if ffi_include is None:
        missing.append("XLA FFI headers not found (install jaxlib)")
    if not sources:
        missing.append(f"no .cu sources in {csrc}")
    try:
        import pybind11  # noqa: F401  (build requirement; absent only in --no-build-isolation builds)
    except ImportError:
        missing.append("pybind11 not installed")
    plan = Plan(mode, csrc, sources, headers, nvcc, _nvcc_version(nvcc) if nvcc else "",
                nvshmem, ffi_include, archs, tuple(missing))
    if mode == "1" and missing:
        raise RuntimeError("JAX_NVRAR_BUILD=1 but the CUDA extension cannot be built:\n" + plan.summary())
    return plan


def _runtime_rpaths(nvshmem: Nvshmem) -> list[str]:
    """Where `_C` looks for libnvshmem_host.so.3 at run time, in order.

    $ORIGIN/.. is site-packages for a regular install; the target environment's site-packages covers
    editable installs (where `_C` sits in the source tree); the directory found at build time covers
    NVSHMEM_HOME and --no-build-isolation builds. A pip build-isolation environment is deleted after
    the build, so its path is left out.
    """
    site_dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    paths = ["$ORIGIN/../nvidia/nvshmem/lib"]
    paths += [str(Path(d) / "nvidia" / "nvshmem" / "lib") for d in site_dirs]
    if "pip-build-env" not in str(nvshmem.lib_dir):
        paths.append(str(nvshmem.lib_dir))
    return list(dict.fromkeys(paths))


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise RuntimeError(f"command failed with exit code {result.returncode}:\n"
                           f"{shlex.join(command)}\n{output}")
    return output


class BuildCudaExtension(build_ext):
    """build_ext that builds `_C` with nvcc; see the module docstring for the recipe."""

    def copy_file(self, infile, outfile, *args, **kwargs):
        # Editable installs copy the module into the source tree. Writing over the old file in place
        # would change pages that running processes (a benchmark, a test) have mapped and crash them
        # with SIGBUS; a rename gives the new module a new inode and leaves theirs intact.
        if not str(outfile).endswith(".so"):
            return super().copy_file(infile, outfile, *args, **kwargs)
        temporary = f"{outfile}.tmp{os.getpid()}"
        shutil.copy2(infile, temporary)
        os.replace(temporary, outfile)
        return outfile, True

    def build_extension(self, ext: Extension) -> None:
        if ext.name != EXTENSION_NAME:
            super().build_extension(ext)
            return
        plan = _plan()
        _log(plan.summary())
        import pybind11

        nvcc, nvshmem = plan.nvcc, plan.nvshmem
        gencode = _gencode_flags(plan.archs)
        # Third-party headers go in as system headers so their warnings do not bury ours.
        system_includes = [Path(pybind11.get_include()), Path(sysconfig.get_paths()["include"]),
                           plan.ffi_include, nvshmem.include_dir]
        compile_flags = [
            "-rdc=true", "-std=c++17", "-O3", "-lineinfo",
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            *gencode, f"-I{plan.csrc}", *(f"-isystem={d}" for d in system_includes),
            *shlex.split(os.environ.get("JAX_NVRAR_NVCC_FLAGS", "")),
        ]
        OBJECT_DIR.mkdir(parents=True, exist_ok=True)
        newest_header = max((h.stat().st_mtime for h in plan.headers), default=0.0)

        def compile_one(source: Path) -> tuple[Path, bool]:
            obj = OBJECT_DIR / f"{source.stem}.o"
            command = [nvcc, "-c", str(source), "-o", str(obj), *compile_flags]
            stamp = obj.with_suffix(".cmd")
            fresh = (obj.is_file() and stamp.is_file() and stamp.read_text() == shlex.join(command)
                     and obj.stat().st_mtime >= max(source.stat().st_mtime, newest_header))
            if fresh:
                return obj, False
            stamp.unlink(missing_ok=True)
            output = _run(command)
            if output:
                _log(f"{source.name}:\n{output}")
            stamp.write_text(shlex.join(command))
            return obj, True

        jobs = int(os.environ.get("JAX_NVRAR_BUILD_JOBS") or self.parallel or os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [pool.submit(compile_one, s) for s in plan.sources]
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise RuntimeError("nvcc failed on {} file(s):\n\n{}".format(
                    len(errors), "\n\n".join(str(e) for e in errors)))
            results = [f.result() for f in futures]
        objects = [obj for obj, _ in results]
        _log(f"compiled {sum(rebuilt for _, rebuilt in results)} of {len(objects)} sources "
             f"with {jobs} job(s)")

        dlink = OBJECT_DIR / "dlink.o"
        _run([nvcc, "-dlink", *gencode, "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
              *map(str, objects),
              str(nvshmem.device_lib), "-o", str(dlink)])

        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        linked = output.with_name(f"{output.name}.tmp{os.getpid()}")  # renamed over output: see copy_file
        host_lib = ("-l:libnvshmem_host.so.3" if (nvshmem.lib_dir / "libnvshmem_host.so.3").is_file()
                    else "-lnvshmem_host")
        rpaths = _runtime_rpaths(nvshmem)
        _run([os.environ.get("CXX", "g++"), "-shared", "-o", str(linked),
              *map(str, objects), str(dlink), str(nvshmem.device_lib),
              f"-L{nvshmem.lib_dir}", host_lib,
              f"-L{_cuda_lib_dir(nvcc)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread",
              "-Wl,--exclude-libs,ALL",
              *(f"-Wl,-rpath,{p}" for p in rpaths)])
        os.replace(linked, output)
        _log(f"linked {output} (rpath: {':'.join(rpaths)})")


def _relative(paths: tuple[Path, ...]) -> list[str]:
    # setuptools wants paths relative to setup.py; JAX_NVRAR_CSRC may point outside the tree.
    return [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths]


def main() -> None:
    plan = _plan()
    _log(f"building {EXTENSION_NAME} from {len(plan.sources)} sources" if plan.build else plan.summary())
    extensions = [Extension(EXTENSION_NAME, sources=_relative(plan.sources),
                            depends=_relative(plan.headers))] if plan.build else []
    setup(ext_modules=extensions, cmdclass={"build_ext": BuildCudaExtension})


# setuptools' PEP 517 backend, like `python setup.py`, runs this file as __main__; tests import it.
if __name__ == "__main__":
    main()
