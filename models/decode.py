"""Tensor-parallel Llama 3.x decode with a pluggable all-reduce (jax_nvrar.psum or lax.psum).

On a machine without GPUs the defaults run the ``tiny`` preset over 8 simulated CPU devices in
seconds. On GPUs, one process per GPU through the launcher, e.g.::

    python -m jax_nvrar.launch --nproc-per-node 4 -m models.decode \\
        --model llama3.1-70b --tp 4 --allreduce nvrar --batch 1 --prompt-len 128 --gen-len 128

With ``--allreduce nvrar`` on GPUs it calls ``jax_nvrar.initialize()`` first, which needs one process
per GPU (the launcher); ``--allreduce xla`` also runs single-process over all local GPUs.

``--model`` is a preset name or a Hugging Face checkpoint folder (``config.json`` + safetensors, and
``tokenizer.json`` for ``--prompt`` text when the ``tokenizers`` package is installed). Generated
tokens (or text) and a timing summary go to stdout, progress to stderr, both from process 0 only.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import os
import sys
import time

__all__ = ["main"]


def _log(msg: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(f"[decode] {msg}", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _cuda_expected() -> bool:
    """Whether JAX will pick a GPU, decided without initialising a backend (``jax_nvrar.initialize``
    must run before that)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return "cuda" in platforms or "gpu" in platforms
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def _launched() -> bool:
    """Whether jax.distributed runs (the launcher started it), as NVSHMEM's start needs."""
    import jax

    return getattr(jax.distributed, "is_initialized", lambda: False)()


def _configure_devices(args) -> None:
    import jax

    if _launched():
        return  # under the launcher: each process uses the devices it was given
    try:
        # Only the CPU backend reads this, so it is harmless where GPUs exist.
        jax.config.update("jax_num_cpu_devices", max(args.cpu_devices, args.tp or 0))
    except RuntimeError:
        pass  # backends already up (e.g. main() called from a test process): keep their devices


class _Routes(logging.Handler):
    """Counts where jax_nvrar.psum sent the all-reduces it traced (its DEBUG
    records): backend="auto" hands large messages to lax.psum."""

    NAMES = {"nvshmem": "the NVRAR kernel", "xla": "lax.psum", "reference": "the reference"}

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts = collections.Counter()
        self.logger = logging.getLogger("jax_nvrar")

    def emit(self, record):
        if hasattr(record, "route"):
            self.counts[(record.route, record.nbytes)] += 1

    def __enter__(self):
        self.saved_level = self.logger.level  # not self.level: the handler's own
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)

    def summary(self) -> list[dict]:
        return [{"route": route, "bytes": nbytes, "traced": n}
                for (route, nbytes), n in sorted(self.counts.items())]

    def describe(self) -> str:
        return ", ".join(f"{n} x {nbytes} B -> {self.NAMES.get(route, route)}"
                         for (route, nbytes), n in sorted(self.counts.items()))


def parse_args(argv=None):
    from models.tp import ALLREDUCES

    p = argparse.ArgumentParser(prog="python -m models.decode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="preset name (see models/config.py) or checkpoint folder")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size; None: all devices")
    p.add_argument("--allreduce", choices=ALLREDUCES, default="nvrar",
                   help="nvrar: jax_nvrar.psum (backend auto); reference: its pure-JAX schedule; "
                        "xla: jax.lax.psum")
    p.add_argument("--batch", type=int, default=4, help="prompts generated together")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (random ids when no --prompt)")
    p.add_argument("--ragged", action="store_true", help="random prompt lengths in [prompt-len/2, prompt-len]")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeatable; needs a checkpoint with tokenizer.json)")
    p.add_argument("--gen-len", type=int, default=16, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of random weights, prompts and sampling")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated devices when running on CPU (at least --tp)")
    p.add_argument("--no-warmup", action="store_true", help="time the first (compiling) run")
    p.add_argument("--compare-with", default="",
                   help=f"comma list of other all-reduces ({', '.join(ALLREDUCES)}) that generate the "
                        "same prompts on the same weights; their tokens are compared with this run's")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = p.parse_args(argv)
    args.compare_with = [name for name in args.compare_with.split(",") if name]
    unknown = set(args.compare_with) - set(ALLREDUCES)
    if unknown:
        p.error(f"--compare-with: unknown all-reduces {sorted(unknown)}; "
                f"expected one of {', '.join(ALLREDUCES)}")
    for name in ("batch", "prompt_len", "gen_len", "cpu_devices"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _prompts(args, tokenizer, vocab_size):
    import numpy as np

    if args.prompt:
        if tokenizer is None:
            raise ValueError("--prompt needs a checkpoint folder with tokenizer.json and the `tokenizers` "
                             f"package; {args.model!r} has none")
        return [tokenizer.encode(text).ids for text in args.prompt]
    rng = np.random.default_rng(args.seed)
    lengths = [args.prompt_len] * args.batch
    if args.ragged:
        lengths = [args.prompt_len] + list(rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1,
                                                        size=args.batch - 1))
    return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]


