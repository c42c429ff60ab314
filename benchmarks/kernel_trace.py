"""Where a chained call's time goes, from the kernel's own clock (GPUs only).

    JAX_NVRAR_NVCC_FLAGS=-DJAX_NVRAR_TRACE=1 pip install --no-build-isolation --no-deps -e .
    python -m jax_nvrar.launch --nproc-per-node 4 benchmarks/kernel_trace.py --json T.json

With the extension built with ``-DJAX_NVRAR_TRACE``, block 0 of every launch
records the GPU's global timer at entry, once its sends are issued, once its
last wait is over and at exit (csrc/allreduce.cu, "tracing"; the middle two
in the Lamport variants only). This script runs allreduce.py's chain
(``v <- psum(v) / n + d`` in a ``fori_loop`` of ``--steps`` calls, 32
unrolled) at each size, reads the trace of the timed runs and reports per
rank the medians over calls of

  * entry -> sent: the kernel's start-up and its sends (own input loaded,
    stores to peers issued);
  * sent -> waited: waiting for and summing the peers' data (their latency,
    and how much later than this GPU they started);
  * waited -> exit: block 0's last stores;
  * exit -> next entry: everything outside the kernel between two calls
    (XLA's graph nodes, the elementwise kernel);
  * entry spread: this rank's entry minus the earliest rank's entry of the
    same call, meaningful only as far as the GPUs' global timers agree (on
    the 4xH100 machine of benchmarks/results/kernel_trace.md they did not:
    constant offsets of 5-310 us).

"wall per call" is this rank's run time over the calls: it holds each run's
host dispatch and final synchronisation spread over --steps calls, so it is
larger than allreduce.py's time for the same chain (which sizes its runs by
time).

Block 0 stands for the launch: other blocks may end a little later. The
sum of the first four is the per-call time as the device sees it.
Markdown on stdout (rank 0), ``--json`` for the rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

PARTS = ("entry_to_sent_us", "sent_to_waited_us", "waited_to_exit_us", "exit_to_next_us",
         "entry_spread_us")


def call_parts(rows: np.ndarray, first_seq: int) -> np.ndarray:
    """Per call with seq > first_seq, in seq order (int64 ns): seq, entry,
    sent, waited, exit, next entry (-1 where the next call is missing: the
    end of a run)."""
    rows = rows[rows[:, 0] > first_seq]
    rows = rows[np.argsort(rows[:, 0])]
    out = np.full((len(rows), 6), -1, dtype=np.int64)
    out[:, :5] = rows
    consecutive = np.diff(rows[:, 0]) == 1
    out[:-1, 5] = np.where(consecutive, rows[1:, 1], -1)
    return out


def medians(parts: np.ndarray, spread: np.ndarray, run_gap_ns: int) -> list[float]:
    """Median per part in us. Marks a variant does not record are 0: their
    parts are left out (NaN). Gaps longer than run_gap_ns (between runs:
    the host's dispatch) are left out too."""
    entry, sent, waited, exit_, nxt = (parts[:, k] for k in range(1, 6))
    gap = (nxt - exit_)[(nxt > 0) & (nxt - exit_ < run_gap_ns)]
    marked = (sent > 0) & (waited > 0)
    cols = [(sent - entry)[marked], (waited - sent)[marked], (exit_ - waited)[marked], gap, spread]
    return [float(np.median(c)) / 1e3 if len(c) else float("nan") for c in cols]


def entry_spread(entries: np.ndarray, me: int) -> np.ndarray:
    """This rank's entry minus the earliest rank's, per call (ns). Every rank
    traced the same calls; timers are exchanged modulo 2**31 ns (int32) and
    differences taken in that ring, which holds while ranks differ by less
    than a second."""
    from jax.experimental import multihost_utils

    ring = 1 << 31
    low = (entries % ring).astype(np.int64)
    every = np.asarray(multihost_utils.process_allgather((low - (1 << 30)).astype(np.int32)),
                       dtype=np.int64) + (1 << 30)
    rel = (every - every[0] + ring // 2) % ring - ring // 2  # minus rank 0's
    return (rel[me] - rel.min(axis=0)).astype(np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4K,32K,128K,256K,512K,1M,2M")
    p.add_argument("--steps", type=int, default=256, help="chained calls per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not H.start_backend("kernel_trace", nvshmem=True, cpu_devices=2):
        sys.exit("kernel_trace: needs GPUs (the trace is the kernel's own clock)")
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_nvrar
    from jax_nvrar import _runtime

    def trace() -> np.ndarray:
        try:
            return np.asarray(_runtime.trace_rows(), dtype=np.int64)
        except RuntimeError as e:
            sys.exit(f"kernel_trace: {e}")

    n = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("tp",))

    def chain(v):
        d = jnp.where(lax.axis_index("tp") % 2 == 0, 1, -1).astype(v.dtype)
        return lax.fori_loop(0, args.steps,
                             lambda _, w: jax_nvrar.psum(w, "tp", backend="nvshmem") / n + d,
                             v, unroll=32)

    program = jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=P("tp"), out_specs=P("tp")))
    out = []
    for size in H.parse_sizes(args.sizes):
        count = size // 2
        x = jax.device_put(
            (jnp.arange(n * count, dtype=jnp.float32) % 7 + 1).astype(jnp.bfloat16).reshape(n, count),
            NamedSharding(mesh, P("tp")))
        compiled = program.lower(x).compile()
        jax.block_until_ready(compiled(x))  # warm-up
        first = int(trace()[:, 0].max())
        H.barrier("jax_nvrar_kernel_trace")
        times, _ = H.time_runs(compiled, (x,), warmup=0, repeats=args.repeats)
        parts = call_parts(trace(), first)
        spread = entry_spread(parts[:, 1], jax.process_index())
        row = medians(parts, spread, run_gap_ns=50_000)
        wall = float(np.median(times)) / args.steps * 1e6
        per_rank = H.gather_rows([wall] + row)
        if jax.process_index() == 0:
            for rank, values in enumerate(per_rank):
                out.append({"size": size, "rank": rank, "calls": len(parts),
                            "wall_us": float(values[0]),
                            **{k: float(v) for k, v in zip(PARTS, values[1:])}})
            H.log(f"{size:8}: " + ", ".join(
                f"{k} {np.median(per_rank[:, 1 + i]):.2f}" for i, k in enumerate(PARTS)))
    if jax.process_index() == 0:
        cols = [("size", "size", H.fmt_bytes), ("rank", "rank", "d"),
                ("wall_us", "wall per call", ".2f"),
                ("entry_to_sent_us", "entry -> sent", ".2f"),
                ("sent_to_waited_us", "sent -> waited", ".2f"),
                ("waited_to_exit_us", "waited -> exit", ".2f"),
                ("exit_to_next_us", "exit -> next entry", ".2f"),
                ("entry_spread_us", "entry spread", ".2f")]
        print(f"# Kernel trace, {n} x {jax.devices()[0].device_kind}, bfloat16, "
              f"{args.steps} chained calls x {args.repeats} runs (us, medians over calls)\n")
        print(H.markdown_table(out, cols))
        if args.json:
            H.write_json(Path(args.json), {"kind": H.MEASURED, "env": H.host_env(),
                                           "devices": n, "rows": out})
    jax_nvrar.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
