"""Tuning table of the single-node kernel variants that backend="auto" runs.

    python benchmarks/tune.py                   # GPUs: measure, then write
    python benchmarks/tune.py --from S.json ... # from sweeps already measured

Measuring runs ``benchmarks/allreduce.py`` with backend nvshmem and every
candidate variant (Lamport and LL lines, one- and two-shot; jax_nvrar/
_tuning.py says why the flag variants are not candidates) on the 1xG layouts
given. From the measured times (median per size, variant and node size where
several sweeps overlap) it keeps, per (node size, message size), every
variant's time (the rule of jax_nvrar/_tuning.py interpolates them between
sizes), and writes

  * the table, ``jax_nvrar/tuning.json`` by default (``--out``): what
    ``jax_nvrar.psum`` reads unless ``$JAX_NVRAR_TUNING`` names another file;
  * a report, ``benchmarks/results/tuning.md`` (``--report``), also on stdout.

Validation of the rule (_tuning.pick) on sizes it has not seen: per node
size, every other measured size is held out, a table is built from the rest,
and the rule's pick for each held-out size is timed by the measurement of
that pick against the fastest variant measured there. The report gives each
ratio; ``--tolerance`` (10%) is the bar, and the exit status is 1 where a
held-out pick is slower than that. Only measurements on GPUs count: a sweep of
another kind (the CPU functional run) is refused unless --allow-test-input.

Block counts: ``--blocks 16,32,64`` also measures every candidate at those
block counts (settings ``VARIANT/B``; the plain name is the kernel's rule,
csrc/allreduce.cu launch_grid), and the table then chooses among all of
them. Not tuned: threads per block and chunk size (fixed by the kernel).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

if str(H.REPO) not in sys.path:  # run from a checkout
    sys.path.append(str(H.REPO))

from jax_nvrar import _tuning  # noqa: E402

DEFAULT_SIZES = "4K,8K,16K,32K,64K,128K,256K,512K,1M,2M,4M"


def measured(payloads: list[dict], dtype: str) -> dict:
    """{(node_size, size): {variant: median time_us}} over every sweep."""
    times = collections.defaultdict(lambda: collections.defaultdict(list))
    for payload in payloads:
        for r in payload.get("results", []):
            if (r.get("status") == "ok" and r.get("wrong", 0) == 0
                    and r.get("base_backend") == "nvshmem" and r.get("nodes") == 1
                    and _tuning.is_candidate(r.get("algo", ""))
                    and r.get("dtype") == dtype and r.get("time_us")):
                times[(r["node_size"], r["size"])][r["algo"]].append(r["time_us"])
    return {key: {v: statistics.median(ts) for v, ts in by_variant.items()}
            for key, by_variant in times.items()}


def table_entries(points: dict) -> list[dict]:
    """One entry per (node size, size): every variant's time, the fastest."""
    return [{"node_size": g, "size": size, "fastest": min(times, key=times.get),
             "times_us": {v: round(t, 3) for v, t in sorted(times.items())}}
            for (g, size), times in sorted(points.items())]



def validate(points: dict) -> list[dict]:
    """Hold out every other size per node size; time the rule's picks."""
    rows = []
    for g in sorted({g for g, _ in points}):
        sizes = sorted(size for gg, size in points if gg == g)
        train = {(g, s): points[(g, s)] for s in sizes[0::2]}
        entries = _tuning.rows(table_entries(train))
        for size in sizes[1::2]:
            by_variant = points[(g, size)]
            pick = _tuning.pick(entries, size, g)
            best = min(by_variant, key=by_variant.get)
            if pick not in by_variant:
                rows.append({"node_size": g, "size": size, "pick": pick, "best": best,
                             "ratio": None})
                continue
            rows.append({"node_size": g, "size": size, "pick": pick, "best": best,
                         "pick_us": by_variant[pick], "best_us": by_variant[best],
                         "ratio": by_variant[pick] / by_variant[best]})
    return rows


def settings_of(entries) -> list[str]:
    """Every setting in the entries, by variant then block count (rule first)."""
    found = {s for e in entries for s in e["times_us"]}
    return sorted(found, key=lambda s: (_tuning.CANDIDATES.index(_tuning.split(s)[0]),
                                        _tuning.split(s)[1]))