def compare_tokens(tokens, other) -> dict:
    """How two runs' generated tokens ``[B, gen_len]`` differ. Greedy decoding follows its first
    difference into a different continuation, so ``first_mismatch_step`` (the earliest step where any
    row differs) says more than the count."""
    import numpy as np

    differ = np.asarray(tokens) != np.asarray(other)
    steps = np.flatnonzero(differ.any(axis=0))
    return {"mismatched": int(differ.sum()), "compared": int(differ.size),
            "first_mismatch_step": int(steps[0]) if steps.size else None,
            "rows_identical": int((~differ.any(axis=1)).sum())}


def _logit_stats(a, b) -> dict:
    """How logits ``b [B, T, vocab]`` differ from ``a``: the largest and mean absolute difference, ``a``'s
    spread, the positions where the greedy choices differ, and the first position ``t`` (of ``T``) where
    any logit differs and where any choice differs (None: nowhere). ``max_margin_where_differ``: the
    largest gap, in ``a``'s logits, between its choice and ``b``'s where they differ (a difference at a
    gap far below the logits' spread is a near-tie); it can never exceed ``2 * max_abs_diff``, so the
    size of the logit difference is what to judge."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.generate import fetch

    @jax.jit
    def stats(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        top_a, top_b = jnp.argmax(a, axis=-1), jnp.argmax(b, axis=-1)
        pick = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
        margin = pick(a, top_a) - pick(a, top_b)  # how far b's choice is behind a's, in a's logits
        differ = top_a != top_b
        return dict(max_abs_diff=jnp.max(jnp.abs(a - b)), mean_abs_diff=jnp.mean(jnp.abs(a - b)),
                    logit_std=jnp.std(a), positions=jnp.asarray(differ.size),
                    differing=jnp.sum(differ), max_margin_where_differ=jnp.max(jnp.where(differ, margin, 0.0)),
                    logits_differ_at=jnp.any(a != b, axis=(0, 2)), choice_differs_at=jnp.any(differ, axis=0))

    values = {k: fetch(v) for k, v in stats(a, b).items()}
    first = lambda at: int(np.flatnonzero(at)[0]) if at.any() else None
    out = {k: float(v) for k, v in values.items() if v.ndim == 0}
    out["positions"], out["differing"] = int(out["positions"]), int(out["differing"])
    out["first_position_logits_differ"] = first(values["logits_differ_at"])
    out["first_position_choice_differs"] = first(values["choice_differs_at"])
    return out


def teacher_forced(gen, other, prompts, tokens) -> dict:
    """Both generators' logits for the same sequence (the prompts and ``tokens`` generated by ``gen``)
    in one forward pass without a cache, at the positions that predict the generated tokens: how far
    the two all-reduces move the logits, and where their greedy choices differ (``_logit_stats``).
    Fed the same tokens, neither run's earlier choices steer the other."""
    import jax
    import numpy as np

    from models import tp as tp_lib
    from models.generate import left_pad

    padded, start = left_pad(prompts)
    sequence = np.concatenate([padded, np.asarray(tokens, np.int32)[:, :-1]], axis=1)
    sequence, start = tp_lib.replicated(sequence, gen.mesh), tp_lib.replicated(start, gen.mesh)
    first = padded.shape[1] - 1  # the position whose logits choose the first generated token
    last = jax.jit(lambda x: x[:, first:])
    return _logit_stats(last(gen.forward(gen.params, sequence, start)),
                        last(other.forward(other.params, sequence, start)))


