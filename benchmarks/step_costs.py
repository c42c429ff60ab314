"""Where the per-call time of a chained all-reduce goes (GPU, one process per
GPU; bfloat16). Run under the launcher::

    python -m jax_nvrar.launch --nproc-per-node 4 benchmarks/step_costs.py

Each row is a jitted chain of 64 calls on every rank; the time is the median
of 7 runs over 64 (rank 0's clock). Rows:

  * ``fusion only``: ``v <- v / 4 + d`` behind an optimization barrier, the
    elementwise kernel the all-reduce benchmark puts between calls;
  * ``xla fused``: ``v <- psum(v) / 4 + d`` with XLA's psum (NCCL);
  * ``VARIANT bare``: ``v <- psum(v)`` with the kernel (XLA cannot fold a
    custom call, so no elementwise kernel is needed to keep calls distinct);
    the input is 2**-100, so 64 products by 4 stay finite and exact;
  * ``VARIANT fused``: as ``xla fused``, with the kernel;
  * ``oneshot_ll nowait``: LL one-shot with JAX_NVRAR_FAULT_INJECT=1 (data
    used without waiting for peers; results wrong): the kernel's cost
    without its wait.

Markdown on stdout (rank 0), progress on stderr.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_nvrar
from jax_nvrar import _config

CALLS = 64
SIZES = (4096, 32768, 131072, 262144, 524288)
VARIANTS = ("oneshot_lamport", "twoshot_lamport", "oneshot_ll")


def chain(mesh, reduce, mode):
    def body(v):
        d = jnp.where(lax.axis_index("tp") % 2 == 0, 1, -1).astype(v.dtype)
        for _ in range(CALLS):
            if mode == "fusion":
                v = lax.optimization_barrier(v * 0.25 + d)
            elif mode == "bare":
                v = reduce(v)
            else:
                v = reduce(v) * 0.25 + d
        return v
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tp"),
                                 out_specs=P("tp"), check_vma=False))


def per_call_us(compiled, x):
    for _ in range(3):
        compiled(x).block_until_ready()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        compiled(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / CALLS * 1e6


def main():
    jax_nvrar.initialize()
    n = jax.process_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("tp",))
    xla = lambda v: lax.psum(v, "tp")  # noqa: E731
    kernel = lambda v: jax_nvrar.psum(v, "tp", backend="nvshmem")  # noqa: E731
    cases = [("fusion only", None, "fusion", "auto", "0"),
             ("xla fused", xla, "fused", "auto", "0")]
    for variant in VARIANTS:
        cases += [(f"{variant} bare", kernel, "bare", variant, "0"),
                  (f"{variant} fused", kernel, "fused", variant, "0")]
    cases.append(("oneshot_ll nowait", kernel, "bare", "oneshot_ll", "1"))
    rows = []
    for size in SIZES:
        x = jax.device_put(jnp.full((n, size // 2), 2.0**-100, jnp.bfloat16),
                           NamedSharding(mesh, P("tp")))
        for name, reduce, mode, algo, fault in cases:
            with _config.override(JAX_NVRAR_ALGO=algo, JAX_NVRAR_FAULT_INJECT=fault):
                compiled = chain(mesh, reduce, mode).lower(x).compile()
            rows.append((size, name, per_call_us(compiled, x)))
            if jax.process_index() == 0:
                print(f"{size:8} {name:24} {rows[-1][2]:7.2f} us",
                      file=sys.stderr, flush=True)
    if jax.process_index() == 0:
        print(f"# per-call time, chains of {CALLS}, {n} x "
              f"{jax.devices()[0].device_kind}, bfloat16\n")
        print("| size (B) | chain | us per call |\n|---:|---|---:|")
        for size, name, us in rows:
            print(f"| {size} | {name} | {us:.2f} |")
    jax_nvrar.finalize()


if __name__ == "__main__":
    main()
