"""Shared helpers of the jax_nvrar benchmarks (allreduce.py, decode.py).

One harness, not a script per experiment: environment capture, JSON output,
markdown tables, log-log plots, timing with warm-up and a max over ranks,
message-size parsing, and the driver/worker plumbing both scripts share
(launching a group of worker processes under a time limit, the four modes
of ``main``, starting NVSHMEM on every rank, writing PREFIX.json/.md/.png)
all live here. Nothing in this module starts a JAX backend on import; the
functions that need devices say so.

Units follow nccl-tests: sizes in bytes, times in microseconds, bandwidths
in GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

#: Distributions whose versions every result file records (absent ones are
#: recorded as None, so a reader sees what was looked for).
PACKAGES = (
    "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt",
    "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax_nvrar", "flax", "numpy",
    "ml_dtypes", "nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nvshmem-cu13",
    "nvidia-nvshmem-cu12", "nvshmem4py-cu13", "nvshmem4py-cu12",
    "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12",
    "nvidia-cublas", "nvidia-cudnn-cu13", "cuda-python", "cuda-core",
    "cuda-bindings", "matplotlib",
)
#: Environment variables that change what a collective does.
ENV_PREFIXES = ("XLA_", "JAX_", "NCCL_", "NVSHMEM_", "CUDA_", "TF_CPP_")


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the result table)."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
          "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_bytes(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '1000' -> 1000 (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 4K, 64M)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_sizes(text: str) -> list[int]:
    """Comma list of sizes and ranges. 'LO:HI' is every power of two from LO
    to HI; 'LO:HI:F' steps by factor F. '4K:64M,3M' is 15 powers + 3 MiB."""
    sizes: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if len(fields) == 1:
            sizes.add(parse_bytes(fields[0]))
            continue
        if len(fields) not in (2, 3):
            raise ValueError(f"bad size range {part!r}; use LO:HI or LO:HI:F")
        low, high = parse_bytes(fields[0]), parse_bytes(fields[1])
        factor = int(fields[2]) if len(fields) == 3 else 2
        if low < 1 or high < low or factor < 2:
            raise ValueError(f"bad size range {part!r}")
        size = low
        while size <= high:
            sizes.add(size)
            size *= factor
    if not sizes:
        raise ValueError("no sizes given")
    return sorted(sizes)


def fmt_bytes(n: int) -> str:
    """4096 -> '4K', 67108864 -> '64M', 3000 -> '3000'."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def parse_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

