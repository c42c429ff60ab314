"""Merging, derived columns, tables and plots of decode.py results.

``merge`` joins the JSON-lines records of every group into one payload;
``derive`` adds the pipelined decode step (e2e minus TTFT over the decode
steps: the device time per step without a host synchronisation after each)
and what needs two rows (speedup over XLA's psum, all-reduce share against
the no-communication variant, full-model predictions of truncated models),
and can be re-run on merged payloads; ``write_outputs``
writes PREFIX.json, PREFIX.md (also printed on stdout) and PREFIX.png.
"""

from __future__ import annotations

import collections
from pathlib import Path

import _harness as H
from _decode_cases import BACKENDS, NOCOMM_NOTE

PREDICTION = "PREDICTION (extrapolated from truncated runs, not measured)"
#: The step time that speedups, shares and rates use (see _pipelined).
STEP = "step_pipelined_ms"
TIME_KEYS = ("ttft_ms", "step_median_ms", "step_mean_ms", "step_pipelined_ms")
DERIVED = ("step_speedup", "e2e_speedup", "ttft_speedup", "ar_share_step_pct",
           "ar_share_ttft_pct", "step_pipelined_ms", "pipelined_tokens_per_s",
           "pipelined_hbm_gbps", "pipelined_roofline_pct", "pipelined_note")


def merge(records_by_group: dict, groups_meta: list, skipped: list, meta: dict) -> dict:
    results, devices, copies, plans, configs = [], {}, [], [], {}
    for group, records in records_by_group.items():
        ended = False
        for rec in records:
            kind = rec.get("type")
            if kind == "env":
                devices[group] = rec["device"]
                configs[group] = rec.get("jax_nvrar_config")
                skipped.extend(rec.get("skipped", []))
            elif kind == "copy":
                copies.append({k: v for k, v in rec.items() if k != "type"} | {"group": group})
            elif kind == "plan":
                plans.append({k: v for k, v in rec.items() if k != "type"} | {"group": group})
            elif kind == "skip":
                what = " ".join(filter(None, (rec.get("model"), f"tp={rec['tp']}")))
                skipped.append({"what": what, "reason": rec["reason"]})
            elif kind == "result":
                results.append({k: v for k, v in rec.items() if k != "type"} | {"group": group})
            elif kind == "end":
                ended = True
        info = next((g for g in groups_meta if g["group"] == group), None)
        if info is not None and not ended:
            info["finished"] = False
    payload = dict(meta, groups=groups_meta, devices=devices, jax_nvrar_config=configs,
                   copy=copies, plans=plans, skipped=skipped, results=results)
    return derive(payload)


def _case(r) -> tuple:
    """A case without its variant; runs merged from files may differ only in shapes."""
    return (r["model"], r["tp"], r["workload"], r["prompt_len"], r["gen_len"], r["batch"])


def _key(r) -> tuple:
    return _case(r) + (r["layers"], r["role"])


def _speedups(rows, baseline, shares_from) -> None:
    """Fill DERIVED in ``rows`` from ``baseline`` (xla) and ``shares_from``
    (nocomm) rows of the same key."""
    def ratio(other, r, key):  # None where either row lacks the time
        return other[key] / r[key] if key in other and key in r else None

    for r in rows:
        base, bare = baseline.get(_key(r)), shares_from.get(_key(r))
        derived = {}
        if base and r["backend"] not in ("xla", "nocomm"):
            derived.update(step_speedup=ratio(base, r, STEP),
                           ttft_speedup=ratio(base, r, "ttft_ms"),
                           e2e_speedup=ratio(base, r, "e2e_ms"))
        if bare and r["backend"] != "nocomm":
            for share, key in (("ar_share_step_pct", STEP), ("ar_share_ttft_pct", "ttft_ms")):
                q = ratio(bare, r, key)
                derived[share] = None if q is None else 100 * (1 - q)
        r.update({k: v for k, v in derived.items() if v is not None})


