"""benchmarks/decode.py on CPU: the functional run and its labels, the
token check (xla against the reference NVRAR schedule, with the
no-communication variant as the negative control), layer planning and the
full-model prediction of truncated runs."""

import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import _decode_cases as cases  # noqa: E402
import _decode_report as report  # noqa: E402
import decode  # noqa: E402  (benchmarks/decode.py; models.decode is a package module)


@pytest.fixture(scope="module")
def functional_run(cpu_benchmark):
    out, proc = cpu_benchmark("decode.py")
    payload = json.loads((out / "decode_cpu_functional.json").read_text())
    return out, proc, payload


def test_functional_run_is_labelled_and_complete(functional_run):
    out, proc, payload = functional_run
    assert payload["kind"] == "functional" and "FUNCTIONAL" in payload["label"]
    assert "FUNCTIONAL" in payload["title"] and "not a performance" in payload["title"]
    table = (out / "decode_cpu_functional.md").read_text()
    assert "FUNCTIONAL run" in table and "FUNCTIONAL run" in proc.stdout  # table on stdout
    assert "TTFT" in proc.stderr and "copy bandwidth" in proc.stderr  # progress on stderr
    for header in ("TTFT (ms)", "step, synced (ms)", "step (ms)", "host per step (ms)",
                   "e2e batch (ms)", "decode tok/s", "HBM (GB/s)", "% of copy bw",
                   "all-reduce % of step", "step vs xla", "#mismatch"):
        assert f"| {header} |" in table
    assert payload["env"]["packages"]["jax"] and payload["devices"]["cpu"]["backend"] == "cpu"
    assert payload["copy"] and payload["copy"][0]["copy_gbps"] > 0
    results = payload["results"]
    assert results and all(r["status"] == "ok" for r in results)
    assert {r["variant"] for r in results} == {"xla", "reference@1x4", "reference@2x2", "nocomm"}
    assert {r["workload"] for r in results} == {"decode", "prefill"}
    # The pipelined step, (e2e - TTFT) / steps, or why not (medians of
    # different runs; a loaded CPU can put e2e below TTFT, in any row).
    noted = {(r["variant"], r["workload"], r["batch"]) for r in results
             if "pipelined_note" in r}
    for r in results:
        assert r["dtype"] == "float32" and r["model"] == "tiny" and r["tp"] == 4
        assert r["steps_timed"] == r["gen_len"] - 1 and r["deterministic"]
        assert r["e2e_ms"] > 0 and r["step_median_ms"] > 0 and r["ttft_ms"] > 0
        assert 0 < r["host_step_ms"] < r["e2e_ms"]  # present, finite, within the generation
        assert r["hbm_gbps"] > 0 and r["roofline_pct"] > 0
        if r["backend"] == "reference":
            assert r["e2e_speedup"] > 0 and "ar_share_ttft_pct" in r
            if "pipelined_note" in r:
                assert "step_pipelined_ms" not in r
            # A ratio of pipelined steps needs both rows' steps.
            for other, derived in (("xla", "step_speedup"),
                                   ("nocomm", "ar_share_step_pct")):
                if noted & {(r["variant"], r["workload"], r["batch"]),
                            (other, r["workload"], r["batch"])}:
                    assert derived not in r
                else:
                    assert derived in r
            assert r.get("step_speedup", 1) > 0
    skipped = " ".join(s["what"] for s in payload["skipped"])
    assert "nvrar" not in skipped  # not asked for on CPU: nothing to skip
    if payload["plot"].startswith("not drawn"):
        pytest.importorskip("matplotlib")
    assert (out / "decode_cpu_functional.png").stat().st_size > 1000


def test_reference_tokens_equal_xla_tokens(functional_run):
    """fp32 on CPU: the NVRAR schedule sums like lax.psum, the greedy tokens match."""
    _, _, payload = functional_run
    rows = payload["results"]
    xla = {(r["workload"], r["batch"]): r["tokens_sha1"] for r in rows if r["backend"] == "xla"}
    reference = [r for r in rows if r["backend"] == "reference"]
    assert len(reference) == 2 * len(xla)  # layouts 1x4 and 2x2
    for r in reference:
        assert r["mismatched"] == 0 and r["first_mismatch_step"] is None
        assert r["tokens_sha1"] == xla[(r["workload"], r["batch"])]
    check = payload["token_check"]["reference"]
    assert check["mismatched"] == 0 and check["compared"] > 0
    assert check["dtypes"] == ["float32"]