def _run(cmd: Sequence[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions(names: Iterable[str] = PACKAGES) -> dict:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def nvidia_smi() -> dict | None:
    """GPU models, driver and CUDA driver version, NVLink topology. None
    where nvidia-smi is absent. Does not touch JAX."""
    query = _run(["nvidia-smi", "--query-gpu=index,name,driver_version,"
                  "memory.total,pci.bus_id", "--format=csv,noheader"])
    if query is None:
        return None
    gpus = [dict(zip(("index", "name", "driver", "memory", "pci_bus"),
                     (f.strip() for f in line.split(","))))
            for line in query.splitlines() if line.strip()]
    header = _run(["nvidia-smi"]) or ""
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"gpus": gpus,
            "driver": gpus[0]["driver"] if gpus else None,
            "cuda_driver_api": cuda.group(1) if cuda else None,
            "topology": _run(["nvidia-smi", "topo", "-m"])}


def gpu_count() -> int:
    """GPUs this process may use, as the launcher counts them (nvidia-smi's
    list, cut to CUDA_VISIBLE_DEVICES), without starting JAX."""
    from jax_nvrar.launch import visible_gpu_count
    return visible_gpu_count()


def git_info() -> dict:
    commit = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = _run(["git", "-C", str(REPO), "status", "--porcelain"])
    return {"commit": commit,
            "dirty": None if status is None else bool(status)}


def host_env(argv: Sequence[str] | None = None) -> dict:
    """What can be known without starting a JAX backend."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "command": shlex.join([sys.executable] + argv),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "nvidia_smi": nvidia_smi(),
        "git": git_info(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(ENV_PREFIXES)},
    }


def nccl_version() -> str | None:
    """Version of the libnccl that the nvidia-nccl wheel ships (the one
    jaxlib's CUDA plugin loads), via ncclGetVersion; None where absent."""
    import ctypes
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for lib in sorted(Path(root).glob("**/libnccl.so*")):
            try:
                code = ctypes.c_int()
                if ctypes.CDLL(str(lib)).ncclGetVersion(ctypes.byref(code)):
                    continue
            except OSError:
                continue
            major, rest = divmod(code.value, 10000)
            return f"{major}.{rest // 100}.{rest % 100}"
    return None


def device_env() -> dict:
    """Device facts from a running JAX (starts the backend if not started)."""
    import jax

    devices = jax.devices()
    info = {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "platform_version": getattr(devices[0].client, "platform_version",
                                    None),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(ENV_PREFIXES)},
    }
    if info["backend"] != "cpu":
        info["nccl"] = nccl_version()
    try:  # private module: CUDA runtime/driver versions jaxlib was built for
        from jax._src.lib import cuda_versions
        if cuda_versions is not None:
            info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
            info["cuda_driver"] = cuda_versions.cuda_driver_get_version()
    except (ImportError, AttributeError, RuntimeError) as error:
        info["cuda_versions_error"] = repr(error)
    return info


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

def time_runs(fn: Callable, args: Sequence, *, warmup: int, repeats: int,
              barrier: Callable[[], None] | None = None,
              keep: Callable | None = None):
    """Wall time of ``fn(*args)`` to completion, ``repeats`` times after
    ``warmup`` untimed runs. ``fn`` is a compiled program doing many
    operations, so host dispatch is amortised over them. ``barrier`` (if
    given) runs once before the timed runs so that ranks start together;
    the timed runs then follow back to back, kept in step by the program's
    own collectives. A barrier before every run would put the ranks' start
    skew (tens of microseconds) into every measurement.

    Each run's output is dropped before the next run starts, so that every
    run can write the same device buffers: a live output puts the next
    run's output at another address, and XLA then updates the command
    buffers that write it. ``keep`` (if given) maps each output, after its
    timing, to what is returned for it (a host copy, say).

    Returns (seconds per run, ``keep(output)`` of every run incl. warm-up,
    or None each without ``keep``).
    """
    import jax

    kept, times = [], []
    for i in range(warmup + repeats):
        if barrier is not None and i == warmup:
            barrier()
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        elapsed = time.perf_counter() - start
        kept.append(None if keep is None else keep(out))
        del out
        if i >= warmup:
            times.append(elapsed)
    return times, kept


def gather_rows(row: Sequence[float]):
    """All processes' copies of a small float vector, stacked: shape
    (process_count, len(row)). Every process must call it (it is a
    collective), with rows of one length. Single process: no communication."""
    import jax
    import numpy as np

    row = np.asarray(row, dtype=np.float32)
    if jax.process_count() == 1:
        return row[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row))


