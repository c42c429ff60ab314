"""What allreduce.py measures, and the worker that measures it.

Every process of a group runs ``worker_main``: it builds the cases (series x
message), compiles and times each one, and reduces the per-rank numbers with
one small all-gather per case. The method is described in allreduce.py's
docstring; the pieces here are:

  * ``Layout`` / ``Point`` / ``Series``: a node layout, a message, and one
    line of the plot (backend + algo + layout);
  * ``JaxCase``: the jitted program of one case (checked first call, then a
    chain of dependent all-reduces in a ``fori_loop``);
  * ``run_cases``: lock-step loop over cases on every rank, with a shared
    decision about the time budget (ranks must never disagree on whether
    the next collective runs).
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from pathlib import Path

import _harness as H
from jax_nvrar import _config, _schedule, _tuning

AXIS = "tp"
BACKENDS = ("xla", "xla_ck", "nvshmem4py", "reference", "nvshmem", "auto")
#: JAX_NVRAR_ALGO values: single-node kernel variants ("auto" is labelled
#: plain "nvshmem"). Extend here when the kernel grows a variant.
ALGOS = _config.ALGOS
#: Llama 3.1 hidden sizes: decode all-reduces are batch x hidden.
DECODE_MODELS = {"8B": 4096, "70B": 8192, "405B": 16384}
#: Significand bits (with the implicit one): integers below 2**bits are exact.
DTYPE_BITS = {"bfloat16": 8, "float16": 11, "float32": 24}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


class Layout(_schedule.Layout):
    """The schedule's node layout, named and parsed as NODESxGPUS."""

    @property
    def nodes(self) -> int:
        return self.num_nodes

    @property
    def n(self) -> int:
        return self.size

    @property
    def name(self) -> str:
        return f"{self.nodes}x{self.node_size}"

    @classmethod
    def parse(cls, text: str) -> "Layout":
        try:
            nodes, node_size = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"layout {text!r} is not NODESxGPUS, e.g. 2x2")
        if nodes < 1 or node_size < 1 or nodes * node_size < 2:
            raise ValueError(f"layout {text!r} needs >= 2 GPUs in all")
        return cls(nodes, node_size)


@dataclasses.dataclass(frozen=True)
class Point:
    """One message: ``shape`` of ``dtype`` per rank."""

    dtype: str
    shape: tuple
    decode: tuple = ()  # e.g. ("8B b=32",): decode all-reduces of this size

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * ITEMSIZE[self.dtype]


@dataclasses.dataclass(frozen=True)
class Series:
    backend: str
    layout: Layout
    algo: str = "auto"

    @property
    def label(self) -> str:
        return self.backend if self.algo == "auto" else f"{self.backend}:{self.algo}"


def _np_dtype(name: str):
    import jax.numpy as jnp
    import numpy as np
    return np.dtype(jnp.dtype(name))