def test_no_communication_variant_is_labelled_and_wrong(functional_run):
    """nocomm is labelled everywhere, has no speedup, and is the negative control
    of the token check: without the all-reduce the tokens must differ."""
    out, _, payload = functional_run
    nocomm = [r for r in payload["results"] if r["backend"] == "nocomm"]
    assert nocomm
    for r in nocomm:
        assert r["numerically_wrong"] is True and "NUMERICALLY WRONG" in r["psum"]
        assert r["mismatched"] > 0
        assert "step_speedup" not in r and "ar_share_step_pct" not in r
    table = (out / "decode_cpu_functional.md").read_text()
    assert "nocomm (identity, wrong numbers)" in table and "NUMERICALLY WRONG" in table


def test_tokens_of_xla_and_reference_generators_are_equal():
    """The same check in this process, on the token arrays themselves (TP=4 as
    2 nodes x 2), and nocomm as the negative control."""
    from models import tp as tp_lib
    from models.config import get_config
    from models.generate import Generator

    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    cfg = get_config("tiny", dtype="float32")
    mesh = tp_lib.make_mesh(4)
    graphdef, state = tp_lib.init_weights(cfg, mesh)
    args = decode.parse_args(["--platform", "cpu", "--repeats", "1", "--prefill-repeats", "1"])
    workload = cases.Workload("decode", 8, 6, (2,))
    tokens = {}
    for v in (cases.Variant("xla", None), cases.Variant("reference", cases.Layout(2, 2)),
              cases.Variant("nocomm", None)):
        out = cases.run_case(Generator(graphdef, state, mesh, v.psum()), cfg, workload, 2, args)
        assert out["deterministic"] and len(out["steps"]) == 5 and out["kv_bytes"] > 0
        tokens[v.backend] = out["tokens"]
    assert tokens["xla"].shape == (2, 6)
    np.testing.assert_array_equal(tokens["reference"], tokens["xla"])
    assert (tokens["nocomm"] != tokens["xla"]).any()


# --------------------------------------------------------------------------
# Planning and prediction (no devices)
# --------------------------------------------------------------------------

def test_layer_planning():
    from models.config import get_config

    h100 = 0.75 * 79.1e9  # JAX's default share of an H100's memory
    decode_shapes = [(b, 128, 1024) for b in (1, 8, 64)]
    layers, why, too_big = cases.plan_layers(get_config("llama3.1-8b"), 4, decode_shapes,
                                             h100, None)
    assert layers == 32 and not too_big and "estimate" in why
    layers, _, _ = cases.plan_layers(get_config("llama3.1-405b"), 4, decode_shapes, h100, None)
    assert 10 < layers < 126  # 405B's bf16 weights are ~203 GB per device at TP=4
    cfg = get_config("llama3.1-405b")
    est = cases.memory_estimate(cfg, 4, layers, 64, 128, 1024)
    assert est["total"] <= h100
    layers, _, too_big = cases.plan_layers(cfg, 2, [(1, 128, 1024), (64, 8192, 32)], h100, None)
    assert too_big == [(64, 8192, 32)] and layers >= 1
    assert cases.plan_layers(cfg, 4, decode_shapes, None, None)[0] == 126  # no limit (CPU)
    assert cases.plan_layers(cfg, 4, decode_shapes, h100, 7)[0] == 7
    assert cases.layer_requests("auto") == {}
    assert cases.layer_requests("12") == {"*": 12}
    assert cases.layer_requests("llama3.1-405b=20") == {"llama3.1-405b": 20}
    with pytest.raises(ValueError):
        cases.layer_requests("llama3.1-405b=x")


def _row(variant, layers, role, step, ttft, full=10):
    backend = variant.split("@")[0]
    return dict(model="m", tp=4, workload="decode", prompt_len=128, gen_len=11, batch=2,
                variant=variant, backend=backend, layout="any", group="g", layers=layers,
                full_layers=full, role=role, truncated=layers < full, status="ok",
                step_median_ms=step, step_mean_ms=step, ttft_ms=ttft, e2e_ms=ttft + 10 * step,
                mismatched=0, dtype="bfloat16")


