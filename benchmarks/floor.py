"""Lower bound of the all-reduce benchmark's per-call time, from measured parts.

    python benchmarks/floor.py --links benchmarks/results/nvlink_floor.json \\
        --empty benchmarks/results/allreduce_empty_kernel.json [more] \\
        --measured benchmarks/results/allreduce_per_variant_1x2_1x4.json [more] \\
        --out-dir benchmarks/results --prefix floor

A call of ``benchmarks/allreduce.py``'s chain costs at least

  * what the chain costs around a kernel that does nothing: the same sweep
    with ``JAX_NVRAR_FAULT_INJECT=3`` (the kernel returns at its first
    instruction; XLA's graph nodes of the custom call and of the elementwise
    kernel between calls, and the host's share), ``--empty``;
  * plus the time the data need on NVLink (``benchmarks/nvlink_floor.cu``,
    ``--links``): one-way latency L of a 16-byte line, the best per-GPU
    store bandwidth B measured (every GPU storing into every other at once,
    or one pair), for a message of S bytes per rank on G GPUs per node and
    N nodes:

      one-shot (N = 1)      L + (G - 1) S / B
      two-shot (N = 1)      2 L + 2 (G - 1) / G S / B
      hierarchical (N > 1)  (2 + k) L + (2 (G - 1) / G S + k S / G) / B,
                            k = ceil(log2 N) inter-node steps

    the smaller of the first two on one node. Two-shot's bytes are the
    minimum of any all-reduce without reduction in the network (NVLink
    multicast stays off).

The bound adds the two, so it assumes a kernel cannot overlap XLA's per-call
cost; it takes the best bandwidth and latency measured, so a kernel can only
be slower. Against each speed target of the project (the ratio to the same run's XLA
psum, or an absolute time) a row says whether the target lies below the
bound (out of reach in this benchmark, for any kernel) and how far the
kernel is above the bound.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

KB = 1 << 10
MB = 1 << 20
# The speed targets per layout: (smallest size, largest size, kind, value),
# kind "ratio" (XLA psum's time / the kernel's) or "us" (at most this time).
TARGETS = {
    "1x4": [(32 * KB, 512 * KB, "ratio", 3.0), (MB, 2 * MB, "ratio", 2.5),
            (0, 256 * KB, "us", 6.0)],
    "1x2": [(32 * KB, MB, "ratio", 2.5)],
    "2x2": [(128 * KB, 2 * MB, "ratio", 2.0)],
}


def link_figures(payload: dict) -> tuple[float, float]:
    """(one-way latency in us, bytes per us) from nvlink_floor's JSON: the
    smallest latency and the largest bandwidth measured."""
    latency = min(r["one_way_us"] for r in payload["latency"])
    gbps = max(r["gbps_per_sender"] for r in payload["bandwidth"])
    return latency, gbps * 1e3  # GB/s = 1e3 bytes per us


def data_floor(size: int, nodes: int, node_size: int, latency: float,
               bytes_per_us: float) -> tuple[float, str]:
    """(time in us, algorithm) the data need on NVLink at least."""
    G, S = node_size, size
    if nodes > 1:
        k = math.ceil(math.log2(nodes))
        moved = 2 * (G - 1) / G * S + k * S / G
        return (2 + k) * latency + moved / bytes_per_us, "hierarchical"
    one = latency + (G - 1) * S / bytes_per_us
    two = 2 * latency + 2 * (G - 1) / G * S / bytes_per_us
    return (one, "one-shot") if one <= two else (two, "two-shot")


def kernel_times(payloads: list[dict], *, empty: bool) -> dict:
    """(layout, size) -> the default kernel's time (backend "nvshmem"), and
    ("xla", GPUs, size) -> XLA psum's; the first file that has a point wins.
    Empty-kernel sweeps must have run with JAX_NVRAR_FAULT_INJECT=3, the
    others without it."""
    times = {}
    for payload in payloads:
        fault = str(payload["env"].get("env", {}).get("JAX_NVRAR_FAULT_INJECT", "0"))
        if (fault == "3") != empty:
            raise SystemExit(f"floor: {payload['env'].get('command')!r} ran with "
                             f"JAX_NVRAR_FAULT_INJECT={fault}; "
                             f"{'--empty' if empty else '--measured'} needs "
                             f"{'3' if empty else 'the kernel as it is'}")
        for r in payload["results"]:
            if r["status"] != "ok" or r["dtype"] != "bfloat16":
                continue
            if r["backend"] == "nvshmem":
                times.setdefault((r["layout"], r["size"]), r["time_us"])
            elif r["backend"] == "xla" and not empty:
                times.setdefault(("xla", r["nproc"], r["size"]), r["time_us"])
    return times


def targets(layout: str, size: int, xla: float | None, bound: float,
            kernel: float | None) -> list[dict]:
    """The layout's targets at this size, each as a time in us, with whether
    it is at or above the bound (reachable) and whether the kernel met it."""
    out = []
    for lo, hi, kind, value in TARGETS.get(layout, []):
        if not lo <= size <= hi or (kind == "ratio" and xla is None):
            continue
        us = value if kind == "us" else xla / value
        out.append({"target": f"<= {value:g} us" if kind == "us" else f"{value:g}x",
                    "us": us, "reachable": us >= bound,
                    "met": None if kernel is None else kernel <= us})
    return out


def fmt_targets(entries: list[dict]) -> str:
    return "; ".join(f"{t['target']} = {t['us']:.2f}: "
                     f"{'met' if t['met'] else 'reachable' if t['reachable'] else 'out of reach'}"
                     for t in entries) or "-"


def rows(links: dict, empties: list[dict], measured: list[dict]) -> list[dict]:
    latency, bytes_per_us = link_figures(links)
    empty = kernel_times(empties, empty=True)
    real = kernel_times(measured, empty=False)
    out = []
    for (layout, size), call in sorted(empty.items()):
        nodes, node_size = (int(v) for v in layout.split("x"))
        kernel = real.get((layout, size))
        xla = real.get(("xla", nodes * node_size, size))
        floor, algo = data_floor(size, nodes, node_size, latency, bytes_per_us)
        bound = call + floor
        out.append({
            "layout": layout, "size": size, "xla_us": xla, "kernel_us": kernel,
            "speedup": xla / kernel if xla and kernel else None,
            "empty_call_us": call, "data_us": floor, "algorithm": algo,
            "bound_us": bound, "targets": targets(layout, size, xla, bound, kernel),
            "kernel_over_bound_us": kernel - bound if kernel else None,
        })
    return out


def report(payload: dict) -> str:
    p = payload["parts"]
    lines = [
        "# Lower bound of the all-reduce benchmark's per-call time",
        "",
        f"- {payload['device']}, bfloat16; us per call, max over ranks, median of runs.",
        f"- NVLink: one-way latency {p['latency_us']:.2f} us (16-byte line), store bandwidth "
        f"{p['gbps']:.0f} GB/s per GPU (best measured), from {payload['links']}.",
        f"- Empty call: the same sweep with the kernel returning at once, from "
        f"{', '.join(payload['empty'])}; kernel and XLA psum from {', '.join(payload['measured'])}.",
        "- bound = empty call + data (see benchmarks/floor.py). The speed targets as times: "
        "met (the kernel is at or below it), reachable (at or above the bound, not met), or out of "
        "reach (below the bound: no kernel meets it in this benchmark).",
        "",
        "",
    ]
    cols = [("layout", "layout", "s"), ("size", "size", H.fmt_bytes),
            ("xla_us", "XLA psum", ".2f"), ("kernel_us", "kernel", ".2f"),
            ("speedup", "vs XLA", ".2f"), ("empty_call_us", "empty call", ".2f"),
            ("data_us", "data", ".2f"), ("algorithm", "data by", "s"),
            ("bound_us", "bound", ".2f"), ("kernel_over_bound_us", "kernel - bound", ".2f"),
            ("targets", "targets (us)", fmt_targets)]
    return "\n".join(lines) + H.markdown_table(payload["rows"], cols) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", required=True, help="nvlink_floor's JSON")
    p.add_argument("--empty", nargs="+", required=True,
                   help="allreduce.py sweeps run with JAX_NVRAR_FAULT_INJECT=3")
    p.add_argument("--measured", nargs="+", required=True,
                   help="allreduce.py sweeps of the kernel and XLA psum")
    p.add_argument("--out-dir", default=None, help="write PREFIX.json and PREFIX.md here")
    p.add_argument("--prefix", default="floor")
    p.add_argument("--allow-test-input", action="store_true",
                   help="accept sweeps that are not GPU measurements (tests)")
    args = p.parse_args(argv)
    links = json.loads(Path(args.links).read_text())
    use = "a bound needs GPU measurements"
    empties = [H.load_measurement(f, allow_test_input=args.allow_test_input, use=use)
               for f in args.empty]
    measured = [H.load_measurement(f, allow_test_input=args.allow_test_input, use=use)
                for f in args.measured]
    latency, bytes_per_us = link_figures(links)
    payload = {
        "kind": H.MEASURED, "device": links["device"],
        "links": Path(args.links).name, "empty": [Path(f).name for f in args.empty],
        "measured": [Path(f).name for f in args.measured],
        "parts": {"latency_us": latency, "gbps": bytes_per_us / 1e3},
        "targets": {k: [list(t) for t in v] for k, v in TARGETS.items()},
        "rows": rows(links, empties, measured),
    }
    text = report(payload)
    print(text, end="")
    if args.out_dir:
        out = Path(args.out_dir)
        H.write_json(out / f"{args.prefix}.json", payload)
        (out / f"{args.prefix}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