def make_points(sizes, dtypes, batches, models, *,
                tag_only: bool = False) -> list[Point]:
    """Swept sizes plus decode shapes (batch x hidden). A decode shape of a
    size already swept tags that point instead of repeating it (the
    all-reduce of a (b, h) array is the all-reduce of b*h elements); with
    ``tag_only`` decode shapes only tag, never add, points."""
    points = []
    for dtype in dtypes:
        itemsize = ITEMSIZE[dtype]
        by_size = {}
        for size in sizes:
            if size % itemsize:
                raise ValueError(f"size {size} is not a multiple of the "
                                 f"{dtype} item size {itemsize}")
            by_size[size] = (size // itemsize,), []
        for model, hidden in models.items():
            for batch in batches:
                size = batch * hidden * itemsize
                if tag_only and size not in by_size:
                    continue
                shape, tags = by_size.setdefault(size, ((batch, hidden), []))
                tags.append(f"{model} b={batch}")
        for size in sorted(by_size):
            shape, tags = by_size[size]
            points.append(Point(dtype, shape, tuple(tags)))
    return points


def points_from_args(args) -> list[Point]:
    return make_points(
        H.parse_sizes(args.sizes), H.parse_list(args.dtypes),
        [int(b) for b in H.parse_list(args.decode_batches)],
        {m: DECODE_MODELS[m] for m in H.parse_list(args.decode_models)},
        tag_only=args.quick)


def group_series(kind: str, layouts, backends, algos) -> list[Series]:
    """The series one group measures, in table order."""
    series = []
    for layout in layouts:
        single = layout.nodes == 1
        if kind == "default":
            if single and "xla" in backends:
                series.append(Series("xla", layout))
            if "reference" in backends:
                series.append(Series("reference", layout))
            if "nvshmem" in backends:
                # JAX_NVRAR_ALGO picks the single-node kernel; hierarchical
                # layouts always run the NVRAR path, where an LL name asks
                # for LL lines within each node and any other for Lamport
                # lines: "auto", its block counts ("auto/8") and the two
                # two-shot names run there.
                hierarchical = [a for a in algos if _tuning.split(a)[0] in
                                ("auto", "twoshot_ll", "twoshot_lamport")]
                for algo in (algos if single else hierarchical or ("auto",)):
                    series.append(Series("nvshmem", layout, algo))
            if "auto" in backends:  # what jax_nvrar.psum's default does
                series.append(Series("auto", layout))
        elif kind in ("xla_ck", "nvshmem4py") and single and kind in backends:
            series.append(Series(kind, layout))
    return series


def chain_modulus(dtype: str, n: int) -> int:
    """Largest odd input bound m (values 1..m) keeping the chain exact:
    partial sums of (y/N + d_r) are multiples of 1/N below (N*m + N/2), so
    N*(N*m + N/2) < 2**bits. Capped at 29 (period coprime to 2**k)."""
    bound = int((2 ** DTYPE_BITS[dtype] / n - n / 2) / n)
    m = max(2, min(29, bound))
    return m - 1 if m % 2 == 0 and m > 3 else m


#: Most chained steps of one program by default. The per-call time of 1x2
#: on 2 H200s (kernel 108425d), 65 / 1025 calls per run: kernel 13.6 / 5.9 us
#: at 32 KB, XLA psum 25.6 / 17.2 us; a run's fixed cost is spread over the
#: calls, so short runs overstate every per-call time.
MAX_STEPS = 2048


def default_steps(nbytes: int, target_ms: float, unroll: int,
                  cpu: bool) -> int:
    """Chained calls per program so one run lasts ~target_ms on H100s
    (estimate 10 us + bytes at 100 GB/s), a multiple of ``unroll``. At
    least 16, so the on-device check costs little per call; at most
    MAX_STEPS."""
    if cpu:
        return 2 * unroll
    estimate_us = 10 + nbytes / 100e3
    steps = math.ceil(target_ms * 1e3 / estimate_us / unroll) * unroll
    return max(math.ceil(16 / unroll) * unroll, min(MAX_STEPS, steps))


# --------------------------------------------------------------------------
# Worker: runs inside each process of a group
# --------------------------------------------------------------------------

def host_input(point: Point, rank: int, m: int):
    """Rank ``rank``'s message: element i is 1 + (7 i + 5 rank) mod m."""
    import numpy as np
    period = 1 + (np.arange(m) * 7 + rank * 5) % m
    return np.resize(period.astype(_np_dtype(point.dtype)),
                     point.count).reshape(point.shape)


def expected_sum(point: Point, n: int, m: int):
    """The exact sum over ranks (float64), what lax.psum returns."""
    import numpy as np
    return sum(host_input(point, r, m).astype(np.float64) for r in range(n))


class JaxCase:
    """Compiles and runs one (series, point) program on a mesh of n devices."""

    def __init__(self, series: Series, point: Point, args, cpu: bool,
                 inputs: dict):
        self.series, self.point, self.args = series, point, args
        self.inputs = inputs  # shared by the cases of one message
        self.n = series.layout.n
        self.m = chain_modulus(point.dtype, self.n)
        self.steps = args.steps or default_steps(
            point.nbytes, args.target_ms, args.unroll, cpu)
        self.chain_checked = self.n & (self.n - 1) == 0

    def _psum(self):
        from jax import lax
        series = self.series
        if series.backend in ("xla", "xla_ck"):
            return lambda x: lax.psum(x, AXIS)
        import jax_nvrar
        return lambda x: jax_nvrar.psum(
            x, AXIS, backend=series.backend,
            node_size=series.layout.node_size)

    def _program(self, mesh):
        import jax
        import jax.numpy as jnp
        from jax import lax
        from jax.sharding import PartitionSpec as P

        psum, n, m, point = self._psum(), self.n, self.m, self.point
        dtype = jnp.dtype(point.dtype)
        scale = jnp.asarray(1.0 / n, dtype)

        def body(x):
            x = x[0]
            y = psum(x)
            index = lax.iota(jnp.int32, point.count).reshape(point.shape) % m
            expected = sum(1 + (index * 7 + r * 5) % m for r in range(n))
            wrong = jnp.sum(y.astype(jnp.float32)
                            != expected.astype(jnp.float32), dtype=jnp.int32)
            delta = jnp.where(lax.axis_index(AXIS) % 2 == 0, 1, -1).astype(dtype)
            start = y * scale + delta
            end = lax.fori_loop(0, self.steps,
                                lambda _, v: psum(v) * scale + delta, start,
                                unroll=self.args.unroll)
            wrong_chain = jnp.sum(end != start, dtype=jnp.int32)
            return jnp.stack([wrong, wrong_chain])[None]

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS),
                                     out_specs=P(AXIS), check_vma=False))

    def run(self):
        """-> (wrong per run, seconds per run, extra fields). Collective:
        every process of the mesh calls it."""
        import jax
        import numpy as np
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = Mesh(np.array(jax.devices()[:self.n]), (AXIS,))
        key = (self.point, self.n)
        if key not in self.inputs:
            self.inputs.clear()  # one message's buffers alive at a time
            self.inputs[key] = jax.make_array_from_callback(
                (self.n,) + self.point.shape, NamedSharding(mesh, P(AXIS)),
                lambda index: host_input(self.point, index[0].start or 0,
                                         self.m)[None])
        x = self.inputs[key]
        algo, blocks = _tuning.split(self.series.algo)
        start = time.perf_counter()
        with _config.override(  # read at trace time
                JAX_NVRAR_ALGO=None if algo == "auto" else algo,
                JAX_NVRAR_BLOCKS=str(blocks) if blocks else None):
            compiled = self._program(mesh).lower(x).compile()
        compile_s = time.perf_counter() - start

        def wrong_counts(out):  # this process's shards, summed
            return np.sum([np.asarray(s.data).reshape(-1)
                           for s in out.addressable_shards], axis=0)

        times, counts = H.time_runs(
            compiled, (x,), warmup=self.args.warmup, repeats=self.args.repeats,
            barrier=H.barrier, keep=wrong_counts)
        wrong = [int(c[0]) + (int(c[1]) if self.chain_checked else 0)
                 for c in counts]
        extra = {"steps": self.steps, "calls": self.steps + 1,
                 "compile_s": round(compile_s, 3),
                 "chain_checked": self.chain_checked, "modulus": self.m}
        return wrong, [t / (self.steps + 1) for t in times], extra