def report(table: dict, tolerance: float) -> str:
    settings = settings_of(table["entries"])
    lines = [f"# Kernel variant table ({table['device']}, {table['dtype']})", "",
             f"Sources: {', '.join(table['sources'])}.", "",
             "Settings: a variant with the kernel's block count rule, or "
             "VARIANT/B with B thread blocks.", "",
             "| PEs per node | size (B) | fastest | "
             + " | ".join(f"{v} (us)" for v in settings) + " |",
             "|---:|---:|---|" + "---:|" * len(settings)]
    for e in table["entries"]:
        cells = [f"{e['times_us'][v]:.2f}" if v in e["times_us"] else "-"
                 for v in settings]
        lines.append(f"| {e['node_size']} | {e['size']} | {e['fastest']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Rule on held-out sizes (every other size left out of the table)", "",
              "| PEs per node | size (B) | rule's pick | fastest | pick / fastest |",
              "|---:|---:|---|---|---:|"]
    for r in table["validation"]:
        ratio = "not measured" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['node_size']} | {r['size']} | {r['pick']} | {r['best']} | {ratio} |")
    worst = table["validation_worst_ratio"]
    lines += ["", f"Worst held-out ratio: {worst:.3f} (bar: {1 + tolerance:.2f})."
              if worst is not None else "No held-out size was measured with the rule's pick.",
              "", "Not tuned: threads per block and chunk size (fixed in "
              "csrc/allreduce.cu launch_grid).", ""]
    return "\n".join(lines)


def build(payloads: list[dict], sources: list[str], dtype: str) -> dict:
    points = measured(payloads, dtype)
    if not points:
        raise SystemExit(f"no single-node measurements of the variants "
                         f"{_tuning.CANDIDATES} in {dtype} in {sources}")
    devices = {d.get("device", {}).get("device_kind") for p in payloads
               for d in p.get("devices", {}).values()} - {None}
    validation = validate(points)
    ratios = [r["ratio"] for r in validation if r["ratio"] is not None]
    return {"schema": _tuning.SCHEMA, "device": ", ".join(sorted(devices)) or "unknown",
            "dtype": dtype, "sources": sources,
            "commands": [p.get("env", {}).get("command") for p in payloads],
            "entries": table_entries(points), "validation": validation,
            "validation_worst_ratio": max(ratios) if ratios else None}


def measure(args) -> str:
    out = Path(args.sweep_dir)
    settings = [f"{v}/{b}" if b else v for v in H.parse_list(args.variants)
                for b in [0] + args.block_counts]
    command = [sys.executable, str(Path(__file__).with_name("allreduce.py")),
               "--backends", "nvshmem", "--algos", ",".join(settings),
               "--layouts", args.layouts, "--sizes", args.sizes, "--dtypes", args.dtype,
               "--decode-models=", "--out-dir", str(out), "--prefix", "tune_sweep"]
    if args.time_budget:
        command += ["--time-budget", str(args.time_budget)]
    H.log("measuring: " + " ".join(command))
    subprocess.run(command, check=True)
    return str(out / "tune_sweep.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="sweeps", nargs="+", metavar="SWEEP",
                   help="allreduce.py JSON files to build from instead of measuring")
    p.add_argument("--layouts", default="1x2,1x4", help="1xG layouts to measure")
    p.add_argument("--sizes", default=DEFAULT_SIZES)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default=",".join(_tuning.CANDIDATES),
                   help="candidate variants to measure")
    p.add_argument("--blocks", default="",
                   help="block counts to measure besides the kernel's rule, "
                        "e.g. 16,32,64")
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--sweep-dir", default=str(H.RESULTS_DIR),
                   help="where the measured sweep goes")
    p.add_argument("--out", default=str(_tuning.SHIPPED), help="the table")
    p.add_argument("--report", default=str(H.RESULTS_DIR / "tuning.md"))
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--allow-test-input", action="store_true",
                   help="accept sweeps that are not GPU measurements (tests)")
    args = p.parse_args(argv)
    unknown = set(H.parse_list(args.variants)) - set(_tuning.CANDIDATES)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {_tuning.CANDIDATES}")
    try:
        args.block_counts = [_tuning.split(f"{_tuning.CANDIDATES[0]}/{b}")[1]
                             for b in H.parse_list(args.blocks)]
    except ValueError as error:
        p.error(f"--blocks: {error}")
    sources = args.sweeps or [measure(args)]
    payloads = [H.load_measurement(s, allow_test_input=args.allow_test_input,
                                   use="its times choose nothing") for s in sources]
    table = build(payloads, sources, args.dtype)
    _tuning.check_table(table, args.out)
    H.write_json(Path(args.out), table)
    text = report(table, args.tolerance)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    print(text)
    H.log(f"wrote {args.out} and {args.report}")
    worst = table["validation_worst_ratio"]
    return int(worst is not None and worst > 1 + args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