def cached_logits(gen, prompts, tokens):
    """``gen``'s float32 logits ``[B, len(tokens[0]), vocab]`` (vocab-sharded) that chose each of
    ``tokens`` when fed ``tokens`` through the path generation takes: the prefill of the prompts, then
    one cached decode step per token (generation's cached forward, compiled to return the logits
    rather than a sampled token)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import tp as tp_lib
    from models.generate import left_pad

    padded, start = left_pad(prompts)
    tokens = np.asarray(tokens, np.int32)
    out, cache = gen.prefill_logits(gen.params, tp_lib.replicated(padded, gen.mesh),
                                    tp_lib.replicated(start, gen.mesh),
                                    max_len=padded.shape[1] + tokens.shape[1])
    steps = [out]
    for col in tokens[:, :-1].T:
        out, cache = gen.step_logits(gen.params, cache, tp_lib.replicated(np.ascontiguousarray(col), gen.mesh))
        steps.append(out)
    return jax.jit(lambda xs: jnp.stack(xs, axis=1))(steps)


def teacher_forced_cached(gen, other, prompts, tokens) -> dict:
    """``teacher_forced`` through the cache (``cached_logits``), position ``t`` being decode step ``t``.
    Where the one-pass comparison agrees and this one does not, the difference is in the cached
    forward, not in the all-reduce's sums. ``reproduces_tokens``: whether ``gen``'s cached logits choose
    ``tokens`` (greedy), i.e. whether these programs, compiled apart from generation's, round alike."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.generate import fetch

    mine = cached_logits(gen, prompts, tokens)
    replicated = jax.sharding.NamedSharding(gen.mesh, jax.sharding.PartitionSpec())
    choices = fetch(jax.jit(lambda x: jnp.argmax(x, axis=-1), out_shardings=replicated)(mine))
    return dict(_logit_stats(mine, cached_logits(other, prompts, tokens)),
                reproduces_tokens=bool(np.array_equal(choices, np.asarray(tokens))))


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = _cuda_expected()
    _configure_devices(args)
    if "nvrar" in [args.allreduce] + args.compare_with and cuda:
        if _launched():
            import jax_nvrar

            jax_nvrar.initialize()
        else:  # e.g. one GPU, or several driven by this one process
            print("models.decode: not started by python -m jax_nvrar.launch, so the NVRAR kernel is not "
                  "started; nvrar's all-reduces run as lax.psum", file=sys.stderr)

    import jax

    from models import checkpoint, config, tp as tp_lib
    from models.generate import Generator, Sampling

    t_start = time.perf_counter()
    platform = jax.default_backend()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu" else "float32")
    folder = args.model if os.path.isdir(args.model) else None
    if folder:
        cfg = config.from_hf_config(folder, n_layers=args.layers, dtype=dtype)
    else:
        cfg = config.get_config(args.model, n_layers=args.layers, dtype=dtype)
    mesh = tp_lib.make_mesh(args.tp)
    tp_lib.check_tp(cfg, mesh.size)
    psum = tp_lib.get_psum(args.allreduce)
    devices = mesh.devices.ravel()
    device_desc = f"{len(devices)} x {devices[0].device_kind}"
    _log(f"{cfg.name}: {cfg.n_layers} layers, {cfg.dtype}, tp={mesh.size} on {device_desc} "
         f"({jax.process_count()} process(es)), allreduce={args.allreduce}")

    sampling = Sampling(args.temperature, args.top_p)
    tokenizer = checkpoint.load_tokenizer(folder) if folder else None
    prompts = _prompts(args, tokenizer, cfg.vocab_size)
    if folder:
        loaded = []

        def progress(name):
            loaded.append(name)
            if len(loaded) % 50 == 0:
                _log(f"loaded {len(loaded)} tensors ({name})")

        graphdef, state = tp_lib.load_weights(cfg, mesh, folder, progress=progress)
    else:
        graphdef, state = tp_lib.init_weights(cfg, mesh, seed=args.seed)
    weight_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    _log(f"weights ready: {_size(weight_bytes)} per device ({time.perf_counter() - t_start:.1f} s)")

    gen = Generator(graphdef, state, mesh, psum, sampling)
    with _Routes() as routes:
        if not args.no_warmup:
            t = time.perf_counter()
            gen.generate(prompts, min(args.gen_len, 2), seed=args.seed,
                         max_len=max(map(len, prompts)) + args.gen_len)
            _log(f"compiled prefill and decode step ({time.perf_counter() - t:.1f} s)")
        tokens, timing = gen.generate(prompts, args.gen_len, seed=args.seed)
    if routes.counts:
        _log(f"all-reduces traced: {routes.describe()}")
    comparisons = {}
    for name in args.compare_with:
        other = Generator(graphdef, state, mesh, tp_lib.get_psum(name), sampling)
        other_tokens, _ = other.generate(prompts, args.gen_len, seed=args.seed)
        comparisons[name] = dict(compare_tokens(tokens, other_tokens),
                                 teacher_forced=teacher_forced(gen, other, prompts, tokens),
                                 teacher_forced_cached=teacher_forced_cached(gen, other, prompts, tokens))

    steps = args.gen_len - 1
    step_s = timing["decode_s"] / steps if steps else float("nan")
    summary = {
        "model": cfg.name, "layers": cfg.n_layers, "dtype": cfg.dtype, "tp": mesh.size,
        "devices": device_desc, "processes": jax.process_count(), "allreduce": args.allreduce,
        "batch": len(prompts), "prompt_len": max(map(len, prompts)), "gen_len": args.gen_len,
        "prefill_ms": timing["prefill_s"] * 1e3, "decode_step_ms": step_s * 1e3,
        "decode_tokens_per_s": len(prompts) / step_s if steps else float("nan"),
        "weights_gb_per_device": weight_bytes / 1e9,
        "weight_read_gb_per_s": weight_bytes / step_s / 1e9 if steps else float("nan"),
        "tokens": [row.tolist() for row in tokens],
        "allreduce_routes": routes.summary(),
        "token_comparisons": comparisons,
    }
    if jax.process_index() == 0:
        for i, row in enumerate(tokens):
            shown = tokenizer.decode(row.tolist()) if tokenizer else " ".join(map(str, row))
            print(f"[{i}] {shown}")
        print(f"prefill: {summary['prefill_ms']:.2f} ms for {summary['batch']} x {summary['prompt_len']} tokens")
        print(f"decode:  {summary['decode_step_ms']:.3f} ms/step mean over {steps} steps, "
              f"{summary['decode_tokens_per_s']:.1f} tokens/s (batch {summary['batch']}), "
              f"weights {_size(weight_bytes)}/device read at {summary['weight_read_gb_per_s']:.2f} GB/s")
        for name, c in comparisons.items():
            verdict = ("identical" if c["mismatched"] == 0 else
                       f"{c['mismatched']} differ, first at step {c['first_mismatch_step']}; "
                       f"rows identical: {c['rows_identical']} of {len(prompts)}")
            print(f"tokens vs {name}: {verdict} ({c['compared']} compared)")
            for key, how in (("teacher_forced", "one pass"), ("teacher_forced_cached", "through the cache")):
                t = c[key]
                print(f"  teacher-forced on this run's tokens, {how}: logits differ by at most "
                      f"{t['max_abs_diff']:.4g} (mean {t['mean_abs_diff']:.3g}; logit std {t['logit_std']:.3g}); "
                      f"greedy choice differs at {t['differing']} of {t['positions']} positions, where this "
                      f"run's top-2 margin was at most {t['max_margin_where_differ']:.4g}; first position "
                      f"where logits differ: {t['first_position_logits_differ']}, choices: "
                      f"{t['first_position_choice_differs']}"
                      + (f"; its cached logits choose its tokens: {t['reproduces_tokens']}"
                         if "reproduces_tokens" in t else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