def barrier(name: str = "jax_nvrar_bench") -> None:
    """All processes reach this point before any leaves it."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def median_of_max(per_rank_times) -> tuple[float, list[float]]:
    """nccl-tests' reduction: for each repeat the slowest rank, then the
    median over repeats. Input shape (ranks, repeats); returns (median,
    per-repeat maxima)."""
    maxima = [max(col) for col in zip(*per_rank_times)]
    return statistics.median(maxima), maxima


def bandwidths(nbytes: int, seconds: float, n_ranks: int) -> tuple[float, float]:
    """nccl-tests all-reduce algbw and busbw in GB/s."""
    if seconds <= 0:
        return math.nan, math.nan
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * 2 * (n_ranks - 1) / n_ranks


# --------------------------------------------------------------------------
# Drivers and workers
# --------------------------------------------------------------------------
#
# A GPU run is a driver process that never starts JAX: per group it runs
# ``python -m jax_nvrar.launch`` (one worker process per GPU), the workers
# append JSON lines to a part file, and the driver merges the parts. A group
# that outlives its share of the time budget plus a grace period is stopped
# and recorded as such; the lines it wrote before stay usable.

#: Lines of a group's output kept in its record (the rest went to stderr).
OUTPUT_TAIL = 30


def budget_share(end: float, weights: Sequence[float], floor: float) -> float:
    """Seconds the next group may run: the time left until ``end`` split in
    proportion to ``weights`` (the groups still to run, the next one first,
    each weighted by its expected cost), but at least ``floor``. Infinite
    where ``end`` is (no budget)."""
    return max(floor, (end - time.time()) * weights[0] / sum(weights))


def launch_group(name: str, script: Path, nproc: int, platform: str,
                 argv: Sequence[str], *, timeout: float, note: str,
                 env: dict | None = None) -> dict:
    """Run ``script argv`` in ``nproc`` processes under ``python -m
    jax_nvrar.launch``, its output passed on to stderr. After ``timeout`` s
    the launcher's whole process group gets SIGTERM, then SIGKILL (10 s
    each): workers stuck in a collective never exit by themselves.

    ``env``: variables added to this process's environment (XLA_FLAGS is
    read when a backend starts, so a group that needs other flags gets its
    own processes). Returns the group's record: group, nproc, status (ok,
    failed or timeout), returncode, wall_s, command, output_tail.
    """
    cmd = [sys.executable, "-m", "jax_nvrar.launch", "--nproc-per-node",
           str(nproc), "--platform", platform, str(script), *argv]
    log(f"group {name}: {note}; {' '.join(cmd)}")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    tail = collections.deque(maxlen=OUTPUT_TAIL)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(line)
        sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "ok"
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        log(f"group {name}: no exit after {timeout:.0f} s; stopping its "
            "processes")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    return {"group": name, "nproc": nproc, "status": status,
            "returncode": proc.returncode,
            "wall_s": round(time.time() - start, 1),
            "command": " ".join(cmd), "output_tail": list(tail)}


def launched_processes() -> tuple[int, bool]:
    """(processes the launcher started, whether this one is rank 0), from
    jax.distributed's state: jax.process_count() would start the GPU client,
    and NVSHMEM must start before it."""
    from jax._src import distributed

    state = distributed.global_state
    return state.num_processes, state.process_id == 0


def add_driver_args(parser: argparse.ArgumentParser) -> None:
    """The hidden flags ``dispatch`` and ``launch_group`` rely on."""
    # Testing the driver without GPUs: --platform gpu --gpus 4
    # --launch-platform cpu runs every group on 1-device CPU processes.
    parser.add_argument("--gpus", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--launch-platform", default="gpu", choices=("gpu", "cpu"),
                        help=argparse.SUPPRESS)
    # Set by the driver for the processes it launches.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None,
                        help=argparse.SUPPRESS)


def dispatch(args, *, worker: Callable, under_launcher: Callable,
             cpu: Callable, gpu: Callable) -> None:
    """The modes of a benchmark script's ``main``:

    * ``--worker`` (started by a driver): ``worker(emit, rank0)``, each
      record appended to the ``--part`` file as it is made;
    * under ``jax_nvrar.launch`` without ``--worker``: ``under_launcher(args)``;
    * ``--platform cpu``: ``cpu(args)``, a functional run in this process;
    * otherwise ``gpu(args)``, the driver.
    """
    if args.worker:
        part = Path(args.part)
        _, rank0 = launched_processes()
        worker(lambda record: append_jsonl(part, record), rank0)
        return
    import jax.distributed

    if jax.distributed.is_initialized():
        under_launcher(args)
    elif args.platform == "cpu":
        cpu(args)
    else:
        gpu(args)


def start_nvshmem() -> str | None:
    """Start NVSHMEM (jax_nvrar.initialize) before JAX's first allocation.
    Every rank must call it: the ranks agree, so either all use the kernel
    or none does. None when every rank has it, else why not (a failure is
    recorded as a skip, never raised)."""
    ok, why = False, None
    try:
        import jax_nvrar

        jax_nvrar.initialize()
        ok = jax_nvrar.is_available()
        why = None if ok else "jax_nvrar.is_available() is False after initialize()"
    except Exception as exc:  # any failure becomes a recorded skip
        why = f"jax_nvrar.initialize() failed: {type(exc).__name__}: {exc}"
    if gather_rows([float(ok)])[:, 0].min() > 0:
        return None
    return why or "unavailable on another rank"


def profile_command_buffers() -> None:
    """Keep XLA's command buffers on under the profiler (XLA otherwise runs
    them op by op while a profiler is attached), so that a trace shows the
    CUDA graphs a run really executes. XLA reads the flag when the backend
    starts: call this before."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_enable_command_buffers_during_profiling=true").strip()


def start_backend(who: str, *, nvshmem: bool, cpu_devices: int) -> bool:
    """The devices of a script that runs on GPUs under the launcher or on
    simulated CPU devices; True on GPUs. On GPUs, with ``nvshmem``, NVSHMEM
    starts first (the script exits, naming ``who``, where it cannot). Without
    GPUs (or with JAX_PLATFORMS=cpu) and not launched: ``cpu_devices``
    simulated devices."""
    from jax._src import distributed

    launched = distributed.global_state.client is not None
    on_gpu = gpu_count() > 0 and os.environ.get("JAX_PLATFORMS", "") != "cpu"
    if on_gpu and nvshmem:
        why = start_nvshmem()
        if why:
            sys.exit(f"{who}: {why} (one process per GPU: run it under the launcher)")
    import jax

    if not on_gpu and not launched:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    return on_gpu


#: The payload kind of a GPU measurement (CPU runs are "functional").
MEASURED = "performance"


