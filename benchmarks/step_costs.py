"""Where the per-call time of a chained all-reduce goes (one process per GPU;
bfloat16 on GPUs, float32 on simulated CPU devices). Run under the launcher::

    python -m jax_nvrar.launch --nproc-per-node 4 benchmarks/step_costs.py --trace

Each row is a jitted chain of ``--calls`` calls on every rank; the time is the
median of ``--repeats`` runs over the number of calls (rank 0's clock), so it
holds the host's share of a run (dispatch, command-buffer updates, the final
synchronisation) spread over the calls. Rows:

  * ``fusion only``: ``v <- v / 4 + d`` behind an optimization barrier, the
    elementwise kernel the all-reduce benchmark puts between calls;
  * ``xla fused``: ``v <- psum(v) / 4 + d`` with XLA's psum (NCCL);
  * ``VARIANT bare``: ``v <- psum(v)`` with the kernel (XLA cannot fold a
    custom call, so no elementwise kernel is needed to keep calls distinct);
    the input is 2**-100, so the products by the device count stay finite
    and exact (the script refuses chains long enough to overflow);
  * ``VARIANT fused``: as ``xla fused``, with the kernel;
  * ``oneshot_ll nowait``: LL one-shot with JAX_NVRAR_FAULT_INJECT=1 (data
    used without waiting for peers; results wrong): the kernel's cost
    without its wait;
  * ``empty bare`` and ``empty fused``: JAX_NVRAR_FAULT_INJECT=3, the kernel
    returning at its first instruction (output unwritten): what the custom
    call costs in the chain however little its kernel does.

``--trace`` runs each chain twice more under the profiler and splits rank 0's
per-call time in the second of those runs (the first absorbs the processes'
skew in starting the profiler) into device time (first op start to last op
end, over the calls), the ops' own time by kind (all-reduce, fusion) and the
gaps between them; wall minus device time is the host's share. Without GPUs the kernel
rows run the reference backend on simulated devices (a check of the script,
not a measurement).

Markdown on stdout (rank 0), progress on stderr, ``--json`` for the rows.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

VARIANTS = "oneshot_lamport,twoshot_lamport,oneshot_ll"


def chain(mesh, reduce, mode: str, calls: int):
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    def body(v):
        d = jnp.where(lax.axis_index("tp") % 2 == 0, 1, -1).astype(v.dtype)  # +1 even ranks, -1 odd
        for _ in range(calls):
            if mode == "fusion":
                v = lax.optimization_barrier(v * 0.25 + d)
            elif mode == "bare":
                v = reduce(v)
            else:
                v = reduce(v) * 0.25 + d
        return v
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tp"),
                                 out_specs=P("tp"), check_vma=False))


def cases(variants: list[str], kernel_backend: str, nowait: bool) -> list[tuple]:
    """(name, backend or None, mode, variant, fault switch)."""
    out = [("fusion only", None, "fusion", "auto", "0"),
           ("xla fused", "xla", "fused", "auto", "0")]
    for variant in variants:
        out += [(f"{variant} bare", kernel_backend, "bare", variant, "0"),
                (f"{variant} fused", kernel_backend, "fused", variant, "0")]
    if nowait:
        out += [("oneshot_ll nowait", kernel_backend, "bare", "oneshot_ll", "1"),
                ("empty bare", kernel_backend, "bare", "oneshot_lamport", "3"),
                ("empty fused", kernel_backend, "fused", "oneshot_lamport", "3")]
    return out


def second_run(events: list) -> list:
    """The events of the second of two identical traced runs. The processes start
    the profiler at different times, so the first run's calls wait for the last
    process to start; the first run's last all-reduce lines them up for the
    second."""
    ordered = sorted(events, key=lambda e: e[2])
    return ordered[len(ordered) // 2:]


def device_split(events, calls: int) -> dict:
    """Per call, from one process's trace of one chain: device time (first op
    start to last op end), the ops' own time by kind, and the gaps."""
    from step_profile import summarize

    if not events:
        return {"device_us": float("nan")}
    first = min(start for _, _, start in events)
    last = max(start + us * 1e3 for _, us, start in events)
    by_kind = {r["category"]: r["us_per_step"]
               for r in summarize(events, calls, (last - first) / 1e3)["rows"]}
    return {"device_us": by_kind.pop("wall (host clock)"),
            "busy_us": by_kind.pop("busy (sum of op times)"),
            "gaps_us": by_kind.pop("gaps (wall - busy)"), "ops_us": by_kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4K,32K,128K,256K,512K", help="message sizes per rank")
    p.add_argument("--variants", default=VARIANTS, help="kernel variants (comma-separated)")
    p.add_argument("--calls", type=int, default=64, help="calls per chain")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per chain (median)")
    p.add_argument("--no-nowait", action="store_true", help="skip the fault-switch rows")
    p.add_argument("--trace", action="store_true", help="split each row by a device trace")
    p.add_argument("--cpu-devices", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        p.error("--calls and --repeats must be >= 1")
    if args.trace:
        H.profile_command_buffers()
    on_gpu = H.start_backend("step_costs", nvshmem=True, cpu_devices=args.cpu_devices)
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_nvrar
    from jax_nvrar import _config
    from step_profile import traced

    n = jax.device_count()
    # A bare chain multiplies by n at every call, from 2**-100: keep below 2**100.
    if args.calls * math.log2(max(n, 2)) > 200:
        sys.exit(f"step_costs: --calls {args.calls} on {n} devices would overflow the bare chains "
                 f"(at most {int(200 / math.log2(max(n, 2)))})")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("tp",))
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    kernel_backend = "nvshmem" if on_gpu else "reference"
    reducers = {"xla": lambda v: lax.psum(v, "tp"),
                kernel_backend: lambda v: jax_nvrar.psum(v, "tp", backend=kernel_backend)}
    rows = []
    for size in H.parse_sizes(args.sizes):
        x = jax.device_put(jnp.full((n, size // jnp.dtype(dtype).itemsize), 2.0**-100, dtype),
                           NamedSharding(mesh, P("tp")))
        for name, backend, mode, algo, fault in cases(H.parse_list(args.variants), kernel_backend,
                                                      on_gpu and not args.no_nowait):
            with _config.override(JAX_NVRAR_ALGO=algo, JAX_NVRAR_FAULT_INJECT=fault):
                compiled = chain(mesh, reducers.get(backend), mode, args.calls).lower(x).compile()
            H.barrier("jax_nvrar_step_costs")
            times, _ = H.time_runs(compiled, (x,), warmup=3, repeats=args.repeats)
            row = {"size": size, "chain": name, "wall_us": float(np.median(times)) / args.calls * 1e6}
            if args.trace:
                events, _, _ = traced(lambda: [compiled(x).block_until_ready() for _ in range(2)])
                row.update(device_split(second_run(events), args.calls))
            rows.append(row)
            if jax.process_index() == 0:
                extra = (f", device {row['device_us']:.2f} us, gaps {row['gaps_us']:.2f} us"
                         if "gaps_us" in row else "")
                H.log(f"{size:8} {name:24} {row['wall_us']:7.2f} us per call{extra}")
    if jax.process_index() == 0:
        print(report(rows, args.calls, n, jax.devices()[0].device_kind, np.dtype(dtype).name))
        if args.json:
            H.write_json(Path(args.json), {"kind": H.MEASURED if on_gpu else "functional",
                                           "env": H.host_env(), "calls": args.calls,
                                           "devices": n, "device_kind": jax.devices()[0].device_kind,
                                           "rows": rows})
    jax_nvrar.finalize()
    return 0


def report(rows, calls: int, n: int, kind: str, dtype: str) -> str:
    lines = [f"# Per-call time, chains of {calls}, {n} x {kind}, {dtype}", ""]
    traced_rows = any("device_us" in r for r in rows)
    if not traced_rows:
        lines += ["| size (B) | chain | us per call |", "|---:|---|---:|"]
        lines += [f"| {r['size']} | {r['chain']} | {r['wall_us']:.2f} |" for r in rows]
        return "\n".join(lines)
    lines += ["Device: first op start to last op end of the second of two traced runs, per call; "
              "host = wall - "
              "device. Op times per call by kind; gaps = device - op times. Ops on several streams "
              "(or, on CPU, of several simulated devices) overlap and are summed.", "",
              "| size (B) | chain | wall | device | host | all-reduce ops | fusions | other ops | gaps |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ops = r.get("ops_us", {})
        ar = ops.get("all-reduce", 0.0)
        fusion = ops.get("fusion (other)", 0.0)
        other = sum(ops.values()) - ar - fusion
        lines.append(f"| {r['size']} | {r['chain']} | {r['wall_us']:.2f} | {r['device_us']:.2f} | "
                     f"{r['wall_us'] - r['device_us']:.2f} | {ar:.2f} | {fusion:.2f} | {other:.2f} | "
                     f"{r.get('gaps_us', float('nan')):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
