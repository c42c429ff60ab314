"""All-reduce benchmark: jax_nvrar.psum against XLA's psum, in nccl-tests terms.

One command produces everything::

    python benchmarks/allreduce.py            # GPUs: all backends, layouts
                                              # 1x2 1x4 2x2 4x1; ~5 min, never
                                              # past --time-budget (390 s)
    python benchmarks/allreduce.py --quick    # 6 sizes, ~3 minutes
    python benchmarks/allreduce.py --platform cpu --quick   # functional run

Outputs (``--out-dir``, default benchmarks/results/): PREFIX.json (results,
versions, flags, devices, command), PREFIX.md (the table, also on stdout),
PREFIX.png (latency vs size, log-log, per backend and layout). Progress goes
to stderr.

Modes
  * GPU (default where nvidia-smi lists GPUs). This process is a *driver*: it
    never starts JAX itself; it runs ``python -m jax_nvrar.launch`` (one
    process per GPU) once per *group* and merges the groups' results.
    A group is what must share processes:
      - ``N:default``   XLA psum (NCCL), the reference NVRAR schedule, the
        NVRAR kernel and its single-node variants, and ``auto`` (jax_nvrar.psum's
        default: the kernel up to JAX_NVRAR_AUTO_MAX_KB[_NODES], XLA above),
        on every layout of N GPUs;
      - ``N:xla_ck``    XLA psum with XLA's own collective kernels enabled
        (``--xla_gpu_experimental_use_collective_kernels``). XLA_FLAGS are read
        when the backend starts, so this needs its own processes;
      - ``N:nvshmem4py`` NVSHMEM's own on-stream sum reduction through
        nvshmem4py (skipped, with the reason, where it is not installed).
    Process counts: the 1x2 layout runs in its own 2-process launch rather
    than as a sub-mesh of a 4-process job, so every kernel sees exactly the
    PEs it reduces over (NVSHMEM's world is the group).
  * CPU (``--platform cpu``, or no GPU): a FUNCTIONAL run in this process on
    simulated CPU devices (``jax_num_cpu_devices``): the reference schedule
    against ``lax.psum``, checked exactly. Its times say nothing about
    performance and every output says so.
  * Under the launcher without ``--worker`` (``python -m jax_nvrar.launch
    --nproc-per-node 4 benchmarks/allreduce.py``): one default group on the
    processes started, written like a driver run.

Layouts are ``NODESxGPUS``: 2x2 is two virtual nodes of two GPUs
(``node_size=2``); XLA's psum has no notion of nodes, so it runs on 1xN only
and is the baseline of every layout with N GPUs.

Method (nccl-tests, adapted to a compiled program)
  1. Inputs are small positive integers, distinct per rank and position
     (period coprime to every power of two, never zero, so a dropped, zeroed
     or misplaced chunk shows; XLA owns the output buffers, so they cannot
     be poisoned, but an untouched zeroed buffer can never pass). Sums are exact in every dtype, so the result
     must equal the exact sum -- what ``lax.psum`` returns -- bit for bit.
  2. One jitted program per case does ``calls = steps + 1`` dependent
     all-reduces: ``y = psum(x)`` is checked against the exact sum on
     device, then ``v <- psum(v) / N + d_r`` runs ``steps`` times in a
     ``fori_loop`` (``d_r = +-1`` alternating over ranks, summing to zero).
     The chain's fixed point is its start, so every chained call is checked
     too (N a power of two; /N is then exact). ``d_r`` keeps the operand
     rank-dependent so XLA cannot prove it replicated and fold the
     all-reduce into a multiply. Each step adds one fused elementwise kernel
     (the same for every backend), included in the time.
  3. Compile, ``--warmup`` runs, one barrier, then ``--repeats`` timed runs
     back to back (each run's output dropped before the next starts, so
     XLA's command buffers keep their addresses). time per call = run time
     / calls; for each run the slowest rank; the median over runs. A run
     also pays a fixed cost (dispatch, completion, the ranks' start skew:
     0.2-0.6 ms on 2 H200s), so ``steps`` comes from ``--target-ms``
     (runs estimated at ~40 ms, at most 2048 steps): that cost then adds
     at most about 0.5 us per call up to 2 MB. #wrong = mismatching elements summed
     over ranks, worst run (warm-up included).
  4. algbw = bytes / time, busbw = algbw * 2(n-1)/n, speedup = XLA psum's
     time / this time (same dtype, size and GPU count).
  5. Link bandwidth, once per group size: 4n + 1 chained ``lax.ppermute``
     ring shifts of 256 MiB per device (NCCL send/recv; the data checked),
     slowest rank, median of 5 runs; "busbw % of link" sets each row's
     busbw against it (an all-reduce's bus bandwidth cannot beat one
     link's).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

if importlib.util.find_spec("jax_nvrar") is None:  # run from a checkout
    sys.path.append(str(H.REPO))

from _allreduce_cases import (ALGOS, BACKENDS, DECODE_MODELS,  # noqa: E402
                              DTYPE_BITS, Layout, group_series,
                              points_from_args, worker_main)
from _allreduce_report import merge, run_title, write_outputs  # noqa: E402

from jax_nvrar import _tuning  # noqa: E402

SCRIPT = Path(__file__).resolve()
SCHEMA = "jax_nvrar.allreduce/1"
#: Spellings of XLA's collective-kernel flag, tried in order (XLA renamed
#: the enum values; an unknown flag aborts the process, so each is probed).
XLA_CK_FLAGS = (
    "--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE",
    "--xla_gpu_experimental_use_collective_kernels=COLLECTIVE_KERNEL_ALL_REDUCE",
)


def gpu_layouts(n: int) -> str:
    """Default layouts on n GPUs: 1x2, then every NODESxGPUS of all n
    (1x4 2x2 4x1 on 4 GPUs; 1x8 2x4 4x2 8x1 on 8, the paper's node shape
    among them)."""
    sizes = [g for g in range(n, 0, -1) if n % g == 0] if n > 1 else []
    return ",".join(dict.fromkeys(["1x2"] + [f"{n // g}x{g}" for g in sizes]))


GPU_LAYOUTS = gpu_layouts(4)  # in --help
CPU_LAYOUTS = "1x2,1x4,2x2,4x1,1x8,2x4,8x1"
CPU_DEVICES = 8


# --------------------------------------------------------------------------
# Driver: groups, launcher
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Group:
    kind: str
    nproc: int
    layouts: list
    env: dict
    cases: int

    @property
    def name(self) -> str:
        return f"{self.nproc}:{self.kind}"


def probe_xla_flag(candidates=XLA_CK_FLAGS) -> tuple[str | None, str]:
    """The first spelling this jaxlib's XLA accepts. XLA parses XLA_FLAGS
    once for every backend, so a CPU-only child tests it without a GPU."""
    errors = []
    for flag in candidates:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
        try:
            out = subprocess.run(
                [sys.executable, "-c",
                 "import jax.numpy as jnp; (jnp.zeros(2) + 1).block_until_ready()"],
                env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            errors.append(f"{flag}: probe timed out")
            continue
        if out.returncode == 0:
            return flag, ""
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        errors.append(last[-200:])
    return None, "XLA rejects the collective-kernel flag: " + " | ".join(errors)


def probe_nvshmem4py() -> str | None:
    """None when nvshmem.core imports in a fresh process, else why not."""
    try:
        out = subprocess.run([sys.executable, "-c", "import nvshmem.core"],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "import nvshmem.core timed out"
    if out.returncode == 0:
        return None
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return f"nvshmem4py not importable ({last.strip()[-200:]})"


def plan_groups(args, layouts, n_gpus, skipped) -> list[Group]:
    backends = set(H.parse_list(args.backends))
    algos = tuple(H.parse_list(args.algos))
    npoints = len(points_from_args(args))
    by_n = collections.defaultdict(list)
    for layout in layouts:
        if layout.n > n_gpus:
            for s in group_series("default", [layout], backends, algos):
                skipped.append({"backend": s.label, "layout": layout.name,
                                "reason": f"needs {layout.n} GPUs; "
                                          f"{n_gpus} present"})
            continue
        by_n[layout.n].append(layout)

    extra_kinds = []
    if "xla_ck" in backends:
        flag, why = probe_xla_flag()
        if flag:
            extra_kinds.append(("xla_ck", {"XLA_FLAGS": (
                os.environ.get("XLA_FLAGS", "") + " " + flag).strip()}))
        else:
            skipped.append({"backend": "xla_ck", "layout": "*", "reason": why})
    if "nvshmem4py" in backends:
        why = probe_nvshmem4py()
        if why is None:
            # NVSHMEM's heap lives beside JAX's pool; JAX must not take 75%.
            extra_kinds.append(("nvshmem4py",
                                {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}))
        else:
            skipped.append({"backend": "nvshmem4py", "layout": "*",
                            "reason": why})

    groups = []
    for kind, env in [("default", {})] + extra_kinds:
        for n in sorted(by_n, reverse=True):  # the 4-GPU groups matter most
            series = group_series(kind, by_n[n], backends, algos)
            if series:
                groups.append(Group(kind, n, by_n[n], env,
                                    cases=len(series) * npoints))
    return groups


def worker_argv(args, group: Group, part: Path, deadline: float) -> list:
    argv = ["--worker", "--group-kind", group.kind, "--group", group.name,
            "--layouts", ",".join(l.name for l in group.layouts),
            "--part", str(part), "--deadline", f"{deadline:.1f}"]
    for name in ("sizes", "dtypes", "decode_batches", "decode_models",
                 "backends", "algos", "repeats", "warmup", "unroll",
                 "target_ms", "steps"):
        argv += [f"--{name.replace('_', '-')}={getattr(args, name)}"]
    return argv + (["--quick"] if args.quick else [])


def driver_gpu(args) -> dict:
    host = H.host_env()
    n_gpus = args.gpus or H.gpu_count()
    layouts = [Layout.parse(t) for t in H.parse_list(args.layouts)]
    if all(layout.n > n_gpus for layout in layouts):
        raise SystemExit(
            f"allreduce.py: layouts {args.layouts} need {min(l.n for l in layouts)} "
            f"or more GPUs; {n_gpus} present (an all-reduce over one GPU moves "
            "nothing). --platform cpu runs the functional check")
    skipped = []
    start = time.time()
    end = start + args.time_budget
    groups = plan_groups(args, layouts, n_gpus, skipped)
    tmp = Path(tempfile.mkdtemp(prefix="jax_nvrar_allreduce_"))
    groups_meta, records = [], {}
    for i, group in enumerate(groups):
        weights = [20 + g.cases for g in groups[i:]]  # ~1 s a case + start-up
        share = H.budget_share(end, weights, 30.0)
        deadline = time.time() + share
        part = tmp / f"{group.name.replace(':', '_')}.jsonl"
        meta = H.launch_group(
            group.name, SCRIPT, group.nproc, args.launch_platform,
            worker_argv(args, group, part, deadline), env=group.env,
            timeout=share + args.grace,
            note=f"{group.cases} cases, {deadline - time.time():.0f} s budget")
        groups_meta.append(dict(meta, kind=group.kind, env=group.env))
        records[group.name] = H.read_jsonl(part)
    devices = [r["device"] for recs in records.values() for r in recs
               if r["type"] == "env"]
    kind = H.run_kind(devices)
    payload = merge(records, groups_meta, skipped, {
        "schema": SCHEMA, "kind": kind,
        "title": run_title(kind, devices[0] if devices else None,
                        max([l.n for l in layouts if l.n <= n_gpus] or [0])),
        "method": _method(args), "env": host,
        "wall_s": round(time.time() - start, 1)})
    return write_outputs(payload, args.out_dir, args.prefix or "allreduce")


def driver_cpu(args) -> dict:
    """Functional run in this process on simulated CPU devices."""
    host = H.host_env()
    layouts = [Layout.parse(t) for t in H.parse_list(args.layouts)]
    n_dev = max([CPU_DEVICES] + [l.n for l in layouts])
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n_dev)
    skipped = [{"backend": b, "layout": "*", "reason": why} for b, why in (
        ("xla_ck", "functional CPU run: XLA's collective kernels are GPU-only"),
        ("nvshmem4py", "functional CPU run: NVSHMEM needs CUDA GPUs"))
        if b in H.parse_list(args.backends)]
    records = []
    args.group, args.group_kind = f"{n_dev}:cpu", "default"
    args.deadline = time.time() + args.time_budget
    start = time.time()
    worker_main(args, cpu=True, emit=records.append, rank0=True)
    devices = [r["device"] for r in records if r["type"] == "env"]
    payload = merge({args.group: records}, [{
        "group": args.group, "kind": "cpu", "nproc": n_dev, "status": "ok",
        "returncode": 0, "wall_s": round(time.time() - start, 1)}], skipped, {
        "schema": SCHEMA, "kind": "functional",
        "title": run_title("functional", devices[0] if devices else None,
                           n_dev),
        "method": _method(args), "env": host,
        "wall_s": round(time.time() - start, 1)})
    return write_outputs(payload, args.out_dir,
                         args.prefix or "allreduce_cpu_functional")


def direct_under_launcher(args) -> None:
    """Started by the launcher without --worker: one default group."""
    n, rank0 = H.launched_processes()
    layouts = [l for l in (Layout.parse(t) for t in H.parse_list(args.layouts))
               if l.n == n]
    args.layouts = ",".join(l.name for l in layouts) or f"1x{n}"
    args.group, args.group_kind = f"{n}:default", "default"
    args.deadline = time.time() + args.time_budget
    records = []
    start = time.time()
    worker_main(args, cpu=False, emit=records.append, rank0=rank0)
    if rank0:
        devices = [r["device"] for r in records if r["type"] == "env"]
        kind = H.run_kind(devices)
        payload = merge({args.group: records}, [{
            "group": args.group, "kind": "default", "nproc": n,
            "status": "ok", "returncode": 0,
            "wall_s": round(time.time() - start, 1)}], [], {
            "schema": SCHEMA, "kind": kind,
            "title": run_title(kind, devices[0] if devices else None, n),
            "method": _method(args), "env": H.host_env(),
            "wall_s": round(time.time() - start, 1)})
        write_outputs(payload, args.out_dir, args.prefix or f"allreduce_{n}gpu")


def _method(args) -> dict:
    return {
        "time": "per call = wall time of one jitted program / calls; "
                "slowest rank per run; median over runs",
        "calls_per_program": "steps + 1 dependent all-reduces, each chained "
                             "step adds one fused x/N+d elementwise kernel",
        "check": "integer inputs, exact sum compared on device for the first "
                 "call; every chained call checked via the chain's fixed "
                 "point when N is a power of two",
        "busbw": "algbw * 2(n-1)/n",
        "speedup": "xla time / this time (same dtype, size, GPU count)",
        "warmup": args.warmup, "repeats": args.repeats, "unroll": args.unroll,
        "target_ms": args.target_ms, "steps": args.steps or "auto",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: gpu where nvidia-smi lists GPUs, else a "
                        "functional CPU run")
    p.add_argument("--sizes", default=None,
                   help="bytes per rank: list and LO:HI[:F] ranges, e.g. "
                        "4K:64M (default) or 4K,1M,16M")
    p.add_argument("--dtypes", default="bfloat16",
                   help="comma list of bfloat16, float16, float32")
    p.add_argument("--decode-batches", default="1,8,32,64")
    p.add_argument("--decode-models", default=",".join(DECODE_MODELS),
                   help="Llama 3.1 sizes whose batch x hidden decode "
                        "all-reduce is swept; '' for none")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--algos", default=",".join(ALGOS),
                   help="JAX_NVRAR_ALGO values run on single-node layouts, "
                        "each optionally as ALGO/BLOCKS (JAX_NVRAR_BLOCKS); "
                        "multi-node layouts run auto and its ALGO/BLOCKS")
    p.add_argument("--layouts", default=None,
                   help=f"NODESxGPUS list (default GPU: 1x2 and every layout "
                        f"of all GPUs, {GPU_LAYOUTS} on 4; CPU {CPU_LAYOUTS})")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per case (default 10, --quick 5, CPU 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs first (default 2, CPU 1)")
    p.add_argument("--unroll", type=int, default=None,
                   help="chained calls unrolled per fori_loop iteration "
                        "(default GPU 32, CPU 1): the host launches each "
                        "iteration's command buffer, which records the "
                        "unrolled calls")
    p.add_argument("--target-ms", type=float, default=40.0,
                   help="aim for runs this long when choosing steps")
    p.add_argument("--steps", type=int, default=0,
                   help="chained calls per program (0: from --target-ms)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for all groups (default 390: with start-up "
                        "and probes the run ends inside 8 minutes); cases "
                        "past it are recorded as skipped")
    p.add_argument("--grace", type=float, default=45.0,
                   help="seconds past a group's budget before it is killed")
    p.add_argument("--quick", action="store_true",
                   help="6 sizes (4K..16M by x8, 64M; on CPU 4K and 64K), "
                        "decode shapes only tag swept sizes, 5 repeats")
    p.add_argument("--out-dir", default=str(H.RESULTS_DIR))
    p.add_argument("--prefix", default=None,
                   help="output file prefix (default allreduce, or "
                        "allreduce_cpu_functional)")
    H.add_driver_args(p)
    # Set by the driver for the processes it launches.
    p.add_argument("--group", default="", help=argparse.SUPPRESS)
    p.add_argument("--group-kind", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    unknown = set(H.parse_list(args.backends)) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    for setting in H.parse_list(args.algos):
        try:
            algo, _ = _tuning.split(setting)
        except ValueError as error:
            p.error(str(error))
        if algo not in ALGOS:
            p.error(f"unknown algo {algo!r}; choose from {ALGOS}, each "
                    f"optionally with /BLOCKS")
    unknown = set(H.parse_list(args.dtypes)) - set(DTYPE_BITS)
    if unknown:
        p.error(f"unknown dtypes {sorted(unknown)}; choose from "
                f"{tuple(DTYPE_BITS)}")
    unknown = set(H.parse_list(args.decode_models)) - set(DECODE_MODELS)
    if unknown:
        p.error(f"unknown decode models {sorted(unknown)}")
    if args.platform == "auto":
        args.platform = "gpu" if args.worker or H.gpu_count() else "cpu"
    cpu = args.platform == "cpu"
    if args.sizes is None:
        args.sizes = ("4K,64K" if cpu else "4K:16M:8,64M") if args.quick \
            else "4K:64M"
    if args.layouts is None:
        args.layouts = ("1x2,1x4,2x2,4x1" if args.quick else CPU_LAYOUTS) \
            if cpu else gpu_layouts(args.gpus or H.gpu_count() or 4)
    if args.repeats is None:
        args.repeats = 2 if cpu else (5 if args.quick else 10)
    if args.warmup is None:
        args.warmup = 1 if cpu else 2
    if args.unroll is None:
        args.unroll = 1 if cpu else 32
    if args.time_budget is None:
        args.time_budget = 390.0
    if args.repeats < 1 or args.warmup < 0 or args.unroll < 1:
        p.error("need --repeats >= 1, --warmup >= 0, --unroll >= 1")
    if args.repeats > 60:
        p.error("--repeats is at most 60")
    H.parse_sizes(args.sizes)
    for t in H.parse_list(args.layouts):
        Layout.parse(t)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    H.dispatch(args, worker=lambda emit, rank0: worker_main(
        args, cpu=False, emit=emit, rank0=rank0),
        under_launcher=direct_under_launcher, cpu=driver_cpu, gpu=driver_gpu)


if __name__ == "__main__":
    main()
