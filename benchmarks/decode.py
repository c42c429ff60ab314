"""Decode benchmark: end-to-end batch latency of tensor-parallel Llama decoding
with jax_nvrar.psum against XLA's psum.

    python benchmarks/decode.py                 # GPUs: the --quick preset
    python benchmarks/decode.py --full          # the whole sweep (hours; split it)
    python benchmarks/decode.py --platform cpu  # FUNCTIONAL run, tiny preset

Outputs (``--out-dir``, default benchmarks/results/): PREFIX.json (results,
versions, flags, devices, command), PREFIX.md (the tables, also on stdout),
PREFIX.png (decode step time vs batch per backend). PREFIX is ``decode``, or
``decode_cpu_functional`` for a run on CPU devices. Progress goes to stderr.

What runs: the model of ``models/`` with random weights, in bfloat16 on GPU
(float32 on CPU), greedy decoding, prompts of random token ids, through
``models.generate.Generator`` (prefill, then the jitted decode step that
donates its cache). Variants (``--backends``), one per node layout where the
backend has nodes:

  * ``xla``       jax.lax.psum, the baseline;
  * ``nvrar``     ``functools.partial(jax_nvrar.psum, backend='auto',
                  node_size=S)``: the NVRAR kernel up to JAX_NVRAR_AUTO_MAX_KB
                  per message, XLA above (what a user of jax_nvrar gets);
  * ``nvshmem``   the same with backend='nvshmem' (the kernel for every message);
  * ``reference`` backend='reference' (the NVRAR schedule from ppermute);
  * ``nocomm``    psum replaced by the identity: the same compute without
                  communication, NUMERICALLY WRONG, labelled so everywhere; the
                  all-reduce share of a time is 1 - nocomm time / time.

Layouts are ``NODESxGPUS`` as in allreduce.py: 2x2 is TP=4 as two virtual
nodes of two GPUs (``node_size=2``).

Workloads: decode-heavy (prompt 128, generate 1024, batch 1..64) and
prefill-heavy (prompt 2048, generate 32). Models: Llama 3.1 8B, 70B, 405B. A
model that does not fit (an estimate from the shapes against the device's
memory limit, or ``--layers``) runs truncated to the layers that fit, plus a
1-layer run of every case; the report then gives per-layer times and the
full-model times as a PREDICTION (time(L) = fixed + L x per-layer).

Method, per case (variant x workload x batch):
  1. compile and warm up: prefill + ``--warmup`` decode steps (not timed);
  2. ``--prefill-repeats`` prefills, each synchronised: TTFT = median;
  3. one generation with a block_until_ready after every decode step: step
     times (slowest rank per step; mean and median over steps);
  4. ``--repeats`` generations dispatched back to back, one synchronisation
     at the end: e2e batch latency (prefill + every step; slowest rank, median);
  5. greedy tokens compared with xla's for the same case: #mismatch (bf16
     sums in another order may flip near-ties: reported, not fatal).
  HBM bandwidth = (weight + KV-cache bytes read per step per device) / median
  step, against the copy bandwidth measured on the same devices first.

Modes
  * GPU (default where nvidia-smi lists GPUs): this process is a driver that
    never starts JAX; per TP size it runs ``python -m jax_nvrar.launch
    --nproc-per-node TP benchmarks/decode.py --worker ...`` (one process per
    GPU) and merges the groups' results. ``--time-budget`` bounds the sweep:
    cases past it are recorded as skipped.
  * CPU (``--platform cpu``, or no GPU): a FUNCTIONAL run in this process on
    simulated CPU devices with the tiny preset; xla, reference and nocomm.
  * Under the launcher without ``--worker``: one group on the processes there.
  * ``--merge A.json B.json ...``: join the results of separate runs (e.g.
    the full sweep split by ``--models``/``--tp``) into PREFIX.*.

Runtime on 4xH100: --quick 175 s with one e2e generation per case
(start-up, weights, 9 cases of ~15 s, mostly compilation; --time-budget
200 s stops it in time). --full (an estimate) ~3 h (210 cases of ~40 s,
100 cheap 1-layer fit cases), so run it in pieces under a 10-minute
limit, each with its own --prefix, e.g.
``--full --models llama3.1-8b --tp 4 --workloads decode --time-budget 480
--prefix decode_8b_tp4_decode``, then ``--merge`` the JSON files.
``--compilation-cache DIR`` lets a rerun skip compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

if str(H.REPO) not in sys.path:  # models/ is run from the checkout
    sys.path.append(str(H.REPO))

from _allreduce_cases import Layout  # noqa: E402
from _decode_cases import BACKENDS, Workload, variants, worker_main  # noqa: E402
from _decode_report import (derive, merge, run_title,  # noqa: E402
                            write_outputs)

SCRIPT = Path(__file__).resolve()
SCHEMA = "jax_nvrar.decode/1"
CPU_DEVICES = 8
FUNCTIONAL_LABEL = ("FUNCTIONAL run (CPU devices): checks the benchmark and the token "
                    "comparison; the times are not performance measurements")

#: Presets: (platform, preset) -> defaults of the flags left unset.
PRESETS = {
    ("gpu", "quick"): dict(
        models="llama3.1-8b", tp="4", layouts="1x4", workloads="decode",
        decode_batches="1,8,32", decode_prompt=128, decode_gen=128,
        prefill_batches="1,4", prefill_prompt=2048, prefill_gen=32,
        backends="xla,nvrar,nocomm", time_budget=200.0, copy_mb=1024),
    ("gpu", "full"): dict(
        models="llama3.1-8b,llama3.1-70b,llama3.1-405b", tp="2,4",
        layouts="1x2,1x4,2x2", workloads="decode,prefill",
        decode_batches="1,2,4,8,16,32,64", decode_prompt=128, decode_gen=1024,
        prefill_batches="1,4,8", prefill_prompt=2048, prefill_gen=32,
        backends="xla,nvrar,nocomm", time_budget=0.0, copy_mb=1024),
    ("cpu", "quick"): dict(
        models="tiny", tp="4", layouts="1x4,2x2", workloads="decode,prefill",
        decode_batches="1,4", decode_prompt=16, decode_gen=24,
        prefill_batches="2", prefill_prompt=64, prefill_gen=4,
        backends="xla,reference,nocomm", time_budget=0.0, copy_mb=64),
    ("cpu", "full"): dict(
        models="tiny", tp="2,4", layouts="1x2,1x4,2x2", workloads="decode,prefill",
        decode_batches="1,4,16", decode_prompt=32, decode_gen=64,
        prefill_batches="1,4", prefill_prompt=256, prefill_gen=8,
        backends="xla,reference,nocomm", time_budget=0.0, copy_mb=64),
}
#: Flags forwarded from the driver to its workers, resolved.
FORWARD = ("models", "layouts", "workloads", "decode_batches", "decode_prompt",
           "decode_gen", "prefill_batches", "prefill_prompt", "prefill_gen", "backends",
           "layers", "dtype", "seed", "warmup", "prefill_repeats", "repeats", "copy_mb",
           "compilation_cache")


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def _cases(args, tp: int) -> int:
    per_batch = len(variants(set(H.parse_list(args.backends)),
                             [Layout.parse(l) for l in H.parse_list(args.layouts)], tp))
    return per_batch * len(H.parse_list(args.models)) * sum(
        len(w.batches) for w in args.workload_list)


def driver_gpu(args) -> dict:
    host = H.host_env()
    n_gpus = args.gpus or H.gpu_count()
    start = time.time()
    tps = [int(t) for t in H.parse_list(args.tp)]
    if all(tp > n_gpus for tp in tps):
        raise SystemExit(
            f"decode.py: --tp {args.tp} needs {min(tps)} or more GPUs; {n_gpus} present"
            + (f" (--tp {n_gpus} runs on them)" if n_gpus > 1 else
               " (tensor parallelism needs 2 or more GPUs); --platform cpu runs the "
               "functional check"))
    skipped = [{"what": f"tp={tp}", "reason": f"needs {tp} GPUs; {n_gpus} present"}
               for tp in tps if tp > n_gpus]
    tps = [tp for tp in tps if tp <= n_gpus]
    budget = args.time_budget or float("inf")
    tmp = Path(tempfile.mkdtemp(prefix="jax_nvrar_decode_"))
    groups, records = [], {}
    for i, tp in enumerate(tps):
        weights = [_cases(args, t) + 5 for t in tps[i:]]  # + start-up and weights
        share = min(H.budget_share(start + budget, weights, 60.0), 1e9)
        name, part = f"tp{tp}", tmp / f"tp{tp}.jsonl"
        argv = ["--worker", "--tp", str(tp), "--part", str(part),
                "--deadline", f"{time.time() + share:.1f}"]
        argv += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in FORWARD]
        groups.append(H.launch_group(
            name, SCRIPT, tp, args.launch_platform, argv,
            timeout=min(share + args.grace, 1e9),
            note=f"{_cases(args, tp)} cases per model layer count, "
                 f"budget {min(share, 1e6):.0f} s"))
        records[name] = H.read_jsonl(part)
    return _finish(args, records, groups, skipped, host, start)


def driver_cpu(args) -> dict:
    """Functional run in this process on simulated CPU devices."""
    host = H.host_env()
    import jax

    jax.config.update("jax_platforms", "cpu")
    n_dev = max([CPU_DEVICES] + [int(t) for t in H.parse_list(args.tp)])
    with contextlib.suppress(RuntimeError):  # backend already up (in a test)
        jax.config.update("jax_num_cpu_devices", n_dev)
    records, start = [], time.time()
    args.deadline = start + (args.time_budget or 1e9)
    worker_main(args, cpu=True, emit=records.append, rank0=True)
    group = {"group": "cpu", "nproc": 1, "status": "ok", "returncode": 0,
             "wall_s": round(time.time() - start, 1)}
    return _finish(args, {"cpu": records}, [group], [], host, start)


def direct_under_launcher(args) -> None:
    """Started by the launcher without --worker: TP = the processes started."""
    n, rank0 = H.launched_processes()
    args.tp = str(n)
    args.deadline = time.time() + (args.time_budget or 1e9)
    records, start = [], time.time()
    worker_main(args, cpu=os.environ.get("JAX_NVRAR_PLATFORM") == "cpu",
                emit=records.append, rank0=rank0)
    if rank0:
        group = {"group": f"tp{n}", "nproc": n, "status": "ok", "returncode": 0,
                 "wall_s": round(time.time() - start, 1)}
        _finish(args, {group["group"]: records}, [group], [], H.host_env(), start)


def _finish(args, records, groups, skipped, host, start) -> dict:
    devices = [r["device"] for recs in records.values() for r in recs if r["type"] == "env"]
    kind = H.run_kind(devices)
    payload = merge(records, groups, skipped, {
        "schema": SCHEMA, "kind": kind,
        "title": run_title(kind, devices, H.parse_list(args.models)),
        "method": _method(args), "env": host, "wall_s": round(time.time() - start, 1)})
    if kind == "functional":
        payload["label"] = FUNCTIONAL_LABEL
    prefix = args.prefix or ("decode" if kind == "performance" else "decode_cpu_functional")
    return write_outputs(payload, args.out_dir, prefix)


def merge_files(args) -> dict:
    """Join the payloads of separate runs; derived columns are recomputed."""
    payloads = [json.loads(Path(p).read_text()) for p in args.merge]
    kinds = {p["kind"] for p in payloads}
    kind = "performance" if kinds == {"performance"} else "functional"
    merged = dict(payloads[0], kind=kind, merged_from=[str(p) for p in args.merge])
    for key in ("groups", "copy", "plans", "skipped", "results"):
        merged[key] = [x for p in payloads for x in p.get(key, [])]
    for key in ("devices", "jax_nvrar_config"):
        merged[key] = {f"{i}:{g}": v for i, p in enumerate(payloads)
                       for g, v in p.get(key, {}).items()}
    models = sorted({r["model"] for r in merged["results"]})
    merged["title"] = run_title(kind, list(merged["devices"].values()), models)
    if kind == "functional":
        merged["label"] = FUNCTIONAL_LABEL
    prefix = args.prefix or ("decode" if kind == "performance" else "decode_cpu_functional")
    return write_outputs(derive(merged), args.out_dir, prefix)


def _method(args) -> dict:
    return {
        "workloads": [vars(w) | {"batches": list(w.batches)} for w in args.workload_list],
        "preset": "full" if args.full else "quick",
        "ttft": f"median of {args.prefill_repeats} synchronised prefills, slowest rank each",
        "step": "one generation, block_until_ready after every decode step; slowest rank "
                "per step; mean and median over steps",
        "e2e": f"median of {args.repeats} generations dispatched back to back (prefill + "
               "gen_len - 1 steps, one synchronisation), slowest rank",
        "host_step": "the host's time to dispatch one decode step: median of the first "
                     "steps of the pipelined generations, slowest rank",
        "warmup": f"compile + prefill + {args.warmup} decode steps, untimed",
        "hbm": "(weight + KV-cache bytes read per step per device) / median step; the "
               "embedding table counts only when tied to the LM head",
        "all_reduce_share": "1 - nocomm time / time (nocomm: psum -> identity, wrong numbers)",
        "speedup": "xla time / this time, same model, layers, TP, workload and batch",
        "mismatch": "greedy tokens that differ from xla's for the same case",
        "layers": args.layers, "seed": args.seed, "dtype": args.dtype,
    }


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: gpu where nvidia-smi lists GPUs, else a functional CPU run")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="the default: GPU 8B, TP=4, 1x4, batch 1/8/32, prompt 128, "
                             "generate 128, xla/nvrar/nocomm, ~3 min")
    preset.add_argument("--full", action="store_true",
                        help="8B/70B/405B, TP 2 and 4, layouts 1x2 1x4 2x2, both "
                             "workloads, batch 1..64 (hours: split with the flags below)")
    p.add_argument("--models", help="comma list of models/config.py presets")
    p.add_argument("--tp", help="comma list of TP sizes (one launch per size)")
    p.add_argument("--layouts", help="NODESxGPUS list for nvrar/nvshmem/reference, e.g. 1x4,2x2")
    p.add_argument("--workloads", help="decode (decode-heavy) and/or prefill (prefill-heavy)")
    p.add_argument("--decode-batches")
    p.add_argument("--decode-prompt", type=int)
    p.add_argument("--decode-gen", type=int)
    p.add_argument("--prefill-batches")
    p.add_argument("--prefill-prompt", type=int)
    p.add_argument("--prefill-gen", type=int)
    p.add_argument("--backends", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--layers", default="auto",
                   help="auto (the layers that fit), N, or MODEL=N,...; a truncated model "
                        "also runs 1 layer and is extrapolated (PREDICTION)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="decode steps in the untimed warm-up")
    p.add_argument("--prefill-repeats", type=int, default=3, help="timed prefills (TTFT)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed pipelined generations (e2e = their median: one alone lets a stall decide it)")
    p.add_argument("--copy-mb", type=int, help="MiB per device of the copy-bandwidth pass")
    p.add_argument("--compilation-cache", default="",
                   help="JAX persistent compilation cache folder: a rerun skips compiling")
    p.add_argument("--time-budget", type=float,
                   help="seconds for all groups (quick: 200; 0: none); cases past it are "
                        "recorded as skipped")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds past a group's budget before it is killed")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="join these result files into PREFIX.* instead of measuring")
    p.add_argument("--out-dir", default=str(H.RESULTS_DIR))
    p.add_argument("--prefix", default=None,
                   help="output file prefix (default decode, or decode_cpu_functional)")
    H.add_driver_args(p)
    args = p.parse_args(argv)
    if args.merge:
        return args

    if args.platform == "auto":
        args.platform = "gpu" if args.worker or H.gpu_count() else "cpu"
    defaults = PRESETS[(args.platform, "full" if args.full else "quick")]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        _check(args)
    except ValueError as error:
        p.error(str(error))
    return args


def _check(args) -> None:
    unknown = set(H.parse_list(args.backends)) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    from models.config import PRESETS as MODELS

    unknown = set(H.parse_list(args.models)) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; presets: {', '.join(MODELS)}")
    for t in H.parse_list(args.layouts):
        Layout.parse(t)
    for t in H.parse_list(args.tp):
        if not t.isdigit() or int(t) < 2:
            raise ValueError(f"--tp {t!r}: TP sizes are integers >= 2")
    from _decode_cases import layer_requests

    layer_requests(args.layers)
    workloads = []
    for name in H.parse_list(args.workloads):
        if name not in ("decode", "prefill"):
            raise ValueError(f"unknown workload {name!r}; choose decode, prefill")
        prompt, gen = getattr(args, f"{name}_prompt"), getattr(args, f"{name}_gen")
        batches = tuple(int(b) for b in H.parse_list(getattr(args, f"{name}_batches")))
        if prompt < 1 or gen < 2 or not batches or min(batches) < 1:
            raise ValueError(f"{name}: need prompt >= 1, generate >= 2 (one timed step) and "
                             f"batches >= 1; got {prompt}, {gen}, {batches}")
        workloads.append(Workload(name, prompt, gen, batches))
    if not workloads:
        raise ValueError("no workload selected")
    args.workload_list = workloads
    if min(args.warmup, args.prefill_repeats, args.repeats, args.copy_mb) < 1:
        raise ValueError("--warmup, --prefill-repeats, --repeats and --copy-mb must be >= 1")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        merge_files(args)
        return
    H.dispatch(args, worker=lambda emit, rank0: worker_main(
        args, cpu=os.environ.get("JAX_NVRAR_PLATFORM") == "cpu", emit=emit, rank0=rank0),
        under_launcher=direct_under_launcher, cpu=driver_cpu, gpu=driver_gpu)


if __name__ == "__main__":
    main()