def _record(series: Series, point: Point, **fields) -> dict:
    return {"type": "result", "backend": series.label,
            "base_backend": series.backend, "algo": series.algo,
            "layout": series.layout.name, "nodes": series.layout.nodes,
            "node_size": series.layout.node_size, "nproc": series.layout.n,
            "dtype": point.dtype, "size": point.nbytes, "count": point.count,
            "shape": list(point.shape), "decode": list(point.decode),
            **fields}


def run_cases(cases, make_runner, emit, *, group: str, deadline: float,
              rank0: bool, warmup: int, repeats: int) -> None:
    """Runs cases in lock-step on every process: after each case one small
    all-gather reduces the per-rank results and agrees whether time is left
    (ranks must never disagree about running the next collective)."""
    import numpy as np

    runs = warmup + repeats
    width = 2 + runs + repeats  # the same on every rank, whatever happened
    time_left = True
    for series, point in cases:
        tag = (f"[{group}] {point.dtype} {H.fmt_bytes(point.nbytes):>5} "
               f"{series.layout.name} {series.label}")
        if not time_left:
            if rank0:
                emit(_record(series, point, status="skipped",
                             reason="time budget spent (--time-budget)"))
            continue
        if rank0:
            emit({"type": "begin", "case": tag})
        wrong, times, extra, error = [], [], {}, None
        try:
            wrong, times, extra = make_runner(series, point).run()
        except Exception as exc:  # recorded per case; the sweep goes on
            error = f"{type(exc).__name__}: {exc}"
            H.log(f"{tag}: {error}\n{traceback.format_exc(limit=4)}")
        # Fixed width on every rank: ok flag, time-left flag, #wrong of each
        # run (warm-up included), then each timed run's seconds per call.
        good = (error is None and len(wrong) == runs
                and len(times) == repeats)
        row = [float(good), float(time.time() < deadline)]
        row += (list(wrong) + [t * 1e6 for t in times]) if good else []
        rows = H.gather_rows(row + [math.nan] * (width - len(row)))
        time_left = bool(rows[:, 1].min() > 0)
        if not rank0:
            continue
        if rows[:, 0].min() < 1 or not good:
            emit(_record(series, point, status="error",
                         reason=error or "failed on another rank"))
            continue
        wrong_runs = rows[:, 2:2 + runs].sum(axis=0)
        per_rank = rows[:, 2 + runs:]
        time_s, maxima = H.median_of_max(per_rank.tolist())
        time_s *= 1e-6
        algbw, busbw = H.bandwidths(point.nbytes, time_s, series.layout.n)
        record = _record(
            series, point, status="ok", time_us=time_s * 1e6,
            times_us=[round(float(t), 3) for t in maxima],
            algbw=algbw, busbw=busbw, wrong=int(np.max(wrong_runs)),
            wrong_first=int(wrong_runs[0]), repeats=repeats, **extra)
        emit(record)
        H.log(f"{tag}: {record['time_us']:9.2f} us  busbw "
              f"{busbw:7.2f} GB/s  #wrong {record['wrong']}"
              f"  (compile {extra.get('compile_s', 0):.1f} s)")