def _pipelined(r) -> None:
    """The decode step without a host synchronisation after each: (e2e -
    TTFT) / decode steps, and the rates that follow from it. A step time
    measured with a synchronisation after every step also carries the host's
    round trip and the slowest rank's jitter of each step."""
    steps = r["gen_len"] - 1
    if steps < 1:
        return
    if r["e2e_ms"] <= r["ttft_ms"]:  # medians of different runs: noise won
        r["pipelined_note"] = (f"not derived: e2e {r['e2e_ms']:.3f} ms <= TTFT "
                               f"{r['ttft_ms']:.3f} ms (timing noise)")
        return
    r["step_pipelined_ms"] = (r["e2e_ms"] - r["ttft_ms"]) / steps
    seconds = r["step_pipelined_ms"] / 1e3
    r["pipelined_tokens_per_s"] = r["batch"] / seconds
    if "weight_read_bytes" in r:
        r["pipelined_hbm_gbps"] = (r["weight_read_bytes"] + r["kv_read_bytes"]) / seconds / 1e9
        if r.get("copy_gbps"):
            r["pipelined_roofline_pct"] = 100 * r["pipelined_hbm_gbps"] / r["copy_gbps"]


def _predict(main: dict, fit: dict | None) -> dict | None:
    """Full-model times of a truncated run. Each layer costs the same, so
    time(L) = fixed + L x per_layer; the L-layer and 1-layer runs give both."""
    full, layers = main["full_layers"], main["layers"]
    pred = {k: main[k] for k in ("model", "tp", "workload", "batch", "prompt_len",
                                 "gen_len", "backend", "variant", "layout", "group")}
    pred.update(label=PREDICTION, measured_layers=layers, full_layers=full, role="main")
    for k in TIME_KEYS:
        if k not in main or (fit is not None and k not in fit):
            continue  # no decode step (gen_len 1): no pipelined step
        if layers == 1:
            per_layer, fixed = main[k], 0.0
        elif fit is not None:
            per_layer = (main[k] - fit[k]) / (layers - 1)
            fixed = fit[k] - per_layer
        else:
            return None
        pred[f"per_layer_{k}"] = per_layer
        pred[k] = fixed + full * per_layer
    pred["method"] = ("N x the 1-layer time (an upper bound: embedding and LM head counted "
                      "N times)" if layers == 1 else
                      f"linear fit through the {layers}-layer and 1-layer runs, "
                      f"extrapolated to {full} layers")
    if STEP in pred:
        pred["e2e_ms"] = pred["ttft_ms"] + (main["gen_len"] - 1) * pred[STEP]
        pred["tokens_per_s"] = main["batch"] / pred[STEP] * 1e3
    pred["layers"] = full
    return pred


def derive(payload: dict) -> dict:
    results = payload["results"]
    ok = [r for r in results if r["status"] == "ok"]
    for r in ok:
        for k in DERIVED:
            r.pop(k, None)
        _pipelined(r)
    _speedups(ok, {_key(r): r for r in ok if r["backend"] == "xla"},
              {_key(r): r for r in ok if r["backend"] == "nocomm"})
    fits = {_case(r) + (r["variant"],): r for r in ok if r["role"] == "fit"}
    preds = []
    for r in ok:
        if r["role"] == "main" and r["truncated"]:
            p = _predict(r, fits.get(_case(r) + (r["variant"],)))
            if p is not None:
                preds.append(p)
    _speedups(preds, {_key(p): p for p in preds if p["backend"] == "xla"},
              {_key(p): p for p in preds if p["backend"] == "nocomm"})
    payload["predictions"] = preds
    checked = [r for r in ok if r["mismatched"] is not None and r["backend"] != "nocomm"
               and r["backend"] != "xla"]
    by_backend = collections.defaultdict(lambda: [0, 0])
    for r in checked:
        by_backend[r["backend"]][0] += r["mismatched"]
        by_backend[r["backend"]][1] += r["batch"] * r["gen_len"]
    payload["token_check"] = {
        b: {"mismatched": m, "compared": n, "dtypes": sorted({r["dtype"] for r in checked
                                                               if r["backend"] == b})}
        for b, (m, n) in sorted(by_backend.items())}
    return payload


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------

ORDER = {b: i for i, b in enumerate(BACKENDS)}
WORKLOAD_NAMES = {"decode": "decode-heavy", "prefill": "prefill-heavy"}


