"""The GPU correctness suite of backend="nvshmem", one process per GPU.

    python -m jax_nvrar.launch --nproc-per-node 4 tests/gpu_suite.py
    python -m jax_nvrar.launch --nproc-per-node 2 tests/gpu_suite.py --quick

Every check compares the kernel with ``lax.psum`` (integer-valued inputs,
exact) and with the reference backend (random inputs, bitwise: the kernel and
the reference add in the same order). Outputs are checked on every rank and
for identical bits across ranks. Rank 0 prints one line per check and a
summary; the exit code is the number of failed checks (capped at 100).
tests/test_gpu.py runs this under pytest where GPUs exist.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_nvrar
from jax_nvrar import _config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}
# Elements per device: 1 element to 8 MB of bf16, odd sizes included.
SIZES = [1, 3, 7, 8, 33, 1000, 4095, 65537, 262144, 1 << 20, 4 << 20]
QUICK_SIZES = [1, 7, 4095, 65537, 1 << 20]
ALGOS = [algo for algo in _config.ALGOS if algo != "auto"]


class Suite:
    def __init__(self, quick: bool):
        self.quick = quick
        self.rank = jax.process_index()
        self.n = jax.process_count()
        self.failures: list[str] = []
        self.count = 0

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def check(self, name: str, fn) -> None:
        self.count += 1
        start = time.perf_counter()
        try:
            problem = fn()
        except Exception:  # a check that raises has failed; keep going
            problem = traceback.format_exc(limit=4)
        # A check fails if it failed on any rank.
        failed = multihost_utils.process_allgather(
            np.int32(problem is not None)).max()
        status = "FAIL" if failed else "ok"
        self.log(f"{status:4} {name} ({time.perf_counter() - start:.1f} s)")
        if problem is not None:
            print(f"[rank {self.rank}] {name}: {problem}", file=sys.stderr,
                  flush=True)
        if failed:
            self.failures.append(name)


def mesh_1d(n):
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("tp",))


def put(mesh, spec, make):
    """A global array whose shard on each device comes from make(index)."""
    sharding = NamedSharding(mesh, spec)
    shape = make(None)
    return jax.make_array_from_callback(
        shape, sharding, lambda idx: make(idx))


def integer_valued(shape, dtype, seed):
    values = np.random.default_rng(seed).integers(-16, 17, shape)
    values[values == 0] = 5
    return values.astype(np.float32).astype(dtype)


def run(mesh, fn, x, in_spec=P("tp"), out_spec=P("tp"), check_vma=False):
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_spec,
                              out_specs=out_spec, check_vma=check_vma))
    return f(x)


def local_rows(y):
    """This process's shards, as numpy arrays."""
    shards = [np.asarray(s.data) for s in y.addressable_shards]
    return shards


def compare(got, want, *, bitwise):
    for a, b in zip(local_rows(got), local_rows(want)):
        if a.shape != b.shape:
            return f"shape {a.shape} != {b.shape}"
        if bitwise:
            same = a.view(np.uint8) == b.view(np.uint8)
        else:
            same = a.astype(np.float64) == b.astype(np.float64)
        if not same.all():
            bad = np.flatnonzero(~same.reshape(-1))
            return (f"{bad.size} of {same.size} elements differ, first at "
                    f"{bad[:5].tolist()}")
    return None


def identical_across_ranks(y):
    bits = np.concatenate([r.reshape(-1).view(np.uint8)
                           for r in local_rows(y)])
    every = multihost_utils.process_allgather(bits)
    if not (every == every[:1]).all():
        return "ranks disagree on the result bits"
    return None


def global_array(mesh, dtype, count, seed, *, integer=True):
    n = mesh.devices.size

    def make(idx):
        if idx is None:
            return (n, count)
        rows = range(n)[idx[0]]
        rng_rows = []
        for r in rows:
            if integer:
                rng_rows.append(integer_valued((count,), dtype, seed * 97 + r))
            else:
                rng_rows.append(np.random.default_rng(seed * 97 + r)
                                .standard_normal(count).astype(dtype))
        return np.stack(rng_rows)

    return put(mesh, P("tp"), make)