#: Bytes per device of the link-bandwidth pass (GPU; CPU runs use 1 MiB).
LINK_BYTES = 256 << 20


def link_bandwidth(n: int, nbytes: int, *, repeats: int = 5,
                   warmup: int = 2) -> dict:
    """GB/s one device moves to its neighbour: 4n + 1 chained ring shifts
    (``lax.ppermute`` by one position, NCCL send/recv on GPUs) of ``nbytes``
    per device in one program, the slowest rank per run, the median of
    ``repeats`` runs, each continuing from the last one's output. The
    reference busbw is compared with: an all-reduce's bus bandwidth cannot
    exceed what one link carries. Where every block ends up is checked.
    Collective: every process calls it."""
    import jax
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
    count = nbytes // 4
    x = jax.make_array_from_callback(
        (n, count), NamedSharding(mesh, P(AXIS)),
        lambda index: np.full((1, count), 1 + (index[0].start or 0), np.float32))
    perm = [(i, (i + 1) % n) for i in range(n)]
    shifts = 4 * n + 1

    def body(v):
        return lax.fori_loop(0, shifts, lambda _, w: lax.ppermute(w, AXIS, perm), v)

    # Each run shifts the last run's output in place (donated), so no run
    # allocates: on 2 H200s, runs each writing a new 256 MiB output measured
    # 208-212 GB/s while earlier outputs were kept, and 48-91 GB/s when each
    # was freed before the next run (cause not established).
    program = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS),
                                    out_specs=P(AXIS)),
                      donate_argnums=0).lower(x).compile()
    state = [x]

    def shift():
        state[0] = program(state[0])
        return state[0]

    times, _ = H.time_runs(shift, (), warmup=warmup, repeats=repeats, barrier=H.barrier)
    # After k shifts device i holds device (i - k) mod n's block.
    moved = (warmup + repeats) * shifts
    for s in state[0].addressable_shards:
        if not np.all(np.asarray(s.data) == 1 + ((s.index[0].start or 0) - moved) % n):
            raise RuntimeError("link-bandwidth pass: ppermute moved wrong data")
    per_shift, _ = H.median_of_max(H.gather_rows([t / shifts for t in times]).tolist())
    return {"nproc": n, "bytes": nbytes, "shifts": shifts, "repeats": repeats,
            "seconds_per_shift": per_shift, "gbps": nbytes / per_shift / 1e9,
            "method": f"lax.ppermute ring shift by one of {nbytes} bytes per "
                      f"device, {shifts} chained per program, slowest rank, "
                      f"median of {repeats} runs, each shifting the last one's "
                      f"output in place"}