def _row_order(r) -> tuple:
    return (r["batch"], ORDER.get(r["backend"], 9), r["layout"])


def _variant_cell(v: str) -> str:
    return f"{v} (identity, wrong numbers)" if v == "nocomm" else v


COLUMNS = (
    ("batch", "batch", "d"), ("variant", "backend", _variant_cell),
    ("ttft_ms", "TTFT (ms)", ".2f"), ("step_median_ms", "step, synced (ms)", ".3f"),
    ("step_pipelined_ms", "step (ms)", ".3f"), ("host_step_ms", "host per step (ms)", ".3f"),
    ("e2e_ms", "e2e batch (ms)", ".1f"),
    ("pipelined_tokens_per_s", "decode tok/s", ".0f"),
    ("pipelined_hbm_gbps", "HBM (GB/s)", ".1f"),
    ("pipelined_roofline_pct", "% of copy bw", ".0f"),
    ("ar_share_step_pct", "all-reduce % of step", ".0f"),
    ("ar_share_ttft_pct", "all-reduce % of TTFT", ".0f"),
    ("step_speedup", "step vs xla", ".2f"), ("e2e_speedup", "e2e vs xla", ".2f"),
    ("mismatched", "#mismatch", "d"),
)
PRED_COLUMNS = (
    ("model", "model", "s"), ("tp", "TP", "d"), ("workload", "workload", "s"),
    ("batch", "batch", "d"), ("variant", "backend", _variant_cell),
    ("measured_layers", "layers run", "d"), ("full_layers", "layers", "d"),
    ("per_layer_step_pipelined_ms", "per-layer step (ms)", ".4f"),
    ("step_pipelined_ms", "pred. step (ms)", ".2f"), ("ttft_ms", "pred. TTFT (ms)", ".1f"),
    ("e2e_ms", "pred. e2e (ms)", ".0f"), ("tokens_per_s", "pred. tok/s", ".0f"),
    ("ar_share_step_pct", "pred. all-reduce % of step", ".0f"),
    ("step_speedup", "pred. step vs xla", ".2f"),
)


def report(payload: dict) -> str:
    functional = payload["kind"] == "functional"
    lines = [f"# {payload['title']}", ""]
    if functional:
        lines += ["**FUNCTIONAL run on simulated CPU devices: checks that the benchmark "
                  "and the token comparison work; the times are not performance "
                  "numbers.**", ""]
    for c in payload["copy"]:
        lines.append(f"- copy bandwidth, TP={c['tp']} group: {c['copy_gbps']:.0f} GB/s per "
                     f"device ({c['method']})")
    lines += H.xla_flags_lines(payload.get("devices", {}))
    lines.append("")
    ok = [r for r in payload["results"] if r["status"] == "ok" and r["role"] == "main"]
    sections = collections.defaultdict(list)
    for r in ok:
        sections[_case(r)[:-1] + (r["layers"],)].append(r)
    for (model, tp, workload, _, _, layers), rows in sorted(sections.items()):
        r0 = rows[0]
        cut = (f", TRUNCATED to {layers} of {r0['full_layers']} layers (full-model "
               "numbers below are predictions)") if r0["truncated"] else f", {layers} layers"
        lines += [f"## {model}{cut}, TP={tp}, {WORKLOAD_NAMES.get(workload, workload)} "
                  f"(prompt {r0['prompt_len']}, generate {r0['gen_len']}), {r0['dtype']}", "",
                  H.markdown_table(sorted(rows, key=_row_order), COLUMNS), ""]
    if payload.get("predictions"):
        lines += [f"## Full-model times: {PREDICTION}", "",
                  "Each layer costs the same, so time(L) = fixed + L x per-layer; the "
                  "truncated run and a 1-layer run of the same case give both terms.", "",
                  H.markdown_table(sorted(payload["predictions"], key=lambda p: (
                      p["model"], p["tp"], p["workload"]) + _row_order(p)), PRED_COLUMNS), ""]
        lines += [f"- {m}" for m in sorted({p["method"] for p in payload["predictions"]})]
        lines.append("")
    lines += ["## Greedy tokens against xla", ""]
    for backend, c in payload.get("token_check", {}).items():
        lines.append(f"- {backend}: {c['mismatched']} of {c['compared']} tokens differ "
                     f"({', '.join(c['dtypes'])})")
    lines += ["- nocomm's tokens differ by design (no all-reduce); its count shows that "
              "the comparison sees a difference.", ""]
    lines += _not_measured(payload)
    lines += ["## Notes", "", f"- {NOCOMM_NOTE}. all-reduce % = 1 - nocomm time / time.",
              "- TTFT: prefill to first token, median of the timed prefills. e2e batch: prefill "
              "+ every decode step dispatched back to back, one synchronisation at the end. "
              "step = (e2e - TTFT) / decode steps: the step as the device runs it; the speedup, "
              "all-reduce share, tok/s and HBM columns use it. step, synced: the median of "
              "steps each followed by block_until_ready (slowest rank per step), which adds "
              "the host's round trip and per-step jitter. host per step: the host's time to "
              "dispatch one step (median of the first steps of the pipelined generations, "
              "slowest rank); where it reaches the step, the host sets the pace, not the GPU.",
              "- HBM = (weight bytes + KV-cache bytes) read per step per device / step. "
              "The model attends over every cache slot with a mask, so each step reads the "
              "whole cache (prompt + generate slots). % of copy bw compares with the copy "
              "bandwidth measured on the same devices in the same run.", ""]
    return "\n".join(lines) + "\n"