def test_prediction_is_exact_for_linear_times():
    """time(L) = 1 + 0.5 L measured at L = 4 and 1 must predict 1 + 0.5 * 10."""
    payload = {"results": [
        _row("xla", 4, "main", 3.0, 6.0), _row("xla", 1, "fit", 1.5, 3.0),
        _row("nvrar@1x4", 4, "main", 2.0, 6.0), _row("nvrar@1x4", 1, "fit", 1.25, 3.0),
        _row("nocomm", 4, "main", 1.0, 5.0), _row("nocomm", 1, "fit", 1.0, 2.0)]}
    preds = {p["variant"]: p for p in report.derive(payload)["predictions"]}
    assert preds["xla"]["step_median_ms"] == pytest.approx(1 + 0.5 * 10)
    assert preds["xla"]["per_layer_step_median_ms"] == pytest.approx(0.5)
    assert preds["xla"]["ttft_ms"] == pytest.approx(2 + 1 * 10)
    assert preds["xla"]["e2e_ms"] == pytest.approx(12 + 10 * 6)
    assert preds["nvrar@1x4"]["step_median_ms"] == pytest.approx(1 + 0.25 * 10)
    assert preds["nvrar@1x4"]["step_speedup"] == pytest.approx(6 / 3.5)
    assert preds["xla"]["ar_share_step_pct"] == pytest.approx(100 * (1 - 1 / 6))
    assert all(p["label"].startswith("PREDICTION") for p in preds.values())
    measured = {r["variant"]: r for r in payload["results"] if r["role"] == "main"}
    assert measured["nvrar@1x4"]["step_speedup"] == pytest.approx(1.5)
    assert "step_speedup" not in measured["nocomm"]


def test_presets():
    quick = decode.parse_args(["--platform", "gpu"])
    assert (quick.models, quick.tp, quick.layouts, quick.decode_batches) == (
        "llama3.1-8b", "4", "1x4", "1,8,32")
    assert [(w.name, w.prompt_len, w.gen_len) for w in quick.workload_list] == [
        ("decode", 128, 128)]
    assert set(quick.backends.split(",")) == {"xla", "nvrar", "nocomm"}
    full = decode.parse_args(["--platform", "gpu", "--full"])
    assert full.tp == "2,4" and "llama3.1-405b" in full.models and "2x2" in full.layouts
    assert [(w.name, w.prompt_len, w.gen_len) for w in full.workload_list] == [
        ("decode", 128, 1024), ("prefill", 2048, 32)]
    assert full.workload_list[0].batches == (1, 2, 4, 8, 16, 32, 64)
    with pytest.raises(SystemExit):
        decode.parse_args(["--platform", "gpu", "--backends", "nccl"])


def test_pipelined_step_is_e2e_minus_ttft_over_decode_steps():
    row = {"e2e_ms": 130.0, "ttft_ms": 3.0, "gen_len": 128, "batch": 8,
           "weight_read_bytes": 4e9, "kv_read_bytes": 0.0, "copy_gbps": 4000.0}
    report._pipelined(row)
    assert row["step_pipelined_ms"] == pytest.approx(1.0)
    assert row["pipelined_tokens_per_s"] == pytest.approx(8000.0)
    assert row["pipelined_hbm_gbps"] == pytest.approx(4000.0)
    assert row["pipelined_roofline_pct"] == pytest.approx(100.0)
    one = {"e2e_ms": 3.0, "ttft_ms": 3.0, "gen_len": 1, "batch": 8}
    report._pipelined(one)
    assert "step_pipelined_ms" not in one  # no decode step to time
    # e2e and TTFT are medians of different runs: where noise puts e2e at
    # or below TTFT, no (negative) step is derived, and the row says why;
    # speedups that need the step are left out, the others stay.
    noisy = {"e2e_ms": 2.9, "ttft_ms": 3.0, "gen_len": 6, "batch": 2}
    report._pipelined(noisy)
    assert "step_pipelined_ms" not in noisy
    assert "timing noise" in noisy["pipelined_note"]
    xla = dict(noisy, backend="xla", e2e_ms=5.8, ttft_ms=2.0)
    report._pipelined(xla)
    rows = [dict(r, model="m", tp=4, workload="decode", prompt_len=8, layers=2,
                 role="main") for r in (xla, dict(noisy, backend="reference"))]
    report._speedups(rows, {report._key(rows[0]): rows[0]}, {})
    assert rows[1]["e2e_speedup"] == pytest.approx(2.0)
    assert "step_speedup" not in rows[1]
    # The same for a prediction from such a row, which has no e2e time.
    preds = [{k: v for k, v in r.items() if k not in ("e2e_ms", "e2e_speedup")}
             for r in rows]
    report._speedups(preds, {report._key(preds[0]): preds[0]}, {})
    assert "e2e_speedup" not in preds[1] and preds[1]["ttft_speedup"] > 0


@pytest.mark.parametrize("gpus, hint", [(1, "tensor parallelism needs 2 or more GPUs"),
                                        (2, "--tp 2 runs on them")])
def test_too_few_gpus_for_every_tp_is_an_error(gpus, hint):
    args = decode.parse_args(["--platform", "gpu", "--gpus", str(gpus)])
    with pytest.raises(SystemExit, match=f"--tp 4 needs 4 or more GPUs; {gpus} present"):
        decode.driver_gpu(args)
    with pytest.raises(SystemExit, match=re.escape(hint)):
        decode.driver_gpu(args)