def worker_main(args, *, cpu: bool, emit, rank0: bool) -> None:
    """Measures one group's series. On GPU the launcher has started
    jax.distributed; NVSHMEM must start before JAX's first allocation."""
    layouts = [Layout.parse(t) for t in H.parse_list(args.layouts)]
    backends = set(H.parse_list(args.backends))
    algos = tuple(H.parse_list(args.algos))
    kind = args.group_kind
    series = group_series(kind, layouts, backends, algos)
    skipped = []

    nvshmem_ok, nvshmem_reason = False, None
    if any(s.backend in ("nvshmem", "auto") for s in series):
        if cpu:
            nvshmem_reason = ("functional CPU run: the NVSHMEM kernel needs "
                              "CUDA GPUs (one process per GPU)")
        else:
            nvshmem_reason = H.start_nvshmem()
            nvshmem_ok = nvshmem_reason is None

    import jax
    env = H.device_env()
    n_devices = jax.device_count()
    if kind == "nvshmem4py":
        import _nvshmem4py
        runner_cls, nv4py_reason = _nvshmem4py.start()
        if runner_cls is None:
            skipped += [{"backend": s.label, "layout": s.layout.name,
                         "reason": nv4py_reason} for s in series]
            series = []
    runnable = []
    for s in series:
        if s.backend in ("nvshmem", "auto") and not nvshmem_ok:
            skipped.append({"backend": s.label, "layout": s.layout.name,
                            "reason": nvshmem_reason})
        elif s.layout.n > n_devices or (not cpu and s.layout.n != n_devices):
            skipped.append({"backend": s.label, "layout": s.layout.name,
                            "reason": f"needs {s.layout.n} devices; this "
                                      f"group has {n_devices}"})
        else:
            runnable.append(s)
    if rank0:
        emit({"type": "env", "group": args.group, "device": env,
              "jax_nvrar": _jax_nvrar_info(), "skipped": skipped})
    if kind == "default":
        for n_link in sorted({s.layout.n for s in runnable}):
            link = link_bandwidth(n_link, (1 << 20) if cpu else LINK_BYTES)
            if rank0:
                emit({"type": "link", "group": args.group, **link})

    points = points_from_args(args)
    # Order: dtype, size, layout, backend -- a budget cut loses the largest
    # sizes of the last dtype, never a whole backend.
    cases = [(s, p) for p in points for s in runnable]

    inputs = {}

    def make_runner(s, p):
        if s.backend == "nvshmem4py":
            return runner_cls(s, p, args)
        return JaxCase(s, p, args, cpu, inputs)

    run_cases(cases, make_runner, emit, group=args.group,
              deadline=args.deadline, rank0=rank0, warmup=args.warmup,
              repeats=args.repeats)
    if nvshmem_ok:
        import jax_nvrar
        H.barrier("jax_nvrar_bench_end")
        jax_nvrar.finalize()
    if kind == "nvshmem4py" and series:
        _nvshmem4py.stop()
    if rank0:
        emit({"type": "end"})


def _jax_nvrar_info() -> dict:
    try:
        import jax_nvrar
        return {"version": getattr(jax_nvrar, "__version__", None),
                "path": str(Path(jax_nvrar.__file__).parent)}
    except ImportError as exc:
        return {"error": repr(exc)}