def _not_measured(payload: dict) -> list[str]:
    lines = H.not_measured(
        payload["results"], payload["skipped"],
        lambda r: (f"{r['model']}:{r['layers']} tp={r['tp']} {r['workload']} "
                   f"b={r['batch']} {r['variant']}"),
        lambda s: s["what"])
    lines += [f"- group {g['group']}: {g['status']} (rc {g['returncode']}"
              f"{', stopped before its end' if g.get('finished') is False else ''})"
              for g in payload["groups"] if g["status"] != "ok" or g.get("finished") is False]
    return ["## Not measured", ""] + lines + [""] if lines else []


# --------------------------------------------------------------------------
# Plot, files
# --------------------------------------------------------------------------

COLOURS = {"xla": "black", "nvrar": "tab:red", "nvshmem": "tab:orange",
           "reference": "tab:blue", "nocomm": "grey"}


def plot(payload: dict, path: Path) -> str | None:
    ok = [r for r in payload["results"] if r["status"] == "ok" and r["role"] == "main"]
    panels = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in sorted(ok, key=lambda r: r["batch"]):
        title = (f"{r['model']} ({r['layers']}/{r['full_layers']} layers), TP={r['tp']}, "
                 f"{WORKLOAD_NAMES.get(r['workload'], r['workload'])} "
                 f"({r['prompt_len']}+{r['gen_len']})")
        panels[title][_variant_cell(r["variant"])].append((r["batch"], r.get(STEP, r["step_median_ms"])))
    if not panels:
        return "nothing measured"
    out = []
    for title, series in sorted(panels.items()):
        styles = {v: {"color": COLOURS.get(v.split("@")[0]),
                      "linestyle": "--" if v.endswith("@2x2") or v.startswith("nocomm") else "-"}
                  for v in series}
        out.append({"title": title, "series": {v: tuple(zip(*p)) for v, p in series.items()},
                    "styles": styles})
    return H.plot_loglog(path, out, title=payload["title"], xlabel="batch",
                         ylabel="decode step, (e2e - TTFT) / steps (ms)")


def write_outputs(payload: dict, out_dir: Path, prefix: str) -> dict:
    return H.write_outputs(payload, out_dir, prefix, report=report, plot=plot)


def run_title(kind: str, devices, models) -> str:
    n = max((d.get("device_count", 0) for d in devices), default=0)
    if kind == "functional":
        return (f"Llama decode, NVRAR vs XLA psum: FUNCTIONAL run on {n} simulated CPU "
                f"devices ({', '.join(models)}; not a performance measurement)")
    name = devices[0].get("device_kind", "GPU") if devices else "GPU"
    return f"Llama decode, NVRAR vs XLA psum: measured on {n} x {name}"
