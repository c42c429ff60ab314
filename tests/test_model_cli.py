"""``python -m models.decode``: the default command on CPU, checkpoints, text prompts, errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jax_nvrar.launch import visible_gpu_count
from models import decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIED = os.path.join(ROOT, "tests", "fixtures", "llama_tiny_tied")


def _cli(*args):
    # As a user starts it on a machine without GPUs (on one with GPUs it runs there).
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    if visible_gpu_count():
        env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "models.decode", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_default_command_runs_tiny_on_simulated_devices():
    """The README's main job: no arguments, sets its own 8 simulated CPU devices."""
    result = _cli("--gen-len", "4")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(rows) == 4 and all(len(r.split()) == 5 for r in rows), result.stdout
    assert "prefill:" in result.stdout and "tokens/s" in result.stdout
    assert "tp=8" in result.stderr and "allreduce=nvrar" in result.stderr


def test_unknown_preset_exits_2():
    result = _cli("--model", "llama-7")
    assert result.returncode == 2
    assert "unknown model preset 'llama-7'" in result.stderr


def test_checkpoint_with_text_prompts(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    out = tmp_path / "summary.json"
    summary = decode.main(["--model", TIED, "--tp", "2", "--allreduce", "xla", "--prompt", "hello",
                           "--prompt", "hi there", "--gen-len", "3", "--temperature", "0.7", "--top-p", "0.9",
                           "--json", str(out)])
    assert summary == json.loads(out.read_text())
    assert (summary["tp"], summary["batch"], summary["prompt_len"], summary["gen_len"]) == (2, 2, 8, 3)
    assert summary["decode_tokens_per_s"] > 0
    assert capsys.readouterr().out.count("\n[") >= 1


def test_ragged_random_prompts_and_layer_override(capsys):
    summary = decode.main(["--tp", "4", "--allreduce", "xla", "--layers", "1", "--batch", "3", "--ragged",
                           "--gen-len", "2", "--no-warmup"])
    assert (summary["layers"], summary["tp"], summary["batch"]) == (1, 4, 3)


def test_nvrar_without_the_launcher_says_it_runs_psum(monkeypatch, capsys):
    # A GPU machine, but no jax.distributed (one GPU, or one process for
    # several): NVSHMEM cannot start, the all-reduces are lax.psum's.
    import jax_nvrar
    monkeypatch.setattr(decode, "_cuda_expected", lambda: True)
    monkeypatch.setattr(jax_nvrar, "initialize", lambda: pytest.fail("initialize() called"))
    decode.main(["--tp", "2", "--layers", "1", "--gen-len", "2", "--no-warmup"])
    err = capsys.readouterr().err
    assert "not started by python -m jax_nvrar.launch" in err and "-> lax.psum" in err


@pytest.mark.parametrize("argv,match", [(["--tp", "3"], "tp=3"), (["--layers", "9"], "1..2, got 9"),
                                        (["--prompt", "hi"], "tokenizer.json")])
def test_cli_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        decode.main(["--allreduce", "xla", *argv])


def _rows(text):
    rows = [line.split("] ", 1)[-1] if line.startswith("[rank") else line for line in text.splitlines()]
    return [r for r in rows if re.match(r"\[\d+\] ", r)]


def test_one_process_per_device_through_the_launcher(capsys):
    """Two CPU processes (one device each, gloo) under jax_nvrar.launch: the checkpoint is loaded
    shard by shard and the reference NVRAR schedule runs across processes; tokens equal one device."""
    tiny = os.path.join(ROOT, "tests", "fixtures", "llama_tiny")
    args = ["--model", tiny, "--gen-len", "3", "--ragged", "--batch", "3"]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    result = subprocess.run([sys.executable, "-m", "jax_nvrar.launch", "--nproc-per-node", "2", "--platform", "cpu",
                             "-m", "models.decode", *args, "--allreduce", "reference"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tp=2" in result.stdout + result.stderr and "2 process(es)" in result.stdout + result.stderr
    decode.main([*args, "--tp", "1", "--allreduce", "xla", "--no-warmup"])
    expected = _rows(capsys.readouterr().out)
    assert len(expected) == 3
    assert _rows(result.stdout) == expected


def test_summary_says_where_each_all_reduce_went(tmp_path):
    # backend="auto" on CPU hands every all-reduce to lax.psum; the summary
    # (and stderr) say so instead of implying the kernel ran.
    out = tmp_path / "summary.json"
    summary = decode.main(["--tp", "2", "--batch", "2", "--prompt-len", "4", "--gen-len", "3",
                           "--json", str(out)])
    routes = summary["allreduce_routes"]
    assert routes and {r["route"] for r in routes} == {"xla"}
    assert {r["bytes"] for r in routes} >= {2 * 64 * 4}  # a decode step: batch x dim x f32
    assert summary == json.loads(out.read_text())
    assert len(summary["tokens"]) == 2 and all(len(row) == 3 for row in summary["tokens"])
    assert decode.main(["--tp", "2", "--allreduce", "xla", "--gen-len", "2"])["allreduce_routes"] == []


def test_compare_with_other_all_reduces(capsys):
    # Same weights and prompts through another all-reduce: xla against itself is identical; the
    # counts come from a real comparison (a doctored copy differs where it was changed).
    summary = decode.main(["--tp", "2", "--allreduce", "xla", "--compare-with", "xla,reference",
                           "--batch", "2", "--gen-len", "4", "--no-warmup"])
    same = summary["token_comparisons"]["xla"]
    assert {k: same[k] for k in ("mismatched", "compared", "first_mismatch_step", "rows_identical")} == {
        "mismatched": 0, "compared": 8, "first_mismatch_step": None, "rows_identical": 2}
    for key in ("teacher_forced", "teacher_forced_cached"):
        forced = same[key]
        assert (forced["max_abs_diff"], forced["differing"], forced["positions"]) == (0.0, 0, 8)
        assert (forced["first_position_logits_differ"], forced["first_position_choice_differs"]) == (None, None)
        assert forced["logit_std"] > 0
    assert same["teacher_forced_cached"]["reproduces_tokens"] is True
    assert summary["token_comparisons"]["reference"]["compared"] == 8
    out = capsys.readouterr().out
    assert "tokens vs xla: identical (8 compared)" in out and "teacher-forced" in out
    tokens = [row[:] for row in summary["tokens"]]
    tokens[1][2] += 1
    assert decode.compare_tokens(summary["tokens"], tokens) == {
        "mismatched": 1, "compared": 8, "first_mismatch_step": 2, "rows_identical": 1}
    with pytest.raises(SystemExit):
        decode.parse_args(["--compare-with", "nccl"])


def test_teacher_forced_sees_a_wrong_all_reduce():
    import jax

    from models import config, tp as tp_lib
    from models.generate import Generator

    cfg = config.get_config("tiny", dtype="float32")
    mesh = tp_lib.make_mesh(2)
    graphdef, state = tp_lib.init_weights(cfg, mesh, seed=0)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    gen = Generator(graphdef, state, mesh, jax.lax.psum)
    tokens, _ = gen.generate(prompts, 5)
    wrong = Generator(graphdef, state, mesh, lambda x, axis: x)  # no all-reduce at all
    for compare in (decode.teacher_forced, decode.teacher_forced_cached):
        forced = compare(gen, wrong, prompts, tokens)
        assert forced["positions"] == 10 and forced["max_abs_diff"] > 0.01
        assert forced["first_position_logits_differ"] == 0
    # An all-reduce wrong only for one-token inputs (the decode steps): the one pass sees nothing, the
    # cached comparison places the difference at the first decode step.
    decode_only = Generator(graphdef, state, mesh,
                            lambda x, axis: jax.lax.psum(x, axis) if x.shape[1] > 1 else x)
    assert decode.teacher_forced(gen, decode_only, prompts, tokens)["max_abs_diff"] == 0
    forced = decode.teacher_forced_cached(gen, decode_only, prompts, tokens)
    assert (forced["first_position_logits_differ"], forced["reproduces_tokens"]) == (1, True)
    # Teacher forcing through the cache lines up with generation: its greedy choices are the tokens.
    choices = jax.jit(lambda x: jax.numpy.argmax(x, axis=-1))(decode.cached_logits(gen, prompts, tokens))
    np.testing.assert_array_equal(np.asarray(choices), tokens)