def kernel_settings(algo="auto", fault="0", blocks=0, inter="auto"):
    """The variant, block count (0: the table's or the kernel's rule),
    inter-node transport and fault switch for the programs traced inside."""
    return _config.override(JAX_NVRAR_ALGO=algo, JAX_NVRAR_FAULT_INJECT=fault,
                            JAX_NVRAR_BLOCKS=str(blocks),
                            JAX_NVRAR_INTER_NODE=inter)


def inter_label(inter):
    return ", inter-node puts" if inter == "put" else ""


def check_sizes(suite, n, node_size, dtype_name, algo="auto", blocks=0,
                inter="auto"):
    mesh = mesh_1d(n)
    dtype = DTYPES[dtype_name]
    sizes = QUICK_SIZES if suite.quick else SIZES

    def body():
        with kernel_settings(algo, blocks=blocks, inter=inter):
            return sweep()

    def sweep():
        for count in sizes:
            for seed, integer in ((count, True), (count + 1, False)):
                x = global_array(mesh, dtype, count, seed, integer=integer)
                ours = run(mesh, lambda v: jax_nvrar.psum(
                    v, "tp", backend="nvshmem", node_size=node_size), x)
                if integer:
                    want = run(mesh, lambda v: lax.psum(v, "tp"), x)
                else:  # same summation order as the kernel: same bits
                    want = run(mesh, lambda v: jax_nvrar.psum(
                        v, "tp", backend="reference", node_size=node_size), x)
                problem = (compare(ours, want, bitwise=not integer)
                           or identical_across_ranks(ours))
                if problem:
                    return f"count={count} integer={integer}: {problem}"
        return None

    grid = f", {blocks} blocks" if blocks else ""
    suite.check(f"{n} PEs, {n // node_size}x{node_size}, {dtype_name}, "
                f"algo {algo}{grid}{inter_label(inter)}, {len(sizes)} sizes x "
                "(integer, random)", body)


def check_stale_outputs(suite, n, node_size):
    """Unwritten output elements show: a poison array is freed just before,
    so the allocator hands its memory to the result, and consecutive calls
    with different inputs expose any element left from the previous call."""
    mesh = mesh_1d(n)

    def body():
        f = jax.jit(jax.shard_map(
            lambda v: jax_nvrar.psum(v, "tp", backend="nvshmem",
                                     node_size=node_size),
            mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))
        for seed in range(4):
            x = global_array(mesh, jnp.bfloat16, 300007, 1000 + seed)
            poison = jnp.full((n, 300007), 7777, jnp.bfloat16,
                              device=NamedSharding(mesh, P("tp")))
            poison.block_until_ready()
            del poison
            problem = compare(f(x), run(mesh, lambda v: lax.psum(v, "tp"), x),
                              bitwise=False)
            if problem:
                return f"call {seed}: {problem}"
        return None

    suite.check(f"{n} PEs, {n // node_size}x{node_size}: poisoned and "
                "consecutive outputs", body)


def check_many_calls(suite, n, node_size, calls, algo="auto", inter="auto"):
    """Back-to-back calls in one program: sequence numbers and buffer reuse.
    Each step stays integer-valued and small, so results are exact."""
    mesh = mesh_1d(n)

    def loop(reduce, kind):
        def per_device(v):
            def step(c):
                return reduce(c) % 61 - 30 + lax.axis_index("tp")
            if kind == "fori":
                return lax.fori_loop(0, calls, lambda i, c: step(c), v)
            return lax.scan(lambda c, _: (step(c), None), v, None,
                            length=calls)[0]
        return per_device

    def body():
        with kernel_settings(algo, inter=inter):
            return loops()

    def loops():
        x = global_array(mesh, jnp.float32, 5003, 77)
        for kind in ("fori", "scan"):
            ours = run(mesh, loop(lambda c: jax_nvrar.psum(
                c, "tp", backend="nvshmem", node_size=node_size), kind), x)
            want = run(mesh, loop(lambda c: lax.psum(c, "tp"), kind), x)
            problem = compare(ours, want, bitwise=False)
            if problem:
                return f"{kind}: {problem}"
        return None

    suite.check(f"{n} PEs, {n // node_size}x{node_size}, algo {algo}"
                f"{inter_label(inter)}: {calls} back-to-back calls in "
                "fori_loop and scan", body)


