"""Where a decode step's time goes: a device profile of jitted decode steps,
summed by kind of work (which part of the step keeps it from the
weight-read roofline).

    python -m jax_nvrar.launch --nproc-per-node 4 benchmarks/step_profile.py \\
        --model llama3.1-70b --tp 4 --batch 8 --allreduce nvrar
    python benchmarks/step_profile.py      # CPU: tiny preset, 2 simulated devices (functional)

Every process runs the model of ``models/`` (random weights) through
``models.generate.Generator``: prefill, warm-up decode steps, then ``--steps``
decode steps dispatched back to back under ``jax.profiler`` (every process
traces; process 0 reads its own trace). From the trace of process 0's device
(on CPU, a functional run: the host threads that run XLA's ops for all the
process's simulated devices) it sums the ops' durations per
category (matched on the op and kernel names, first match wins):

  * ``all-reduce``: the NVRAR kernel (``allreduce_kernel``), NCCL's
    all-reduce kernels, or an XLA all-reduce (``psum`` on CPU);
  * ``other collectives``: other NCCL kernels, all-gathers (the logits), ...;
  * ``matmul``: cuBLAS/cuBLASLt/CUTLASS GEMMs, XLA ``dot``/``gemm`` ops;
  * ``copy / cache update``: copies, memcpy/memset, dynamic-update-slice;
  * ``fusion (other)``: XLA fusions not above (norms, RoPE, softmax,
    attention's elementwise parts, residual adds);
  * ``other``.

Reported per step: op count and time per category, the sum of op times
("busy"), the step's wall time from the host's clock over the profiled steps,
and "gaps" = wall - busy (time the device ran no op of this program: launch
and graph-node overhead between ops, host round trips). Times of ops that
overlap (several streams) are summed, so "busy" can exceed wall. Also the
weight + KV-cache bytes a step reads and the time they take at the copy
bandwidth given (``--copy-gbps``, e.g. the decode benchmark's measurement):
the roofline the step is compared with.

Collectives, from every process's trace: a collective's kernel runs from
its rank's arrival until the last rank's data is in, so per call the fastest
kernel over the processes (the rank that arrived last) bounds its own cost
from below and the rest is waiting for other ranks. Reported per step for
the all-reduces and the other collectives.

The host, from process 0's trace: the largest spans per step on its host
threads (the Python thread that dispatches the steps and XLA's threads;
spans nest), to tell where the host's time per step goes.

Outputs (``--out-dir``, default benchmarks/results/): PREFIX.json (rows,
the top ops, the host spans, command, devices) and PREFIX.md (also on stdout). PREFIX
defaults to ``step_profile_MODEL_tpN_bB_ALLREDUCE``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

if str(H.REPO) not in sys.path:  # run from a checkout
    sys.path.append(str(H.REPO))

#: (category, name fragments), matched in order on the lower-cased op name.
CATEGORIES = (
    ("all-reduce", ("nvrar", "allreduce_kernel", "all-reduce", "all_reduce", "allreduce", "psum")),
    ("other collectives", ("nccl", "all-gather", "all_gather", "collective-permute",
                           "reduce-scatter", "all-to-all")),
    # cuBLAS's Hopper kernels are nvjet_*/sm90_xmma_*; ynn_ is XLA:CPU's (YNNPACK) dot fusion.
    ("matmul", ("gemm", "gemv", "cublas", "cutlass", "nvjet", "xmma", "wgmma", "dot", "matmul",
                "ynn_")),
    ("copy / cache update", ("copy", "memcpy", "memset", "dynamic-update-slice",
                             "dynamic_update_slice")),
    ("fusion (other)", ("fusion", "loop_", "input_", "reduce", "triton")),
)


def category(name: str) -> str:
    lower = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in lower for f in fragments):
            return label
    return "other"


def op_events(data) -> list[tuple[str, float, int]]:
    """(name, duration in us, start in ns) of every op the device of the trace ``data`` (a
    ``jax.profiler.ProfileData``) ran: the GPU plane's kernels (its "Stream" lines: kernel names
    tell cuBLAS, NCCL, the NVRAR kernel and XLA's fusions apart, where the op line names every
    library call "custom-call"), else its "XLA Ops" line; without a GPU plane, the host events
    that carry an ``hlo_op``."""
    gpus = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if gpus:  # one GPU per process: the plane with events is this process's
        lines = list(max(gpus, key=lambda p: sum(1 for line in p.lines for _ in line.events)).lines)
        streams = [line for line in lines if line.name.startswith("Stream")]
        chosen = streams or [line for line in lines if line.name == "XLA Ops"]
        return [(e.name, e.duration_ns / 1e3, e.start_ns) for line in chosen for e in line.events]
    events = []
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats and "hlo_module" in stats:
                    events.append((str(stats["hlo_op"]), e.duration_ns / 1e3, e.start_ns))
    return events


def host_spans(data) -> list[tuple[str, str, float]]:
    """(thread, span name, duration in us) of every span on the host threads of the trace ``data``:
    the Python thread that dispatches, and XLA's threads. A thread's numeric id and a span's
    metadata (after its first ``#``) are dropped, so that alike spans group; the profiler's own
    start and stop are left out."""
    spans = []
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            thread = re.sub(r"/-?\d+$", "", line.name)
            for e in line.events:
                name = e.name.split("#", 1)[0]
                if "profiler.py" not in name:
                    spans.append((thread, name, e.duration_ns / 1e3))
    return spans


def summarize_host(spans, steps: int, top: int = 20) -> list[dict]:
    """The ``top`` (thread, span) pairs by time per step."""
    per = collections.defaultdict(lambda: [0, 0.0])
    for thread, name, us in spans:
        per[thread, name][0] += 1
        per[thread, name][1] += us
    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"thread": thread, "span": name, "count_per_step": n / steps, "us_per_step": us / steps}
            for (thread, name), (n, us) in ranked]


def summarize(events, steps: int, wall_us: float) -> dict:
    """Per-step op count and time per category, busy, wall and gaps."""
    per = collections.defaultdict(lambda: [0, 0.0])
    top = collections.defaultdict(lambda: [0, 0.0])
    for name, us, _ in events:
        per[category(name)][0] += 1
        per[category(name)][1] += us
        top[name][0] += 1
        top[name][1] += us
    rows = [{"category": c, "ops_per_step": per[c][0] / steps, "us_per_step": per[c][1] / steps}
            for c in [label for label, _ in CATEGORIES] + ["other"] if c in per]
    busy = sum(r["us_per_step"] for r in rows)
    wall = wall_us / steps
    rows += [{"category": "busy (sum of op times)", "ops_per_step": sum(r["ops_per_step"] for r in rows),
              "us_per_step": busy},
             {"category": "gaps (wall - busy)", "us_per_step": wall - busy},
             {"category": "wall (host clock)", "us_per_step": wall}]
    for r in rows:
        r["share_of_wall"] = 100 * r["us_per_step"] / wall if wall > 0 else None
    ranked = sorted(top.items(), key=lambda kv: -kv[1][1])[:25]
    return {"rows": rows, "top_ops": [{"op": name, "count_per_step": n / steps,
                                       "us_per_step": us / steps, "category": category(name)}
                                      for name, (n, us) in ranked]}


COLLECTIVES = ("all-reduce", "other collectives")


def collective_cost(per_rank, steps: int) -> dict:
    """Split a collective's traced time into its own cost and waiting. ``per_rank``: (processes,
    calls) kernel durations in us, call ``i`` the same collective on every process. A collective's
    kernel runs from its own rank's arrival until the last rank's data is in, so each call's fastest
    kernel is the one of the rank that arrived last, which waited for nobody: the sum of those is
    the collective's own cost, a lower bound (that rank finds its peers' data already there, and the
    minimum of noisy times leans low); the mean over ranks of the rest is time spent waiting for
    other ranks (skew between the processes, which the profiler itself grows)."""
    import numpy as np

    per_rank = np.asarray(per_rank, dtype=np.float64)
    own = per_rank.min(axis=0).sum() / steps
    traced = per_rank.sum(axis=1).mean() / steps
    return {"calls_per_step": per_rank.shape[1] / steps, "traced_us_per_step": traced,
            "own_us_per_step": own, "waiting_us_per_step": traced - own}


def collectives_across_ranks(events, steps: int) -> dict:
    """``collective_cost`` of each collective category, from every process's trace (a collective:
    every process calls it; calls are paired across processes by kernel name and order in time).
    ``problem`` instead where the processes traced different numbers of calls."""
    out = {}
    for label in COLLECTIVES:
        mine = [us for name, us, _ in sorted(events, key=lambda e: (e[0], e[2])) if category(name) == label]
        counts = H.gather_rows([len(mine)])[:, 0]
        if counts.max() == 0:
            continue
        if counts.min() != counts.max():
            out[label] = {"problem": f"the processes traced {sorted(set(counts.astype(int).tolist()))} calls"}
            continue
        out[label] = collective_cost(H.gather_rows(mine), steps)
    return out


def traced(run) -> tuple[list, float, list]:
    """Runs ``run()`` under the profiler: (``op_events`` of this process's trace, wall time in us,
    ``host_spans``). Every process calls it; a failed trace read anywhere fails everywhere, before
    any later gather could wait for the failed process."""
    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        begin = time.perf_counter()
        run()
        wall_us = (time.perf_counter() - begin) * 1e6
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        try:
            if not paths:
                raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
            data = ProfileData.from_file(paths[0])
            events, spans, problem = op_events(data), host_spans(data), ""
            if not events:  # not an empty program: a trace layout op_events does not read
                raise RuntimeError("the trace holds no op of this program (no GPU plane, and no "
                                   "host event carries hlo_op and hlo_module)")
        except Exception as exc:  # agreed below, so that no process waits in a gather for this one
            events, spans, problem = [], [], f"{type(exc).__name__}: {exc}"
    failed = [i for i, bad in enumerate(H.gather_rows([float(bool(problem))])[:, 0]) if bad]
    if failed:
        raise RuntimeError(f"reading the trace failed on process(es) {failed}"
                           + (f"; here: {problem}" if problem else ""))
    return events, wall_us, spans


def profile_steps(gen, cfg, args) -> tuple[dict, int]:
    """Prefill, warm-up, then ``args.steps`` profiled decode steps.
    -> (summary of process 0's trace, or {} elsewhere; bytes read per step)."""
    import jax

    from _decode_cases import device_inputs, kv_read_bytes, weight_read_bytes

    tokens, start, key = device_inputs(gen.mesh, cfg.vocab_size, args.batch, args.prompt_len,
                                       args.seed)
    max_len = args.prompt_len + args.warmup + args.steps + 1
    nxt, cache = gen.prefill(gen.params, tokens, start, key, max_len=max_len)
    out, _, cache = gen.decode(nxt, cache, key, args.warmup)
    jax.block_until_ready((out[-1], cache))
    read = weight_read_bytes(gen.state) + kv_read_bytes(cache)
    H.barrier("jax_nvrar_step_profile")

    def run():
        out_, _, cache_ = gen.decode(out[-1], cache, key, args.steps)
        jax.block_until_ready((out_[-1], cache_))

    events, wall_us, spans = traced(run)
    collectives = collectives_across_ranks(events, args.steps)  # every process takes part
    if jax.process_index() != 0:
        return {}, read
    return dict(summarize(events, args.steps, wall_us), collectives=collectives,
                host=summarize_host(spans, args.steps)), read


def _collectives_report(collectives: dict) -> list[str]:
    if not collectives:
        return []
    rows = [{"category": label, **c} for label, c in collectives.items() if "problem" not in c]
    lines = ["## Collectives: own cost and waiting", "",
             "Per call, the fastest kernel over the processes is the one of the rank that arrived last "
             "(it waited for nobody): their sum is the collective's own cost, a lower bound (the last "
             "rank finds its peers' data already there; the minimum of noisy times leans low); the rest "
             "of the traced time, averaged over the processes, is waiting for other ranks.", ""]
    if rows:
        lines += [H.markdown_table(rows, [
            ("category", "category", "s"), ("calls_per_step", "calls per step", ".1f"),
            ("traced_us_per_step", "traced us per step (mean over ranks)", ".1f"),
            ("own_us_per_step", "own us per step", ".1f"),
            ("waiting_us_per_step", "waiting us per step", ".1f")]), ""]
    lines += [f"- {label}: not split, {c['problem']}" for label, c in collectives.items() if "problem" in c]
    return lines + ([""] if any("problem" in c for c in collectives.values()) else [])


def report(payload: dict) -> str:
    p = payload
    lines = [f"# Decode step profile: {p['model']} ({p['layers']} layers), TP={p['tp']}, "
             f"batch {p['batch']}, allreduce={p['allreduce']}, {p['device']}", "",
             f"- {p['steps']} decode steps after a prompt of {p['prompt_len']} tokens, dispatched back "
             f"to back, profiled on process 0's device; times per step.",
             f"- bytes read per step per device (weights + KV cache): {p['read_bytes'] / 1e9:.3f} GB"]
    if p.get("roofline_us"):
        lines.append(f"- roofline at {p['copy_gbps']:.0f} GB/s copy bandwidth: {p['roofline_us']:.1f} us; "
                     f"wall / roofline = {p['wall_over_roofline']:.2f}")
    lines += ["", H.markdown_table(p["rows"], [
        ("category", "category", "s"), ("ops_per_step", "ops per step", ".1f"),
        ("us_per_step", "us per step", ".1f"), ("share_of_wall", "% of wall", ".1f")]), "",
        *_collectives_report(p.get("collectives", {})),
        "## Largest ops", "", H.markdown_table(p["top_ops"], [
            ("op", "op", "s"), ("category", "category", "s"), ("count_per_step", "per step", ".1f"),
            ("us_per_step", "us per step", ".1f")]), "",
        "## Host: largest spans", "",
        "Process 0's host threads during the profiled steps: the Python thread dispatches the steps, "
        "the others are XLA's. Spans nest: a span's time includes the spans it calls.", "",
        H.markdown_table(p.get("host", []), [
            ("thread", "thread", "s"), ("span", "span", "s"), ("count_per_step", "per step", ".1f"),
            ("us_per_step", "us per step", ".1f")]), "",
        "Gaps are the wall time in which the device ran no op of the program (launch and graph-node "
        "overhead between ops, host round trips); op times on several streams would overlap and "
        "are summed. XLA command buffers stay on while profiling "
        f"(XLA_FLAGS: `{p['xla_flags']}`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="models/config.py preset (GPU: llama3.1-8b, CPU: tiny)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--tp", type=int, default=None, help="default: every device")
    p.add_argument("--allreduce", choices=("nvrar", "xla", "nocomm"), default="nvrar",
                   help="nocomm: psum replaced by the identity (NUMERICALLY WRONG; compute only)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-gbps", type=float, default=None,
                   help="copy bandwidth per device for the roofline (the decode benchmark measures it)")
    p.add_argument("--cpu-devices", type=int, default=2)
    p.add_argument("--out-dir", default=str(H.RESULTS_DIR))
    p.add_argument("--prefix", default=None)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the warm-up compiles the decode step)")
    H.profile_command_buffers()  # the profile is of the CUDA graphs decoding really runs
    on_gpu = H.start_backend("step_profile", nvshmem=args.allreduce == "nvrar",
                             cpu_devices=args.cpu_devices)
    import jax
    from models import config, tp as tp_lib
    from models.generate import Generator

    model = args.model or ("llama3.1-8b" if on_gpu else "tiny")
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    cfg = config.get_config(model, n_layers=args.layers, dtype=dtype)
    mesh = tp_lib.make_mesh(args.tp)
    tp_lib.check_tp(cfg, mesh.size)
    from _decode_cases import no_communication
    psum = no_communication if args.allreduce == "nocomm" else tp_lib.get_psum(args.allreduce)
    H.log(f"{model}: {cfg.n_layers} layers, tp={mesh.size}, batch {args.batch}, allreduce={args.allreduce}")
    graphdef, state = tp_lib.init_weights(cfg, mesh, seed=args.seed)
    summary, read = profile_steps(Generator(graphdef, state, mesh, psum), cfg, args)
    if jax.process_index() != 0:
        return 0
    wall = next(r["us_per_step"] for r in summary["rows"] if r["category"] == "wall (host clock)")
    roofline = read / (args.copy_gbps * 1e3) if args.copy_gbps else None
    payload = {"model": model, "layers": cfg.n_layers, "tp": mesh.size, "batch": args.batch,
               "prompt_len": args.prompt_len, "steps": args.steps, "allreduce": args.allreduce,
               "dtype": dtype, "device": f"{mesh.size} x {mesh.devices.flat[0].device_kind}",
               "read_bytes": read, "copy_gbps": args.copy_gbps, "roofline_us": roofline,
               "wall_over_roofline": wall / roofline if roofline else None,
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "env": H.host_env(), **summary}
    prefix = args.prefix or f"step_profile_{model}_tp{mesh.size}_b{args.batch}_{args.allreduce}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    H.write_json(out / f"{prefix}.json", payload)
    text = report(payload)
    (out / f"{prefix}.md").write_text(text)
    print(text)
    H.log(f"wrote {out / prefix}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
