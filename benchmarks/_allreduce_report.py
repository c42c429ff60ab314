"""Merging, tables and plots of allreduce.py results (nccl-tests vocabulary).

``merge`` joins the JSON-lines records of every group into one payload and
adds the speedup over XLA's psum; ``write_outputs`` writes PREFIX.json,
PREFIX.md (also printed on stdout) and PREFIX.png.
"""

from __future__ import annotations

import collections
from pathlib import Path

import _harness as H
from _allreduce_cases import BACKENDS, Layout


def merge(records_by_group: dict, groups_meta: list, skipped: list,
          meta: dict) -> dict:
    results, devices, links = [], {}, []
    for group, records in records_by_group.items():
        last_begin, ended = None, False
        for rec in records:
            if rec["type"] == "link":
                links.append({k: v for k, v in rec.items() if k != "type"})
            elif rec["type"] == "env":
                devices[group] = {"device": rec["device"],
                                  "jax_nvrar": rec.get("jax_nvrar")}
                skipped.extend(rec.get("skipped", []))
            elif rec["type"] == "begin":
                last_begin = rec["case"]
            elif rec["type"] == "result":
                results.append(dict(rec, group=group))
                last_begin = None
            elif rec["type"] == "end":
                ended = True
        info = next((g for g in groups_meta if g["group"] == group), None)
        if not ended and info is not None:
            info["unfinished_case"] = last_begin
    for rec in results:
        rec.pop("type", None)
    baseline = {(r["dtype"], r["size"], r["nproc"]): r["time_us"]
                for r in results if r["backend"] == "xla"
                and r["status"] == "ok" and r.get("wrong") == 0}
    link_gbps = {link["nproc"]: link["gbps"] for link in links}
    for rec in results:  # no speedup for a wrong answer
        base = baseline.get((rec["dtype"], rec["size"], rec["nproc"]))
        if rec["status"] == "ok" and base and rec.get("wrong") == 0:
            rec["speedup"] = base / rec["time_us"]
        if rec["status"] == "ok" and rec.get("busbw") and rec["nproc"] in link_gbps:
            rec["link_pct"] = 100 * rec["busbw"] / link_gbps[rec["nproc"]]
    return dict(meta, groups=groups_meta, devices=devices, link=links,
                skipped=skipped, results=results)


LAYOUT_ORDER = {"1x2": 0, "1x4": 1, "2x2": 2, "4x1": 3}
BACKEND_ORDER = {b: i for i, b in enumerate(BACKENDS)}


def _series_key(rec):
    return (rec["nproc"], LAYOUT_ORDER.get(rec["layout"], 9), rec["layout"],
            BACKEND_ORDER.get(rec["base_backend"], 9), rec["backend"])


COLUMNS = (
    ("size", "size (B)", "d"), ("count", "count", "d"), ("dtype", "type", "s"),
    ("layout", "layout", "s"), ("backend", "backend", "s"),
    ("time_us", "time (us)", ".2f"), ("algbw", "algbw (GB/s)", ".2f"),
    ("busbw", "busbw (GB/s)", ".2f"), ("link_pct", "busbw % of link", ".0f"),
    ("speedup", "vs xla", ".2f"),
    ("wrong", "#wrong", "d"), ("decode", "decode shapes",
                               lambda v: ", ".join(v) or "")
)


def _series_name(entry: dict) -> str:
    return f"{entry['backend']} @ {entry['layout']}"


def report(payload: dict) -> str:
    functional = payload["kind"] == "functional"
    lines = [f"# {payload['title']}", ""]
    if functional:
        lines += ["**FUNCTIONAL run on simulated CPU devices: checks "
                  "correctness; the times are not performance numbers.**", ""]
    for link in payload.get("link", []):
        lines.append(f"- link bandwidth, {link['nproc']} {'devices' if functional else 'GPUs'}:"
                     f" {link['gbps']:.1f} GB/s per device ({link['method']}); "
                     "'busbw % of link' compares with it")
    lines += H.xla_flags_lines(payload.get("devices", {}))
    if lines[-1]:
        lines.append("")
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    for dtype in sorted({r["dtype"] for r in ok}):
        for layout in sorted({r["layout"] for r in ok if r["dtype"] == dtype},
                             key=lambda l: LAYOUT_ORDER.get(l, 9)):
            rows = sorted((r for r in ok if r["dtype"] == dtype
                           and r["layout"] == layout),
                          key=lambda r: (r["size"], _series_key(r)))
            lay = Layout.parse(layout)
            unit = "devices" if functional else "GPUs"
            lines += [f"## {dtype}, layout {layout} ({lay.n} {unit} as "
                      f"{lay.nodes} node(s) x {lay.node_size})", "",
                      H.markdown_table(rows, COLUMNS), ""]
    missing = H.not_measured(payload["results"], payload["skipped"],
                             _series_name, _series_name)
    if missing:
        lines += ["## Not measured", "", *missing, ""]
    for g in payload["groups"]:
        if g["status"] != "ok":
            lines.append(f"- group {g['group']}: {g['status']} "
                         f"(rc {g['returncode']}, last case "
                         f"{g.get('unfinished_case')})")
    wrong = sum(r.get("wrong", 0) for r in ok)
    lines.append(f"Total #wrong over all measured cases: {wrong}")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> str | None:
    panels = []
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    for dtype in sorted({r["dtype"] for r in ok}):
        for n in sorted({r["nproc"] for r in ok if r["dtype"] == dtype}):
            series = collections.defaultdict(list)
            for r in sorted(ok, key=lambda r: r["size"]):
                if r["dtype"] == dtype and r["nproc"] == n:
                    series[f"{r['backend']} @ {r['layout']}"].append(
                        (r["size"], r["time_us"]))
            panels.append({"title": f"{dtype}, {n} devices",
                           "series": {k: tuple(zip(*v))
                                      for k, v in series.items()},
                           "styles": {k: _style(k) for k in series}})
    if not panels:
        return "nothing measured"
    return H.plot_loglog(path, panels, title=payload["title"],
                         xlabel="message size per rank (bytes)",
                         ylabel="time per all-reduce (us)")


def _style(label: str) -> dict:
    """Colour by backend, line style by layout, so lines read across panels."""
    backend, _, layout = label.partition(" @ ")
    colours = {"xla": "black", "xla_ck": "grey", "nvshmem4py": "tab:purple",
               "reference": "tab:blue", "nvshmem": "tab:red", "auto": "tab:cyan",
               "nvshmem:oneshot": "tab:orange", "nvshmem:twoshot": "tab:green",
               "nvshmem:oneshot_ll": "gold", "nvshmem:twoshot_ll": "tab:olive",
               "nvshmem:oneshot_lamport": "tab:pink",
               "nvshmem:twoshot_lamport": "tab:brown"}
    nodes = Layout.parse(layout).nodes
    return {"color": colours.get(backend),
            "linestyle": {1: "-", 2: "--"}.get(nodes, ":")}


def write_outputs(payload: dict, out_dir: Path, prefix: str) -> dict:
    return H.write_outputs(payload, out_dir, prefix, report=report, plot=plot)


def run_title(kind: str, device: dict | None, n: int) -> str:
    if kind == "functional":
        return (f"all-reduce, FUNCTIONAL run on {n} simulated CPU devices "
                "(not a performance measurement)")
    name = (device or {}).get("device_kind", "GPU")
    return f"all-reduce latency, measured on {name} (up to {n} GPUs)"