def check_two_axis_mesh(suite):
    if suite.n != 4:
        return
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2),
                             ("dp", "tp"))

    def body():
        for axes in ("tp", "dp", ("dp", "tp")):
            for node_size in (1, 2) if axes != ("dp", "tp") else (1, 2, 4):
                def make(idx, shape=(2, 2, 4099)):
                    if idx is None:
                        return shape
                    full = integer_valued(shape, jnp.bfloat16, 5)
                    return full[idx]
                x = put(mesh, P("dp", "tp"), make)
                spec = P("dp", "tp")
                ours = run(mesh, lambda v: jax_nvrar.psum(
                    v, axes, backend="nvshmem", node_size=node_size), x,
                    in_spec=spec, out_spec=spec)
                want = run(mesh, lambda v: lax.psum(v, axes), x,
                           in_spec=spec, out_spec=spec)
                problem = compare(ours, want, bitwise=False)
                if problem:
                    return f"axes={axes} node_size={node_size}: {problem}"
        return None

    suite.check("2x2 ('dp','tp') mesh: psum over tp, dp and both", body)


def check_typed_like_psum(suite, n):
    """check_vma=True: the output is invariant, as psum's is."""
    mesh = mesh_1d(n)

    def body():
        x = global_array(mesh, jnp.bfloat16, 1025, 3)
        ours = run(mesh, lambda v: jax_nvrar.psum(v, "tp", backend="nvshmem"),
                   x, out_spec=P(), check_vma=True)
        want = run(mesh, lambda v: lax.psum(v, "tp"), x, out_spec=P(),
                   check_vma=True)
        return compare(ours, want, bitwise=False)

    suite.check(f"{n} PEs: check_vma=True, out_specs=P()", body)


def check_auto(suite, n):
    mesh = mesh_1d(n)

    def body():
        x = global_array(mesh, jnp.bfloat16, 8193, 11)
        f = jax.shard_map(lambda v: jax_nvrar.psum(v, "tp"), mesh=mesh,
                          in_specs=P("tp"), out_specs=P("tp"), check_vma=False)
        text = jax.jit(f).lower(x).as_text()
        if "nvrar_allreduce" not in text:
            return "backend='auto' did not pick the kernel on GPU"
        return compare(jax.jit(f)(x), run(mesh, lambda v: lax.psum(v, "tp"), x),
                       bitwise=False)

    suite.check(f"{n} PEs: backend='auto' uses the kernel", body)


