"""Alpha-beta cost model of multi-node all-reduce: where does NVRAR stop winning?

    python benchmarks/cost_model.py benchmarks/results/allreduce.json \
        [more sweeps of the same machine, e.g. allreduce_large.json]

Everything this prints for more than one node is a PREDICTION. The
intra-node parameters are fitted to a measured single-node sweep written by
allreduce.py; the inter-node parameters are published link figures (below).

Model. A node has p GPUs on a switched NVLink fabric, one NIC per GPU; N
nodes, P = N p ranks, m bytes per rank. A link is (alpha us, beta us/byte).
Intra-node links are fitted per algorithm (each implementation has its own
constants); every GPU drives its own NIC. Reduction arithmetic is folded
into beta (these kernels are memory-bound).

  ring     NCCL ring over all P ranks, p rings so each NIC carries one:
           2(P-1) alpha + 2(P-1)/P m max(beta_i, beta_e/p) ; alpha = alpha_e
           when N > 1 (every step waits for its slowest hop).
  tree     NCCL double binary tree between nodes, chain inside a node,
           pipelined (Sanders et al. 2009; NCCL 2.4):
           2[(p-1) alpha_i + ceil(log2 N) alpha_e] + 2 max(m beta_i, m/p beta_e).
  oneshot  every rank reads every peer's full buffer (flat over P ranks):
           max(alpha_i + (p-1) m beta_i, (P-p)(alpha_e + m beta_e)).
  twoshot  flat reduce-scatter + all-gather over P ranks:
           2 max(alpha_i + (p-1)/P m beta_i, (P-p)(alpha_e + m/P beta_e)).
           NVLink loads from all local peers overlap (one alpha_i, fitted);
           messages to remote peers leave one NIC one after another, each
           paying alpha_e (the direct algorithms of Thakur, Rabenseifner and
           Gropp, "Optimization of Collective Communication Operations in
           MPICH", IJHPCA 2005), which is why flat schemes stop scaling.
  nvrar    intra-node reduce-scatter, recursive doubling of the m/p chunk
           between nodes, intra-node all-gather (arXiv 2511.09557):
           2[alpha_i + (p-1)/p m beta_i] + (log2 N' + 2[N != N'])
           (alpha_e + m/p beta_e), N' the largest power of two <= N (the
           other nodes fold into it first and get the result back last).
With N = 1, nvrar is twoshot, and ring is 2(p-1)(alpha + m/p beta).
Each fitted alpha also absorbs the implementation's fixed cost (launch,
dispatch) divided by its step count; with one node size that cannot be
separated from per-step latency, and it is the main limit of the model.

Fitting: for each measured backend, (alpha_i, beta_i) by least squares on
relative error over all sizes of its 1xp layouts (p = 2 and 4 together):
xla -> ring, the kernel's one-shot variants -> oneshot, its two-shot
variants -> twoshot, nvshmem (the default variant) -> nvrar. Multi-node ring
and tree use the xla fit, nvrar the LL two-shot fit (the variant of its
intra phases), oneshot and twoshot the fastest kernel variant of their kind
(Lamport lines), each falling back to what was measured.
Validation: the fitted formulas against every measured point (median / max
relative error), and, out of sample, nvrar on the *virtual* layouts 2x2 and
4x1, whose "inter-node" steps run on NVLink (inter link = intra fit).

Inter-node figures (per GPU NIC; override with --inter NAME=ALPHA_US:GBPS):
  ib_ndr      400 Gb/s = 50 GB/s per port: NVIDIA ConnectX-7 adapter and
              Quantum-2 (NDR) switch datasheets. alpha 1.5 us: within the
              1-2 us GPU-to-GPU one-way latency usually reported for NDR
              (adapter ~0.6 us + switch hops + GPU/PCIe); an assumption, not
              a datasheet number.
  slingshot11 200 Gb/s = 25 GB/s per Cassini NIC port: De Sensi et al., "An
              In-Depth Analysis of the Slingshot Interconnect", SC'20
              (arXiv:2008.08886; Rosetta switch, 64 ports x 200 Gb/s, ~350 ns
              per switch). alpha 2.5 us: within the 2-3 us GPU-to-GPU range of
              De Sensi et al., "Exploring GPU-to-GPU Communication: Insights
              into Supercomputer Interconnects", SC'24 (arXiv:2408.14090,
              Alps and LUMI); an assumption read from that range (figures
              cited from memory: check them before quoting).
Bandwidths are nominal link rates, so predictions are optimistic for large
messages; --nic-efficiency scales them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

ALGORITHMS = ("ring", "tree", "oneshot", "twoshot", "nvrar")
#: measured backend -> the formula it is fitted with.
FIT_FORMS = {"xla": "ring", "nvshmem:oneshot": "oneshot",
             "nvshmem:twoshot": "twoshot", "nvshmem:oneshot_ll": "oneshot",
             "nvshmem:twoshot_ll": "twoshot",
             "nvshmem:oneshot_lamport": "oneshot",
             "nvshmem:twoshot_lamport": "twoshot", "nvshmem": "nvrar"}
#: which fitted backend supplies each algorithm's intra-node link, in order
#: of preference.
INTRA_SOURCE = {"ring": ("xla",), "tree": ("xla",),
                "oneshot": ("nvshmem:oneshot_lamport", "nvshmem:oneshot",
                            "nvshmem", "xla"),
                "twoshot": ("nvshmem:twoshot_lamport", "nvshmem:twoshot",
                            "nvshmem", "xla"),
                "nvrar": ("nvshmem:twoshot_ll", "nvshmem:twoshot", "nvshmem",
                          "xla")}


@dataclasses.dataclass(frozen=True)
class Link:
    alpha: float  # us per message step
    beta: float   # us per byte

    @classmethod
    def from_gbps(cls, alpha_us: float, gbytes_per_s: float) -> "Link":
        return cls(alpha_us, 1e-3 / gbytes_per_s)  # 1 GB/s = 1e3 bytes/us

    @property
    def gbps(self) -> float:
        return 1e-3 / self.beta if self.beta > 0 else math.inf


INTERCONNECTS = {
    "ib_ndr": Link.from_gbps(1.5, 50.0),
    "slingshot11": Link.from_gbps(2.5, 25.0),
}


# --------------------------------------------------------------------------
# Formulas: microseconds for m bytes per rank, N nodes of p GPUs
# --------------------------------------------------------------------------

def ring(m: float, nodes: int, p: int, intra: Link, inter: Link) -> float:
    P = nodes * p
    if P == 1:
        return 0.0
    if nodes == 1:
        return 2 * (P - 1) * (intra.alpha + m / P * intra.beta)
    beta = max(intra.beta, inter.beta / p)
    return 2 * (P - 1) * max(intra.alpha, inter.alpha) + 2 * (P - 1) / P * m * beta


def tree(m: float, nodes: int, p: int, intra: Link, inter: Link) -> float:
    depth = math.ceil(math.log2(nodes)) if nodes > 1 else 0
    latency = 2 * ((p - 1) * intra.alpha + depth * inter.alpha)
    bandwidth = m * intra.beta if p > 1 else 0.0
    if nodes > 1:
        bandwidth = max(bandwidth, m / p * inter.beta)
    return latency + 2 * bandwidth


def oneshot(m: float, nodes: int, p: int, intra: Link, inter: Link) -> float:
    P = nodes * p
    local = intra.alpha + (p - 1) * m * intra.beta
    remote = (P - p) * (inter.alpha + m * inter.beta)
    return max(local, remote)


def twoshot(m: float, nodes: int, p: int, intra: Link, inter: Link) -> float:
    P = nodes * p
    local = intra.alpha + (p - 1) / P * m * intra.beta
    remote = (P - p) * (inter.alpha + m / P * inter.beta)
    return 2 * max(local, remote)


def nvrar_steps(nodes: int) -> int:
    """Inter-node exchanges of recursive doubling with fold/unfold."""
    if nodes <= 1:
        return 0
    power = 1 << (nodes.bit_length() - 1)
    return int(math.log2(power)) + (2 if power != nodes else 0)


def nvrar(m: float, nodes: int, p: int, intra: Link, inter: Link) -> float:
    local = 2 * (intra.alpha + (p - 1) / p * m * intra.beta) if p > 1 else 0.0
    return local + nvrar_steps(nodes) * (inter.alpha + m / p * inter.beta)


FORMULAS = {"ring": ring, "tree": tree, "oneshot": oneshot,
            "twoshot": twoshot, "nvrar": nvrar}


def predict(algo: str, m: float, nodes: int, p: int, intra: Link,
            inter: Link) -> float:
    return FORMULAS[algo](m, nodes, p, intra, inter)


# --------------------------------------------------------------------------
# Fit and validation
# --------------------------------------------------------------------------

def single_node_coefficients(algo: str, m: float, p: int) -> tuple[float, float]:
    """T = c_alpha * alpha + c_beta * beta on one node. The formulas are
    linear there, so the coefficients are the formula at unit links."""
    zero = Link(0.0, 0.0)
    return (predict(algo, m, 1, p, Link(1.0, 0.0), zero),
            predict(algo, m, 1, p, Link(0.0, 1.0), zero))


def fit_link(algo: str, points) -> Link:
    """Least squares on relative error over (bytes, p, time_us) points,
    with alpha, beta >= 0 (a negative one is pinned to 0 and the other
    refitted)."""
    import numpy as np

    rows = np.array([single_node_coefficients(algo, m, p) for m, p, _ in points])
    times = np.array([t for _, _, t in points], dtype=float)
    a = rows / times[:, None]
    b = np.ones_like(times)
    alpha, beta = np.linalg.lstsq(a, b, rcond=None)[0]
    if alpha < 0 or beta < 0:
        col = 1 if alpha < 0 else 0
        value = max(0.0, float(np.linalg.lstsq(a[:, [col]], b, rcond=None)[0][0]))
        alpha, beta = (0.0, value) if alpha < 0 else (value, 0.0)
    return Link(float(alpha), float(beta))


def relative_errors(pairs) -> dict:
    errors = [abs(pred - meas) / meas for pred, meas in pairs]
    if not errors:
        return {"n": 0}
    return {"n": len(errors), "median": statistics.median(errors),
            "max": max(errors)}


def load_sweep(path: Path, *, allow_test_input: bool) -> dict:
    return H.load_measurement(
        path, allow_test_input=allow_test_input,
        use="a fit to it predicts nothing. Pass --allow-test-input to exercise "
            "the model anyway (outputs are then labelled as such).")


def load_sweeps(paths: list, *, allow_test_input: bool) -> dict:
    """One payload from several sweeps of one machine: the first's metadata,
    every file's results (each tagged with its file), the kind "performance"
    only if every file is a measurement."""
    payloads = [load_sweep(p, allow_test_input=allow_test_input)
                for p in paths]
    merged = dict(payloads[0])
    merged["results"] = [dict(r, source=str(path)) for path, payload
                         in zip(paths, payloads)
                         for r in payload.get("results", [])]
    kinds = {payload.get("kind") for payload in payloads}
    merged["kind"] = kinds.pop() if len(kinds) == 1 else "mixed"
    merged["sources"] = [str(p) for p in paths]
    return merged


def measured_points(payload: dict, dtype: str) -> list[dict]:
    return [r for r in payload.get("results", [])
            if r.get("status") == "ok" and r.get("wrong", 0) == 0
            and r.get("dtype") == dtype and r.get("time_us")]


def fit_all(rows: list[dict]) -> dict:
    """backend -> {"form", "link", "points"} for each measured 1xp backend."""
    fits = {}
    for backend, form in FIT_FORMS.items():
        pts = [(r["size"], r["node_size"], r["time_us"]) for r in rows
               if r["backend"] == backend and r["nodes"] == 1]
        if len(pts) >= 2:
            fits[backend] = {"form": form, "link": fit_link(form, pts),
                             "points": len(pts)}
    return fits


def intra_links(fits: dict) -> dict:
    """algorithm -> (link, backend it came from)."""
    links = {}
    for algo, sources in INTRA_SOURCE.items():
        for backend in sources:
            if backend in fits:
                links[algo] = (fits[backend]["link"], backend)
                break
    return links


def validate(rows: list[dict], fits: dict, links: dict) -> list[dict]:
    report = []
    for backend, fit in fits.items():
        for p in sorted({r["node_size"] for r in rows
                         if r["backend"] == backend and r["nodes"] == 1}):
            pairs = [(predict(fit["form"], r["size"], 1, p, fit["link"],
                              fit["link"]), r["time_us"]) for r in rows
                     if r["backend"] == backend and r["nodes"] == 1
                     and r["node_size"] == p]
            report.append({"backend": backend, "layout": f"1x{p}",
                           "form": fit["form"], "sample": "in (fitted)",
                           **relative_errors(pairs)})
    if "nvrar" in links:
        link, source = links["nvrar"]
        for layout in sorted({r["layout"] for r in rows
                              if r["backend"] == "nvshmem" and r["nodes"] > 1}):
            sel = [r for r in rows
                   if r["backend"] == "nvshmem" and r["layout"] == layout]
            pairs = [(predict("nvrar", r["size"], r["nodes"], r["node_size"],
                              link, link), r["time_us"]) for r in sel]
            report.append({"backend": "nvshmem", "layout": layout,
                           "form": "nvrar", "sample": f"out (intra fit of "
                           f"{source}; virtual nodes on NVLink)",
                           **relative_errors(pairs)})
    return report


def synthetic_sweep(links: dict, *, node_sizes=(2, 4), sizes=None,
                    layouts=((2, 2), (4, 1))) -> dict:
    """An allreduce.py-shaped payload generated from the formulas (kind
    "synthetic"), for tests of the fit and the pipeline. Never a result."""
    sizes = sizes or [1 << k for k in range(12, 27)]
    results = []

    def row(backend, nodes, node_size, m, t):
        results.append({"backend": backend, "layout": f"{nodes}x{node_size}",
                        "nodes": nodes, "node_size": node_size,
                        "nproc": nodes * node_size, "dtype": "bfloat16",
                        "size": m, "time_us": t, "status": "ok", "wrong": 0})

    for backend, link in links.items():
        for p in node_sizes:
            for m in sizes:
                row(backend, 1, p, m,
                    predict(FIT_FORMS[backend], m, 1, p, link, link))
    nvrar_link = links.get("nvshmem:twoshot") or links.get("nvshmem")
    if nvrar_link is not None:
        for nodes, node_size in layouts:
            for m in sizes:
                row("nvshmem", nodes, node_size, m,
                    predict("nvrar", m, nodes, node_size, nvrar_link,
                            nvrar_link))
    return {"schema": "jax_nvrar.allreduce/1", "kind": "synthetic",
            "results": results,
            "devices": {"synthetic": {"device": {"device_kind": "synthetic"}}}}


# --------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------

def predictions(links: dict, inters: dict, p: int, nodes: list[int],
                sizes: list[int]) -> list[dict]:
    rows = []
    for net, inter in inters.items():
        for n in nodes:
            for m in sizes:
                times = {a: predict(a, m, n, p, links[a][0], inter)
                         for a in ALGORITHMS if a in links}
                best = min(times, key=times.get)
                rows.append({"interconnect": net, "nodes": n, "gpus": n * p,
                             "size": m, **{f"{a}_us": t for a, t in times.items()},
                             "best": best})
    return rows


def crossovers(pred: list[dict]) -> list[dict]:
    """Per interconnect and size: the first node count (> 1) at which ring,
    and tree, is at least as fast as nvrar (None: not up to the largest),
    and every node count at which nvrar beats both. Not monotonic: a node
    count that is not a power of two costs nvrar a fold and an unfold."""
    out = []
    for net, size in sorted({(r["interconnect"], r["size"]) for r in pred}):
        sel = sorted((r for r in pred if r["interconnect"] == net
                      and r["size"] == size), key=lambda r: r["nodes"])
        entry = {"interconnect": net, "size": size}
        for rival in ("ring", "tree"):
            entry[f"vs_{rival}"] = next(
                (r["nodes"] for r in sel if r["nodes"] > 1
                 and r.get(f"{rival}_us", math.inf) <= r["nvrar_us"]), None)
        entry["nvrar_fastest_at"] = [
            r["nodes"] for r in sel
            if r["nvrar_us"] < min(r.get("ring_us", math.inf),
                                   r.get("tree_us", math.inf))]
        out.append(entry)
    return out


def _nodes_text(value, largest: int) -> str:
    return f"> {largest}" if value is None else str(value)


def _ranges(values: list[int], universe: list[int]) -> str:
    """[1, 2, 4, 8] within [1, 2, 3, 4, 6, 8, 12] -> '1-2, 4, 8'."""
    if not values:
        return "none"
    runs, start, prev = [], None, None
    for n in universe:
        if n in values:
            start = n if start is None else start
            prev = n
        elif start is not None:
            runs.append((start, prev))
            start = None
    if start is not None:
        runs.append((start, prev))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def report(result: dict) -> str:
    label = result["label"]
    lines = [f"# All-reduce cost model -- {label}", ""]
    if result["test_input"]:
        lines += ["**Fitted to a functional/synthetic input: the numbers test "
                  "the pipeline and mean nothing about hardware.**", ""]
    lines += ["## Intra-node fit (measured, "
              f"{result['source']['dtype']}, {result['source']['device']})", "",
              H.markdown_table(
                  [{"backend": b, **f} for b, f in result["fits"].items()],
                  (("backend", "backend", "s"), ("form", "formula", "s"),
                   ("alpha_us", "alpha (us)", ".2f"),
                   ("gbps", "1/beta (GB/s)", ".1f"), ("points", "points", "d"))),
              "", "Intra-node link used for each algorithm's predictions: "
              + ", ".join(f"{a} <- {b}" for a, b in
                          result["intra_link_source"].items()) + ".",
              "", "## Validation against the measured sweep", "",
              H.markdown_table(result["validation"], (
                  ("backend", "backend", "s"), ("layout", "layout", "s"),
                  ("form", "formula", "s"), ("sample", "sample", "s"),
                  ("n", "points", "d"), ("median", "median rel. err", ".1%"),
                  ("max", "max rel. err", ".1%"))), ""]
    largest = max(result["nodes"])
    for net, link in result["interconnects"].items():
        lines += [f"## PREDICTION: {net} (alpha {link['alpha_us']} us, "
                  f"{link['gbps']:.0f} GB/s per GPU NIC), "
                  f"{result['gpus_per_node']} GPUs per node", ""]
        rows = [r for r in result["predictions"] if r["interconnect"] == net
                and r["size"] in result["table_sizes"]]
        cols = [("size", "size", H.fmt_bytes), ("nodes", "nodes", "d")]
        cols += [(f"{a}_us", f"{a} (us, pred.)", ".1f") for a in ALGORITHMS
                 if any(f"{a}_us" in r for r in rows)]
        cols += [("best", "fastest (pred.)", "s")]
        lines += [H.markdown_table(sorted(rows, key=lambda r: (r["size"],
                                                               r["nodes"])),
                                   cols), ""]
        cross = [c for c in result["crossovers"] if c["interconnect"] == net]
        lines += [f"### PREDICTION: where NVRAR stops winning on {net}", "",
                  H.markdown_table(
                      [dict(c, vs_ring=_nodes_text(c["vs_ring"], largest),
                            vs_tree=_nodes_text(c["vs_tree"], largest),
                            fastest=_ranges(c["nvrar_fastest_at"],
                                            result["nodes"]))
                       for c in cross],
                      (("size", "size", H.fmt_bytes),
                       ("vs_ring", "ring <= NVRAR from N =", "s"),
                       ("vs_tree", "tree <= NVRAR from N =", "s"),
                       ("fastest", "NVRAR beats both at N =", "s"))),
                  ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as error:
        return f"matplotlib not importable: {error}"
    nets = list(result["interconnects"])
    colours = {"ring": "black", "tree": "tab:blue", "oneshot": "tab:orange",
               "twoshot": "tab:green", "nvrar": "tab:red"}
    fig, axes = plt.subplots(len(nets), 2, figsize=(14, 5 * len(nets)),
                             squeeze=False)
    pred = result["predictions"]
    show = result["plot_sizes"]
    styles = ["-", "--", ":", "-."]
    for row, net in zip(axes, nets):
        ax = row[0]
        for i, m in enumerate(show):
            sel = sorted((r for r in pred if r["interconnect"] == net
                          and r["size"] == m), key=lambda r: r["nodes"])
            for algo in ("ring", "tree", "nvrar"):
                if sel and f"{algo}_us" in sel[0]:
                    ax.plot([r["nodes"] for r in sel],
                            [r[f"{algo}_us"] for r in sel],
                            color=colours[algo], linestyle=styles[i % 4],
                            label=f"{algo} {H.fmt_bytes(m)}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"nodes ({result['gpus_per_node']} GPUs each)")
        ax.set_ylabel("predicted time per all-reduce (us)")
        ax.set_title(f"PREDICTION, {net}: latency vs node count", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)

        ax = row[1]
        sizes = sorted({r["size"] for r in pred if r["interconnect"] == net})
        nodes = [n for n in result["nodes"] if n > 1]
        grid = np.full((len(sizes), len(nodes)), np.nan)
        for r in pred:
            if r["interconnect"] == net and r["nodes"] > 1:
                rival = min(r.get("ring_us", math.inf), r.get("tree_us", math.inf))
                grid[sizes.index(r["size"]), nodes.index(r["nodes"])] = \
                    math.log2(rival / r["nvrar_us"])
        lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="RdBu",
                          vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(nodes)), [str(n) for n in nodes])
        ax.set_yticks(range(len(sizes)), [H.fmt_bytes(s) for s in sizes])
        ax.set_xlabel("nodes")
        ax.set_ylabel("message size per rank")
        ax.set_title(f"PREDICTION, {net}: log2(best of ring/tree / NVRAR); "
                     "blue = NVRAR faster", fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"All-reduce alpha-beta model -- {result['label']}",
                 fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(sweep: dict, *, dtype: str, p: int, nodes: list[int],
        sizes: list[int], inters: dict, nic_efficiency: float,
        test_input: bool) -> dict:
    rows = measured_points(sweep, dtype)
    fits = fit_all(rows)
    if not fits:
        raise SystemExit(f"no measured 1xN points of dtype {dtype} for "
                         f"{sorted(FIT_FORMS)} to fit")
    links = intra_links(fits)
    inters = {k: Link(v.alpha, v.beta / nic_efficiency)
              for k, v in inters.items()}
    pred = predictions(links, inters, p, nodes, sizes)
    device = next(iter(sweep.get("devices", {}).values()), {}).get(
        "device", {}).get("device_kind", "unknown device")
    label = ("TEST INPUT, not hardware" if test_input else
             f"intra-node fit to {device}; multi-node numbers are predictions")
    return {
        "schema": "jax_nvrar.cost_model/1", "label": label,
        "test_input": test_input,
        "source": {"kind": sweep.get("kind"), "dtype": dtype,
                   "device": device,
                   "command": sweep.get("env", {}).get("command"),
                   "files": sweep.get("sources")},
        "gpus_per_node": p, "nodes": nodes, "sizes": sizes,
        "nic_efficiency": nic_efficiency,
        "fits": {b: {"form": f["form"], "alpha_us": f["link"].alpha,
                     "beta_us_per_byte": f["link"].beta,
                     "gbps": f["link"].gbps, "points": f["points"]}
                 for b, f in fits.items()},
        "intra_link_source": {a: src for a, (_, src) in links.items()},
        "validation": validate(rows, fits, links),
        "interconnects": {k: {"alpha_us": v.alpha, "gbps": v.gbps}
                          for k, v in inters.items()},
        "predictions": pred,
        "crossovers": crossovers(pred),
        "table_sizes": [s for s in sizes if s in (8 << 10, 64 << 10, 512 << 10,
                                                  4 << 20, 32 << 20)] or sizes[:5],
        "plot_sizes": [s for s in sizes if s in (8 << 10, 512 << 10, 32 << 20)]
        or sizes[:3],
    }


def parse_inter(items: list[str]) -> dict:
    inters = dict(INTERCONNECTS)
    for item in items:
        try:
            name, spec = item.split("=")
            alpha, gbps = (float(v) for v in spec.split(":"))
        except ValueError:
            raise SystemExit(f"--inter {item!r}: use NAME=ALPHA_US:GBPS")
        inters[name] = Link.from_gbps(alpha, gbps)
    return inters


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", nargs="+",
                   help="JSON written by benchmarks/allreduce.py (several: "
                        "their points are fitted together)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpus-per-node", type=int, default=4)
    p.add_argument("--nodes", default="1,2,3,4,6,8,12,16,24,32,48,64")
    p.add_argument("--sizes", default="4K:64M",
                   help="message sizes per rank (allreduce.py syntax)")
    p.add_argument("--interconnects", default=",".join(INTERCONNECTS))
    p.add_argument("--inter", action="append", default=[],
                   help="add or replace one: NAME=ALPHA_US:GBPS")
    p.add_argument("--nic-efficiency", type=float, default=1.0,
                   help="fraction of the nominal NIC bandwidth achieved")
    p.add_argument("--out-dir", default=str(H.RESULTS_DIR))
    p.add_argument("--prefix", default="cost_model")
    p.add_argument("--allow-test-input", action="store_true",
                   help="accept a functional (CPU) or synthetic sweep; "
                        "outputs are labelled TEST INPUT")
    args = p.parse_args(argv)
    if not 0 < args.nic_efficiency <= 1:
        p.error("--nic-efficiency must be in (0, 1]")
    sweep = load_sweeps(args.sweep, allow_test_input=args.allow_test_input)
    test_input = sweep.get("kind") != H.MEASURED
    every = parse_inter(args.inter)
    names = H.parse_list(args.interconnects) + [i.split("=")[0]
                                                 for i in args.inter]
    unknown = [n for n in names if n not in every]
    if unknown:
        p.error(f"unknown interconnects {unknown}; known {sorted(every)}")
    result = run(sweep, dtype=args.dtype, p=args.gpus_per_node,
                 nodes=[int(n) for n in H.parse_list(args.nodes)],
                 sizes=H.parse_sizes(args.sizes),
                 inters={n: every[n] for n in dict.fromkeys(names)},
                 nic_efficiency=args.nic_efficiency, test_input=test_input)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    why = plot(result, out / f"{args.prefix}.png")
    result["plot"] = (str(out / f"{args.prefix}.png") if why is None
                      else f"not drawn: {why}")
    text = report(result)
    (out / f"{args.prefix}.md").write_text(text)
    H.write_json(out / f"{args.prefix}.json", result)
    print(text)
    H.log(f"wrote {out / args.prefix}.{{json,md}}"
          + (", .png" if why is None else f" (no plot: {why})"))
    return result


if __name__ == "__main__":
    main()
