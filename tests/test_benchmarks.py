"""The benchmarks on CPU: the functional all-reduce run, its correctness
check (with a negative control), and the cost model's formulas and fit."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import _allreduce_cases as cases  # noqa: E402
import _harness as H  # noqa: E402
import cost_model as cm  # noqa: E402


# --------------------------------------------------------------------------
# allreduce.py
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def functional_run(cpu_benchmark):
    return cpu_benchmark("allreduce.py")


def test_functional_run_is_correct_and_labelled(functional_run):
    out, proc = functional_run
    payload = json.loads((out / "allreduce_cpu_functional.json").read_text())
    assert payload["kind"] == "functional"
    assert "FUNCTIONAL" in payload["title"]
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    assert {(r["backend"], r["layout"]) for r in ok} == {
        ("xla", "1x2"), ("xla", "1x4"), ("reference", "1x2"),
        ("reference", "1x4"), ("reference", "2x2"), ("reference", "4x1")}
    assert all(r["wrong"] == 0 and r["chain_checked"] for r in ok)
    assert all(r["status"] == "ok" for r in payload["results"])
    for r in ok:  # nccl-tests vocabulary, busbw = algbw * 2(n-1)/n
        assert r["count"] * 2 == r["size"]
        assert math.isclose(r["busbw"], r["algbw"] * 2 * (r["nproc"] - 1)
                            / r["nproc"], rel_tol=1e-6)
        assert r["speedup"] > 0
    # The link pass ran for each group size and every row is set against it.
    links = {link["nproc"]: link["gbps"] for link in payload["link"]}
    assert set(links) == {2, 4} and all(g > 0 for g in links.values())
    for r in ok:
        assert r["link_pct"] == pytest.approx(100 * r["busbw"] / links[r["nproc"]])
    skipped = {s["backend"] for s in payload["skipped"]}
    assert {"nvshmem", "xla_ck", "nvshmem4py"} <= {b.split(":")[0]
                                                   for b in skipped}
    table = (out / "allreduce_cpu_functional.md").read_text()
    assert "FUNCTIONAL run" in table and "| time (us) |" in table
    assert "| busbw % of link |" in table and "link bandwidth, 4 devices" in table
    assert "FUNCTIONAL run" in proc.stdout  # the table goes to stdout
    assert "#wrong" in proc.stderr  # progress goes to stderr
    assert payload["env"]["packages"]["jax"]
    if payload["plot"].startswith("not drawn"):
        pytest.importorskip("matplotlib")
    assert (out / "allreduce_cpu_functional.png").stat().st_size > 1000


def _args(**kw):
    base = dict(steps=0, target_ms=2.0, unroll=1, warmup=1, repeats=1)
    return argparse.Namespace(**{**base, **kw})


class _BrokenPsum(cases.JaxCase):
    """lax.psum with one element off by one: the check must see it."""

    def _psum(self):
        from jax import lax

        def broken(x):
            y = lax.psum(x, cases.AXIS)
            return y.reshape(-1).at[3].add(1).reshape(y.shape)
        return broken


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_check_counts_wrong_elements(dtype):
    point = cases.Point(dtype, (1024,))
    good = cases.Series("xla", cases.Layout(1, 4))
    wrong, times, extra = cases.JaxCase(good, point, _args(), True, {}).run()
    assert wrong == [0, 0] and extra["chain_checked"] and len(times) == 1
    wrong, _, _ = _BrokenPsum(good, point, _args(), True, {}).run()
    assert all(w > 0 for w in wrong)  # negative control


class _FakeRunner:
    def __init__(self, fail):
        self.fail = fail

    def run(self):
        if self.fail:
            raise ValueError("unsupported on purpose")
        return [0, 0, 0], [1e-5, 2e-5], {"steps": 3}


def test_run_cases_records_errors_and_budget():
    layout = cases.Layout(1, 2)
    todo = [(cases.Series(b, layout), cases.Point("float32", (256,)))
            for b in ("xla", "reference", "nvshmem")]
    records = []
    cases.run_cases(todo, lambda s, p: _FakeRunner(s.backend == "xla"),
                    records.append, group="t", deadline=math.inf, rank0=True,
                    warmup=1, repeats=2)
    results = [r for r in records if r["type"] == "result"]
    assert [r["status"] for r in results] == ["error", "ok", "ok"]
    assert "unsupported on purpose" in results[0]["reason"]
    assert results[1]["time_us"] == pytest.approx(15.0)  # median of 10, 20
    records.clear()
    cases.run_cases(todo, lambda s, p: _FakeRunner(False), records.append,
                    group="t", deadline=0.0, rank0=True, warmup=1, repeats=2)
    results = [r for r in records if r["type"] == "result"]
    assert [r["status"] for r in results] == ["ok", "skipped", "skipped"]


def test_inputs_are_exact_and_never_zero():
    for dtype, bits in cases.DTYPE_BITS.items():
        for n in (2, 4, 8):
            m = cases.chain_modulus(dtype, n)
            assert n * (n * m + n / 2) < 2 ** bits  # chain stays exact
            point = cases.Point(dtype, (4, 100))
            x = cases.host_input(point, n - 1, m)
            assert x.shape == (4, 100) and (x.astype(float) >= 1).all()
            total = cases.expected_sum(point, n, m)
            assert total.max() <= n * m and total.min() >= n


def test_decode_shapes_tag_swept_sizes():
    points = cases.make_points([4096, 1 << 20], ["bfloat16"], [1, 8],
                               {"8B": 4096}, tag_only=False)
    by_size = {p.nbytes: p for p in points}
    assert by_size[8192].shape == (1, 4096)  # b=1: new point, 2-D shape
    assert by_size[65536].decode == ("8B b=8",)
    tagged = cases.make_points([8192], ["bfloat16"], [1, 8], {"8B": 4096},
                               tag_only=True)
    assert [p.decode for p in tagged] == [("8B b=1",)]


def test_series_per_group():
    layouts = [cases.Layout.parse(t) for t in ("1x4", "2x2")]
    labels = [(s.label, s.layout.name) for s in cases.group_series(
        "default", layouts, set(cases.BACKENDS), cases.ALGOS)]
    variants = [(f"nvshmem:{a}", "1x4") for a in cases.ALGOS if a != "auto"]
    per_node = [(f"nvshmem:{a}", "2x2") for a in cases.ALGOS
                if a in ("twoshot_ll", "twoshot_lamport")]
    assert labels == [("xla", "1x4"), ("reference", "1x4"), ("nvshmem", "1x4"),
                      *variants, ("auto", "1x4"),
                      ("reference", "2x2"), ("nvshmem", "2x2"), *per_node,
                      ("auto", "2x2")]
    assert len(per_node) == 2
    assert len(variants) == 6
    assert [s.label for s in cases.group_series(
        "xla_ck", layouts, set(cases.BACKENDS), cases.ALGOS)] == ["xla_ck"]
    # Block counts of "auto" also reach the hierarchical layouts; one-shot variants do not.
    labels = [(s.label, s.layout.name) for s in cases.group_series(
        "default", layouts[1:], {"nvshmem"}, ("oneshot", "auto", "auto/8"))]
    assert labels == [("nvshmem", "2x2"), ("nvshmem:auto/8", "2x2")]
    with pytest.raises(ValueError):
        cases.Layout.parse("1x1")


def test_harness_units():
    assert H.parse_sizes("4K:64M") == [1 << k for k in range(12, 27)]
    assert H.parse_sizes("4K:1M:4,3000") == [3000, 4096, 16384, 65536,
                                             262144, 1048576]
    assert H.fmt_bytes(64 << 20) == "64M" and H.fmt_bytes(3000) == "3000"
    algbw, busbw = H.bandwidths(1_000_000, 1e-5, 4)
    assert algbw == pytest.approx(100.0) and busbw == pytest.approx(150.0)
    median, maxima = H.median_of_max([[1, 5, 3], [2, 4, 9]])
    assert maxima == [2, 5, 9] and median == 5
    with pytest.raises(ValueError):
        H.parse_sizes("4Q")


def test_time_runs_keeps_no_output_alive():
    import weakref

    class Out:  # stands for a run's device output
        pass

    made = []

    def run(v):
        out = Out()
        out.v = v
        made.append(weakref.ref(out))
        return out

    times, kept = H.time_runs(run, (7,), warmup=1, repeats=2, keep=lambda out: out.v)
    assert len(times) == 2 and kept == [7, 7, 7]
    # A live output would move the next run's output (XLA then updates its command buffers).
    assert len(made) == 3 and all(ref() is None for ref in made)
    assert H.time_runs(run, (1,), warmup=0, repeats=1)[1] == [None]


def test_reports_name_the_workers_xla_flags():
    # decode.py keeps each group's device info flat, allreduce.py under "device"; CPU runs say none.
    mode = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
    devices = {"tp4": {"backend": "gpu", "xla_flags": mode},
               "2:default": {"device": {"backend": "gpu", "xla_flags": ""}},
               "cpu": {"backend": "cpu", "xla_flags": "--other"}}
    assert H.xla_flags_lines(devices) == ["- XLA_FLAGS of the worker processes: none",
                                          f"- XLA_FLAGS of the worker processes: `{mode}`"]
    assert H.xla_flags_lines({}) == []


# --------------------------------------------------------------------------
# cost_model.py
# --------------------------------------------------------------------------

INTRA = cm.Link(3.0, 1 / 300e3)  # 3 us, 300 GB/s
INTER = cm.INTERCONNECTS["ib_ndr"]


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [4096, 1 << 20])
def test_single_node_closed_forms(p, m):
    a, b = INTRA.alpha, INTRA.beta
    assert cm.ring(m, 1, p, INTRA, INTER) == pytest.approx(
        2 * (p - 1) * (a + m / p * b))
    assert cm.nvrar(m, 1, p, INTRA, INTER) == pytest.approx(
        cm.twoshot(m, 1, p, INTRA, INTER))
    assert cm.twoshot(m, 1, p, INTRA, INTER) == pytest.approx(
        2 * (a + (p - 1) / p * m * b))
    assert cm.oneshot(m, 1, p, INTRA, INTER) == pytest.approx(
        a + (p - 1) * m * b)


def test_multi_node_forms():
    m, p = 1 << 20, 4
    ae, be = INTER.alpha, INTER.beta
    local = 2 * (INTRA.alpha + (p - 1) / p * m * INTRA.beta)
    for nodes, steps in ((2, 1), (3, 3), (4, 2), (6, 4), (8, 3), (64, 6)):
        assert cm.nvrar_steps(nodes) == steps
        assert cm.nvrar(m, nodes, p, INTRA, INTER) == pytest.approx(
            local + steps * (ae + m / p * be))
    P = 8 * p  # ring across nodes: slowest hop per step, NIC-bound bytes
    assert cm.ring(m, 8, p, INTRA, INTER) == pytest.approx(
        2 * (P - 1) * max(ae, INTRA.alpha) + 2 * (P - 1) / P * m * be / p)
    # Latency-bound: NVRAR beats ring; bandwidth-bound at scale: it loses.
    assert cm.nvrar(8192, 16, p, INTRA, INTER) < cm.ring(8192, 16, p, INTRA, INTER)
    assert cm.nvrar(64 << 20, 16, p, INTRA, INTER) > min(
        cm.ring(64 << 20, 16, p, INTRA, INTER),
        cm.tree(64 << 20, 16, p, INTRA, INTER))


@pytest.mark.parametrize("form", ["ring", "oneshot", "twoshot", "nvrar"])
def test_fit_recovers_alpha_beta(form):
    truth = cm.Link(2.5, 1 / 250e3)
    points = [(m, p, cm.predict(form, m, 1, p, truth, truth))
              for p in (2, 4) for m in H.parse_sizes("4K:64M")]
    fit = cm.fit_link(form, points)
    assert fit.alpha == pytest.approx(truth.alpha, rel=1e-6)
    assert fit.beta == pytest.approx(truth.beta, rel=1e-6)
    noisy = [(m, p, t * (1.05 if i % 2 else 0.95))
             for i, (m, p, t) in enumerate(points)]
    fit = cm.fit_link(form, noisy)
    assert fit.alpha == pytest.approx(truth.alpha, rel=0.15)
    assert fit.beta == pytest.approx(truth.beta, rel=0.15)


def test_cost_model_pipeline(tmp_path, functional_run):
    links = {"xla": cm.Link(1.5, 1 / 350e3), "nvshmem:twoshot": INTRA,
             "nvshmem:oneshot": cm.Link(4.0, 1 / 280e3)}
    sweep = tmp_path / "synthetic.json"
    sweep.write_text(json.dumps(cm.synthetic_sweep(links)))
    with pytest.raises(SystemExit):  # synthetic numbers are never results
        cm.main([str(sweep), "--out-dir", str(tmp_path)])
    result = cm.main([str(sweep), "--out-dir", str(tmp_path),
                      "--allow-test-input", "--nodes", "1,2,3,4,8,64"])
    assert result["test_input"] and "TEST INPUT" in result["label"]
    fits = result["fits"]
    assert fits["nvshmem:twoshot"]["alpha_us"] == pytest.approx(3.0)
    assert result["intra_link_source"]["nvrar"] == "nvshmem:twoshot"
    out_of_sample = [v for v in result["validation"] if v["layout"] == "2x2"]
    assert out_of_sample and out_of_sample[0]["max"] < 1e-9
    small = next(c for c in result["crossovers"]
                 if c["interconnect"] == "ib_ndr" and c["size"] == 4096)
    assert small["vs_ring"] is None and 64 in small["nvrar_fastest_at"]
    big = next(c for c in result["crossovers"]
               if c["interconnect"] == "ib_ndr" and c["size"] == 64 << 20)
    assert big["vs_ring"] is not None
    text = (tmp_path / "cost_model.md").read_text()
    assert "PREDICTION" in text and "TEST INPUT" in text
    # The functional CPU sweep runs through too (labelled, never a result).
    out, _ = functional_run
    cm.main([str(out / "allreduce_cpu_functional.json"), "--out-dir",
             str(tmp_path / "cpu"), "--allow-test-input"])


def test_cost_model_fits_several_sweeps_together(tmp_path):
    # Two sweeps of one machine (e.g. a budget-cut run and its large sizes)
    # are fitted as one: the points of both count; a non-measurement taints
    # the kind of the whole.
    links = {"xla": cm.Link(1.5, 1 / 350e3), "nvshmem:twoshot_lamport": INTRA}
    whole = cm.synthetic_sweep(links)
    small, large = (dict(whole, results=[r for r in whole["results"] if keep(r["size"])])
                    for keep in (lambda s: s < 1 << 20, lambda s: s >= 1 << 20))
    paths = [tmp_path / "small.json", tmp_path / "large.json"]
    for path, payload in zip(paths, (small, large)):
        path.write_text(json.dumps(payload))
    merged = cm.load_sweeps(paths, allow_test_input=True)
    assert len(merged["results"]) == len(whole["results"])
    assert merged["sources"] == [str(p) for p in paths]
    result = cm.main([str(p) for p in paths] + ["--out-dir", str(tmp_path),
                                                "--allow-test-input"])
    assert result["fits"]["nvshmem:twoshot_lamport"]["points"] == sum(
        1 for r in whole["results"] if r["backend"] == "nvshmem:twoshot_lamport")
    assert result["intra_link_source"]["twoshot"] == "nvshmem:twoshot_lamport"
    assert result["source"]["files"] == [str(p) for p in paths]


def test_default_gpu_layouts_cover_every_node_shape():
    import allreduce
    assert allreduce.gpu_layouts(4) == allreduce.GPU_LAYOUTS == "1x2,1x4,2x2,4x1"
    assert allreduce.gpu_layouts(8) == "1x2,1x8,2x4,4x2,8x1"  # 2x4: the paper's nodes
    assert allreduce.gpu_layouts(2) == "1x2,2x1"
    assert allreduce.gpu_layouts(1) == "1x2"  # skipped on one GPU, saying why


def test_one_gpu_runs_no_group_and_says_why():
    import allreduce
    from _allreduce_cases import Layout
    args = allreduce.parse_args(["--platform", "gpu", "--backends", "xla,nvshmem",
                                 "--sizes", "4K", "--gpus", "1"])
    assert args.layouts == "1x2"
    skipped = []
    groups = allreduce.plan_groups(args, [Layout.parse(args.layouts)], 1, skipped)
    assert groups == [] and {s["reason"] for s in skipped} == {"needs 2 GPUs; 1 present"}
    with pytest.raises(SystemExit, match="layouts 1x2 need 2 or more GPUs; 1 present"):
        allreduce.driver_gpu(args)


def test_link_pass_checks_the_data_it_moves(monkeypatch):
    from jax import lax
    assert cases.link_bandwidth(4, 1 << 16)["gbps"] > 0
    monkeypatch.setattr(lax, "ppermute", lambda w, axis, perm: w * 1)  # moves nothing
    with pytest.raises(RuntimeError, match="ppermute moved wrong data"):
        cases.link_bandwidth(4, 1 << 16)


# --------------------------------------------------------------------------
# step_costs.py
# --------------------------------------------------------------------------

def test_step_costs_functional_run(tmp_path):
    # CPU: 2 simulated devices, the kernel rows on the reference backend; the
    # trace split finds XLA's all-reduce in its row and none in the fusion row.
    out = tmp_path / "costs.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_costs.py"), "--sizes", "4K",
         "--variants", "oneshot_lamport", "--calls", "4", "--repeats", "1", "--trace",
         "--json", str(out)],
        cwd=REPO, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["chain"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["fusion only", "oneshot_lamport bare", "oneshot_lamport fused", "xla fused"]
    assert all(r["wall_us"] > 0 and r["device_us"] > 0 for r in rows.values())
    assert rows["xla fused"]["ops_us"]["all-reduce"] > 0
    assert "all-reduce" not in rows["fusion only"]["ops_us"]
    assert "| 4096 | xla fused |" in proc.stdout


def test_step_costs_second_run_keeps_the_later_run():
    import step_costs
    # Two runs of three ops each, the trace's events out of order.
    first = [("a", 1.0, 100), ("b", 1.0, 200), ("c", 1.0, 300)]
    second = [("a", 1.0, 5100), ("b", 1.0, 5200), ("c", 1.0, 5300)]
    assert step_costs.second_run([second[2], first[1], second[0], first[0], second[1], first[2]]) == second


# --------------------------------------------------------------------------
# step_profile.py
# --------------------------------------------------------------------------

def test_step_profile_categories():
    import step_profile as sp
    assert sp.category("allreduce_kernel<__nv_bfloat16>") == "all-reduce"
    assert sp.category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "all-reduce"
    assert sp.category("ncclDevKernel_AllGather_RING_LL") == "other collectives"
    assert sp.category("nvjet_tst_128x64_64x4_1x2_h_bz_TNT") == "matmul"
    assert sp.category("input_reduce_fusion_3") == "fusion (other)"
    assert sp.category("dynamic-update-slice.2") == "copy / cache update"
    assert sp.category("mystery") == "other"


def test_step_profile_collective_cost():
    import step_profile as sp
    # Two ranks, two calls: rank 1 arrives last at call 0 (its kernel is short), rank 0 at call 1.
    cost = sp.collective_cost([[30.0, 10.0], [12.0, 40.0]], steps=2)
    assert cost["calls_per_step"] == 1
    assert cost["own_us_per_step"] == (12 + 10) / 2
    assert cost["traced_us_per_step"] == (40 + 52) / 2 / 2
    assert cost["waiting_us_per_step"] == cost["traced_us_per_step"] - cost["own_us_per_step"]


def test_step_profile_functional_run(tmp_path):
    # CPU: the tiny preset on 2 simulated devices; the trace's ops add up and
    # the model's all-reduces are found.
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--allreduce", "xla",
         "--steps", "3", "--warmup", "1", "--batch", "2", "--prompt-len", "8",
         "--out-dir", str(tmp_path), "--prefix", "p"],
        cwd=REPO, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "p.json").read_text())
    rows = {r["category"]: r for r in payload["rows"]}
    assert (payload["model"], payload["tp"]) == ("tiny", 2)
    # tiny has 2 layers: 2 all-reduces per layer and 1 after the embedding,
    # in each of the 2 simulated devices' op streams.
    assert rows["all-reduce"]["ops_per_step"] == 2 * (2 * 2 + 1)
    assert rows["matmul"]["us_per_step"] > 0
    assert rows["wall (host clock)"]["us_per_step"] > 0
    # One process: the split has one rank, so nothing counts as waiting.
    allreduce = payload["collectives"]["all-reduce"]
    assert allreduce["calls_per_step"] == rows["all-reduce"]["ops_per_step"]
    assert allreduce["own_us_per_step"] == pytest.approx(rows["all-reduce"]["us_per_step"], rel=1e-3)
    assert allreduce["waiting_us_per_step"] == pytest.approx(0, abs=1e-3)
    # The host side: the Python thread's dispatch of the jitted step, among the largest spans.
    spans = {(h["thread"], h["span"]) for h in payload["host"]}
    assert any(thread == "python" and span.startswith("PjitFunction") for thread, span in spans), spans
    assert not any("profiler.py" in span for _, span in spans)
    report = (tmp_path / "p.md").read_text()
    assert "# Decode step profile: tiny" in report and "## Host: largest spans" in report


# --------------------------------------------------------------------------
# floor.py
# --------------------------------------------------------------------------

def _sweep(fault: str, points: dict) -> dict:
    """An allreduce.py payload: points (backend, layout, size) -> time_us."""
    results = [{"backend": b, "layout": layout, "size": size, "time_us": t, "status": "ok",
                "dtype": "bfloat16", "nproc": math.prod(int(v) for v in layout.split("x"))}
               for (b, layout, size), t in points.items()]
    return {"kind": H.MEASURED, "results": results,
            "env": {"command": "allreduce.py", "env": {"JAX_NVRAR_FAULT_INJECT": fault}}}


def test_floor_formulas_and_verdicts(tmp_path):
    import floor
    links = {"device": "GPU", "latency": [{"one_way_us": 0.5}, {"one_way_us": 2.0}],
             "bandwidth": [{"gbps_per_sender": 100.0}, {"gbps_per_sender": 400.0}]}
    assert floor.link_figures(links) == (0.5, 400e3)
    S = 1 << 20
    one, algo = floor.data_floor(4096, 1, 4, 0.5, 400e3)
    assert algo == "one-shot" and one == pytest.approx(0.5 + 3 * 4096 / 400e3)
    two, algo = floor.data_floor(S, 1, 4, 0.5, 400e3)
    assert algo == "two-shot" and two == pytest.approx(1.0 + 1.5 * S / 400e3)
    hier, algo = floor.data_floor(S, 2, 2, 0.5, 400e3)
    assert algo == "hierarchical" and hier == pytest.approx(1.5 + (S + S / 2) / 400e3)

    paths = {}
    for name, payload in {
        "links": links,
        "empty": _sweep("3", {("nvshmem", "1x4", 4096): 4.0, ("nvshmem", "1x4", S): 6.0}),
        "measured": _sweep("0", {("nvshmem", "1x4", 4096): 5.0, ("xla", "1x4", 4096): 20.0,
                                 ("nvshmem", "1x4", S): 16.0, ("xla", "1x4", S): 24.0}),
    }.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(payload))
    argv = ["--links", str(paths["links"]), "--empty", str(paths["empty"]),
            "--measured", str(paths["measured"]), "--out-dir", str(tmp_path)]
    assert floor.main(argv) == 0
    rows = {r["size"]: r for r in json.loads((tmp_path / "floor.json").read_text())["rows"]}
    small, large = rows[4096], rows[S]
    assert small["bound_us"] == pytest.approx(4.0 + one)
    assert small["targets"] == [{"target": "<= 6 us", "us": 6.0, "reachable": True, "met": True}]
    assert large["bound_us"] == pytest.approx(6.0 + two)  # 10.98 us
    # 2.5x of 24 us = 9.6 us lies below the bound: out of reach, not met.
    assert large["targets"] == [{"target": "2.5x", "us": 9.6, "reachable": False, "met": False}]
    assert "out of reach" in (tmp_path / "floor.md").read_text()

    # The sweeps must be what their flag says.
    with pytest.raises(SystemExit, match="JAX_NVRAR_FAULT_INJECT=0"):
        floor.main(["--links", str(paths["links"]), "--empty", str(paths["measured"]),
                    "--measured", str(paths["measured"])])


# --------------------------------------------------------------------------
# kernel_trace.py (its arithmetic; the trace itself needs a traced GPU build)
# --------------------------------------------------------------------------

def test_kernel_trace_parts():
    import numpy as np
    import kernel_trace as kt
    # seq, entry, sent, waited, exit (ns); calls 5-7 of one run, 9 after a run break,
    # 3 from before the timed runs; call 8 is missing.
    rows = np.array([[3, 10, 11, 12, 13],
                     [5, 1000, 2500, 4000, 4060],
                     [6, 7000, 8600, 9900, 9960],
                     [7, 13000, 14500, 16000, 16060],
                     [9, 900000, 901500, 903000, 903060],
                     [0, 0, 0, 0, 0]], dtype=np.int64)
    parts = kt.call_parts(rows, first_seq=4)
    assert parts[:, 0].tolist() == [5, 6, 7, 9]
    assert parts[:, 5].tolist() == [7000, 13000, -1, -1]  # 7 -> 8 and 9 have no next call
    entry_sent, sent_waited, waited_exit, gap, spread = kt.medians(
        parts, np.array([0.0, 2000.0]), run_gap_ns=50_000)
    assert entry_sent == pytest.approx(1.5)       # 1500, 1600, 1500, 1500 ns
    assert sent_waited == pytest.approx(1.5)      # 1500, 1300, 1500, 1500
    assert waited_exit == pytest.approx(0.06)
    assert gap == pytest.approx(2.99)             # 2940 and 3040 ns; the run break is out
    assert spread == pytest.approx(1.0)
    # Variants without the middle marks: those parts are NaN, the gap still counts.
    bare = parts.copy()
    bare[:, 2:4] = 0
    assert all(math.isnan(v) for v in kt.medians(bare, np.zeros(1), 50_000)[:3])


def test_kernel_trace_entry_spread_single_process():
    import numpy as np
    import kernel_trace as kt
    entries = np.array([(1 << 31) - 5, (1 << 31) + 7, 3 << 40], dtype=np.int64)
    assert kt.entry_spread(entries, 0).tolist() == [0.0, 0.0, 0.0]


def test_a_trace_without_ops_is_an_error(monkeypatch):
    # A trace layout op_events does not read gives no op: an error, not rows of nan.
    import jax.numpy as jnp
    import step_profile
    monkeypatch.setattr(step_profile, "op_events", lambda data: [])
    with pytest.raises(RuntimeError, match="the trace holds no op of this program"):
        step_profile.traced(lambda: jnp.ones(4).block_until_ready())