def check_negative_control(suite, n, node_size, algo="auto", fault="1",
                           inter="auto", count=1 << 20):
    """With arrivals not awaited (fault 1: flags ignored, Lamport lines read
    without waiting; fault 2: only inter-node lines and signals), results
    must go wrong: proof that the comparisons above can fail and that the
    arrival checks carry the protocol."""
    mesh = mesh_1d(n)

    def body():
        wrong = 0
        with kernel_settings(algo, fault=fault, inter=inter):
            for seed in range(3):
                x = global_array(mesh, jnp.float32, count, 500 + seed)
                ours = run(mesh, lambda v: jax_nvrar.psum(
                    v, "tp", backend="nvshmem", node_size=node_size), x)
                want = run(mesh, lambda v: lax.psum(v, "tp"), x)
                wrong += compare(ours, want, bitwise=False) is not None
        flags = multihost_utils.process_allgather(np.int32(wrong))
        if flags.max() == 0:
            return "ignoring arrivals went unnoticed: the checks have no teeth"
        return None

    ignored = "arrivals" if fault == "1" else "inter-node arrivals"
    suite.check(f"{n} PEs, {n // node_size}x{node_size}, algo {algo}"
                f"{inter_label(inter)}, {4 * count >> 10} KiB: negative control "
                f"({ignored} ignored -> wrong results)", body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--only", default="",
                        help="comma-separated check groups to run")
    args = parser.parse_args()
    jax_nvrar.initialize()
    suite = Suite(args.quick)
    n = suite.n
    if n < 2:  # psum over one device is the identity: the kernel never runs
        suite.log("GPU suite: needs 2 or more processes, one per GPU; with 1 "
                  "no all-reduce reaches the kernel")
        jax_nvrar.finalize()
        return 2
    suite.log(f"GPU suite: {n} processes, {jax.devices()[0].device_kind}, "
              f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    # Node sizes: every divisor of n (4 PEs: 1x4 2x2 4x1; 8: 1x8 2x4 4x2 8x1).
    layouts = [g for g in range(n, 0, -1) if n % g == 0]
    groups = set(filter(None, args.only.split(","))) or {
        "sizes", "stale", "calls", "mesh", "vma", "auto", "negative"}
    for node_size in layouts:
        if "sizes" in groups:
            for dtype_name in DTYPES:
                check_sizes(suite, n, node_size, dtype_name)
            # A small odd grid: several vectors per thread, uneven slices.
            check_sizes(suite, n, node_size, "bfloat16", blocks=3)
            if node_size == n:  # the single-node variants, each forced
                for algo in ALGOS:
                    check_sizes(suite, n, node_size, "bfloat16", algo)
                    check_sizes(suite, n, node_size, "bfloat16", algo, blocks=3)
            else:  # several nodes: each line format, the put transport
                for algo in ("twoshot_ll", "twoshot_lamport"):
                    check_sizes(suite, n, node_size, "bfloat16", algo)
                check_sizes(suite, n, node_size, "bfloat16", inter="put")
                check_sizes(suite, n, node_size, "bfloat16", blocks=3,
                            inter="put")
        if "stale" in groups:
            check_stale_outputs(suite, n, node_size)
        if "calls" in groups:
            check_many_calls(suite, n, node_size, args.calls)
            if node_size == n:
                for algo in ("oneshot_lamport", "twoshot_lamport"):
                    check_many_calls(suite, n, node_size, args.calls, algo)
            else:
                check_many_calls(suite, n, node_size, args.calls, "twoshot_ll")
                check_many_calls(suite, n, node_size, args.calls, inter="put")
    if "mesh" in groups:
        check_two_axis_mesh(suite)
    if "vma" in groups:
        check_typed_like_psum(suite, n)
    if "auto" in groups:
        check_auto(suite, n)
    if "negative" in groups:
        for algo in ["auto"] + ALGOS:
            check_negative_control(suite, n, layouts[0], algo)
        if len(layouts) > 1:  # several nodes: the inter-node waits alone
            # 4 MiB messages take puts between nodes; 256 KiB ones LL
            # lines where the partner is reachable (JAX_NVRAR_INTER_NODE).
            for inter, count in (("auto", 1 << 16), ("auto", 1 << 20),
                                 ("put", 1 << 20)):
                check_negative_control(suite, n, layouts[1], fault="2",
                                       inter=inter, count=count)
            check_negative_control(suite, n, layouts[1], "twoshot_ll",
                                   fault="2")
    suite.log(f"{suite.count - len(suite.failures)} passed, "
              f"{len(suite.failures)} failed")
    jax_nvrar.finalize()
    return min(len(suite.failures), 100)


if __name__ == "__main__":
    sys.exit(main())