def run_kind(devices: Sequence[dict]) -> str:
    """Only GPU processes measure performance; CPU ones (tests of the
    driver) are functional runs whatever mode started them."""
    on_gpu = bool(devices) and all(d.get("backend") != "cpu" for d in devices)
    return MEASURED if on_gpu else "functional"


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def write_json(path: Path, payload: dict) -> Path:
    """Write atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def load_measurement(path, *, allow_test_input: bool, use: str) -> dict:
    """A benchmark's JSON payload; SystemExit unless it is a GPU measurement
    (kind "performance") or test input is allowed. ``use`` ends the message:
    what a run that is not a measurement would be used for."""
    payload = json.loads(Path(path).read_text())
    kind = payload.get("kind")
    if kind != MEASURED and not allow_test_input:
        raise SystemExit(f"{path} is a {kind!r} run, not a GPU measurement: {use}")
    return payload


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object per line, flushed, so a killed run keeps its lines."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    records = []
    if not Path(path).exists():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when killed
            continue
    return records


def fmt_value(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if callable(spec):
        return spec(value)
    return format(value, spec)


def xla_flags_lines(devices: dict) -> list[str]:
    """The report's line naming the workers' XLA_FLAGS (the launcher adds to them on GPU, and
    XLA's command-buffer update mode changes every backend's time), one per distinct value."""
    infos = [info.get("device", info) for info in devices.values()]  # allreduce nests it
    flags = sorted({info.get("xla_flags", "") for info in infos if info.get("backend") == "gpu"})
    return [f"- XLA_FLAGS of the worker processes: `{value}`" if value
            else "- XLA_FLAGS of the worker processes: none" for value in flags]


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """``columns``: (key, header, format spec or callable). Missing -> '-'."""
    header = "| " + " | ".join(c[1] for c in columns) + " |"
    align = "|" + "|".join(
        "---:" if isinstance(c[2], str) and c[2] not in ("", "s") else "---"
        for c in columns) + "|"
    lines = [header, align]
    for row in rows:
        cells = [fmt_value(row.get(key), spec) for key, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def not_measured(results: Sequence[dict], skipped: Sequence[dict],
                 label: Callable[[dict], str],
                 skip_label: Callable[[dict], str]) -> list[str]:
    """Markdown bullets, one per (status, reason): the results whose status
    is not ok (named by ``label``) and the skipped entries (``skip_label``)."""
    missing = collections.defaultdict(set)
    for r in results:
        if r["status"] != "ok":
            missing[(r["status"], r.get("reason"))].add(label(r))
    for entry in skipped:
        missing[("skipped", entry["reason"])].add(skip_label(entry))
    return [f"- {status}: {', '.join(sorted(names))} -- {reason}"
            for (status, reason), names in missing.items()]


def write_outputs(payload: dict, out_dir: Path, prefix: str, *,
                  report: Callable[[dict], str],
                  plot: Callable[[dict, Path], str | None]) -> dict:
    """PREFIX.png (``plot`` returns None, or why nothing was drawn, which
    the payload records), PREFIX.md (``report``, also printed on stdout) and
    PREFIX.json in ``out_dir``. Returns the paths by suffix."""
    out_dir = Path(out_dir)
    paths = {k: out_dir / f"{prefix}.{k}" for k in ("json", "md", "png")}
    why = plot(payload, paths["png"])
    payload["plot"] = str(paths["png"]) if why is None else f"not drawn: {why}"
    text = report(payload)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["md"].write_text(text)
    write_json(paths["json"], payload)
    print(text, flush=True)
    log("wrote " + ", ".join(str(p) for k, p in paths.items()
                             if k != "png" or why is None))
    return {k: str(v) for k, v in paths.items()}


def plot_loglog(path: Path, panels: Sequence[dict], *, title: str,
                xlabel: str, ylabel: str) -> str | None:
    """One figure, one panel per dict {"title", "series": {label: (xs, ys)}}
    on log-log axes. Returns None on success, else why no plot was drawn
    (matplotlib missing), so callers record the reason instead of failing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as error:
        return f"matplotlib not importable: {error}"
    cols = min(len(panels), 2) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 5 * rows),
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, (xs, ys) in sorted(panel["series"].items()):
            style = panel.get("styles", {}).get(label, {})
            ax.plot(xs, ys, marker="o", markersize=3, label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda v, _: fmt_bytes(int(v)) if v >= 1 else f"{v:g}"))
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel.get("xlabel", xlabel))
        ax.set_ylabel(panel.get("ylabel", ylabel))
        ax.grid(True, which="both", alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
