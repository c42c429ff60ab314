"""What decode.py measures, and the worker that measures it.

Every process of a group runs ``worker_main`` on the same tensor-parallel
model (``models/``): for each model it chooses how many layers fit, creates
random weights once, builds one ``models.generate.Generator`` per variant
(backend x node layout) and runs the cases (workload x batch x variant) in
lock-step. After each case one small all-gather reduces the per-rank times
(max over ranks) and agrees whether time is left, so ranks never disagree
about running the next collective. The method is in decode.py's docstring.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import math
import statistics
import time
import traceback

import _harness as H
from _allreduce_cases import ITEMSIZE, Layout

#: What replaces lax.psum inside the model's shard_map, in table order. xla
#: comes first: its tokens are the baseline the others are compared with.
BACKENDS = ("xla", "nvrar", "nvshmem", "reference", "nocomm")
#: Backends with no notion of nodes: one variant per TP size, layout "any".
LAYOUT_FREE = ("xla", "nocomm")
# The host's time to dispatch a step: the median over the first steps of each
# pipelined generation, before XLA's limit on executions in flight can block it.
HOST_STEPS = 16
NOCOMM_NOTE = ("nocomm = the model with psum replaced by the identity: the "
               "same compute without communication, NUMERICALLY WRONG; "
               "measured only to split step time into compute and all-reduce")
PSUM_DESCRIPTION = {
    "xla": "jax.lax.psum (NCCL on GPU)",
    "nvrar": "jax_nvrar.psum(backend='auto', node_size=S): the NVRAR kernel "
             "up to JAX_NVRAR_AUTO_MAX_KB per message, lax.psum above",
    "nvshmem": "jax_nvrar.psum(backend='nvshmem', node_size=S): the NVRAR "
               "kernel for every message",
    "reference": "jax_nvrar.psum(backend='reference', node_size=S): the NVRAR "
                 "schedule built from lax.ppermute",
    "nocomm": NOCOMM_NOTE,
}
#: Share of the device memory limit the layer planner leaves free (compiler
#: scratch, fragmentation, the estimate's error), plus a fixed reserve.
MEMORY_MARGIN, MEMORY_RESERVE = 0.10, 1 << 30


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str  # "decode" (decode-heavy) or "prefill" (prefill-heavy)
    prompt_len: int
    gen_len: int
    batches: tuple

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.gen_len


@dataclasses.dataclass(frozen=True)
class Variant:
    backend: str
    layout: Layout | None  # None: LAYOUT_FREE backends

    @property
    def label(self) -> str:
        return self.backend if self.layout is None else \
            f"{self.backend}@{self.layout.name}"

    def psum(self):
        """``psum(x, axis_name)`` for models.generate.Generator."""
        import jax

        if self.backend == "xla":
            return jax.lax.psum
        if self.backend == "nocomm":
            return no_communication
        import jax_nvrar

        return functools.partial(
            jax_nvrar.psum, node_size=self.layout.node_size,
            backend="auto" if self.backend == "nvrar" else self.backend)


def no_communication(x, axis_name):
    """The identity in place of psum: see NOCOMM_NOTE."""
    del axis_name
    return x


def variants(backends, layouts, tp: int) -> list[Variant]:
    out = []
    for backend in BACKENDS:
        if backend not in backends:
            continue
        if backend in LAYOUT_FREE:
            out.append(Variant(backend, None))
        else:
            out += [Variant(backend, l) for l in layouts if l.n == tp]
    return out


# --------------------------------------------------------------------------
# Memory: how many layers fit
# --------------------------------------------------------------------------

def memory_estimate(cfg, tp: int, layers: int, batch: int, prompt_len: int,
                    gen_len: int) -> dict:
    """Bytes per device of weights, KV cache and the largest transient
    buffers (prefill's attention scores and MLP activations), from the
    shapes of models/llama.py under models/tp.py's layout. An estimate."""
    item = ITEMSIZE[cfg.dtype]
    d, hd, slots = cfg.dim, cfg.head_dim, prompt_len + gen_len
    heads, ffn, vocab = cfg.n_heads // tp, cfg.ffn_dim // tp, cfg.vocab_size // tp
    kv_heads = max(1, cfg.n_kv_heads // tp)  # replicated when tp > n_kv_heads
    fixed = (vocab * d * (1 if cfg.tie_embeddings else 2) + d) * item
    layer = (2 * d * heads * hd + 2 * d * kv_heads * hd + 3 * d * ffn + 2 * d) * item
    kv_layer = 2 * batch * slots * kv_heads * hd * item
    transient = (2 * batch * heads * prompt_len * slots * 4      # scores, probs (f32)
                 + 3 * batch * prompt_len * ffn * item           # gate, up, product
                 + 6 * batch * prompt_len * d * 4                # residual, norms, sums
                 + 2 * batch * prompt_len * (heads + 2 * kv_heads) * hd * item
                 + 2 * batch * vocab * 4)                        # last logits
    return {"fixed": fixed, "per_layer": layer + kv_layer, "transient": transient,
            "total": fixed + layers * (layer + kv_layer) + transient}


def plan_layers(cfg, tp: int, shapes, limit: float | None,
                requested: int | None) -> tuple[int, str, list]:
    """(layers to run, why, shapes that do not fit even one layer).
    ``shapes``: (batch, prompt_len, gen_len) of every case of the model; the
    layers run are the most that every case which fits at all can hold."""
    full = cfg.n_layers
    if requested is not None:
        return min(requested, full), f"--layers {requested}", []
    if limit is None:
        return full, "device reports no memory limit: full model", []
    budget = limit * (1 - MEMORY_MARGIN) - MEMORY_RESERVE
    fits = {}
    for s in shapes:
        e = memory_estimate(cfg, tp, 0, *s)
        fits[s] = int((budget - e["fixed"] - e["transient"]) // e["per_layer"])
    too_big = [s for s, n in fits.items() if n < 1]
    layers = min([n for n in fits.values() if n >= 1] + [full])
    if len(too_big) == len(shapes):
        return 0, "not even one layer fits (estimate)", too_big
    need = max(memory_estimate(cfg, tp, layers, *s)["total"] for s in shapes if s not in too_big)
    return layers, (f"~{need / 1e9:.1f} GB of {limit / 1e9:.1f} GB per device "
                    "(estimate)"), too_big


def layer_requests(text: str) -> dict:
    """'auto' -> {}, '24' -> {'*': 24}, 'llama3.1-405b=24,...' -> per model."""
    out = {}
    for part in H.parse_list(text or "auto"):
        if part == "auto":
            continue
        name, _, value = part.rpartition("=")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--layers {part!r}: expected auto, N or MODEL=N")
        out[name or "*"] = int(value)
    return out


# --------------------------------------------------------------------------
# Measurements (collective: every process of the mesh calls them)
# --------------------------------------------------------------------------

def copy_bandwidth(mesh, mib: int, repeats: int = 5, chain: int = 10) -> dict:
    """Device-memory bandwidth of a streaming pass (``x + 1`` over ``mib`` MiB
    of bf16 per device, donated so it runs in place: every byte read once and
    written once), on all devices at once. ``chain`` passes are dispatched
    back to back per measurement, so host dispatch is amortised; slowest rank
    per measurement, median over ``repeats``."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    count = (mib << 20) // 2
    make = jax.jit(lambda: jnp.zeros((mesh.size, count), jnp.bfloat16),
                   out_shardings=NamedSharding(mesh, P(mesh.axis_names[0])))
    step = jax.jit(lambda v: v + 1, donate_argnums=0)
    x = make()
    for _ in range(2):  # compile, then one warm pass
        x = step(x)
    x.block_until_ready()
    H.barrier("jax_nvrar_decode_copy")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(chain):
            x = step(x)
        x.block_until_ready()
        times.append((time.perf_counter() - start) / chain)
    del x
    seconds, maxima = H.median_of_max(H.gather_rows(times).tolist())
    nbytes = count * 2
    return {"bytes_per_device": nbytes, "time_us": seconds * 1e6,
            "times_us": [round(float(t) * 1e6, 2) for t in maxima],
            "copy_gbps": 2 * nbytes / seconds / 1e9,
            "method": f"x + 1 in place over {mib} MiB bf16 per device, all "
                      "devices at once; bytes = read + write; slowest rank, "
                      f"median of {repeats} x {chain} chained passes"}


def memory_limit() -> float | None:
    """The smallest device memory limit over ranks (None on CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    limit = float(stats.get("bytes_limit", 0))
    return float(H.gather_rows([limit])[:, 0].min()) or None


def kv_read_bytes(cache) -> int:
    """KV-cache bytes one device reads per decode step: its shard of every
    layer's keys and values (attention reads every slot, masked)."""
    return sum(x.addressable_shards[0].data.nbytes for x in cache.k + cache.v)


def weight_read_bytes(state) -> int:
    """Parameter bytes one device reads per decode step: all of its shards
    but the input embedding table when it is not also the LM head (the
    lookup reads only ``batch`` rows of it)."""
    import jax

    def nbytes(tree):
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))

    total = nbytes(state)
    if "lm_head" in state:
        total -= nbytes(state["embed_tokens"])
    return total


def prompts_for(vocab_size: int, batch: int, prompt_len: int, seed: int):
    """Random prompts, the same for every variant and on every process."""
    import numpy as np

    rng = np.random.default_rng([seed, batch, prompt_len])
    return rng.integers(0, vocab_size, size=(batch, prompt_len)).tolist()


def device_inputs(mesh, vocab_size: int, batch: int, prompt_len: int, seed: int):
    """(tokens [B, P], start [B], key) of the random prompts, replicated on
    ``mesh`` as prefill and the decode step take them."""
    import jax
    from models import tp as tp_lib
    from models.generate import left_pad

    tokens, start = left_pad(prompts_for(vocab_size, batch, prompt_len, seed))
    key = jax.random.wrap_key_data(
        tp_lib.replicated(jax.random.key_data(jax.random.key(seed)), mesh))
    return tp_lib.replicated(tokens, mesh), tp_lib.replicated(start, mesh), key


def _generate(gen, tokens, start, key, max_len: int, gen_len: int, *,
              sync_steps: bool):
    """Prefill + ``gen_len - 1`` decode steps, dispatched back to back
    (each step waited for if ``sync_steps``).
    -> (tokens [B, gen_len], per-step seconds (see Generator.decode), total s)."""
    import jax
    import numpy as np
    from models.generate import fetch

    begin = time.perf_counter()
    nxt, cache = gen.prefill(gen.params, tokens, start, key, max_len=max_len)
    out, steps, cache = gen.decode(nxt, cache, key, gen_len - 1, sync_steps=sync_steps)
    jax.block_until_ready((out[-1], cache))
    total = time.perf_counter() - begin
    del cache
    return np.stack([fetch(t) for t in out], axis=1), steps, total


def run_case(gen, cfg, workload: Workload, batch: int, args) -> dict:
    """One variant on one (workload, batch): compile and warm up, then
    ``prefill_repeats`` timed prefills (TTFT), one generation with every
    step synchronised (step times), ``repeats`` pipelined generations (e2e).
    Per-rank numbers; the caller reduces them over ranks."""
    import jax
    import numpy as np

    tokens, start, key = device_inputs(gen.mesh, cfg.vocab_size, batch, workload.prompt_len,
                                       args.seed)
    max_len = workload.max_len

    begin = time.perf_counter()
    nxt, cache = gen.prefill(gen.params, tokens, start, key, max_len=max_len)
    warm_steps = max(1, min(args.warmup, workload.gen_len - 1))  # within the cache
    out, _, cache = gen.decode(nxt, cache, key, warm_steps)
    jax.block_until_ready((out[-1], cache))
    compile_s = time.perf_counter() - begin
    kv_bytes = kv_read_bytes(cache)
    del nxt, out, cache

    H.barrier("jax_nvrar_decode_case")
    ttft = []
    for _ in range(args.prefill_repeats):
        t = time.perf_counter()
        nxt, cache = gen.prefill(gen.params, tokens, start, key, max_len=max_len)
        nxt.block_until_ready()
        ttft.append(time.perf_counter() - t)
        del nxt, cache
    out, steps, _ = _generate(gen, tokens, start, key, max_len, workload.gen_len,
                              sync_steps=True)
    e2e, host, deterministic = [], [], True
    for _ in range(args.repeats):
        again, dispatch, total = _generate(gen, tokens, start, key, max_len,
                                           workload.gen_len, sync_steps=False)
        e2e.append(total)
        host += dispatch[:HOST_STEPS]
        deterministic &= bool(np.array_equal(again, out))
    return {"ttft": ttft, "steps": steps, "e2e": e2e, "tokens": out,
            "host_step": statistics.median(host),
            "deterministic": deterministic, "compile_s": compile_s,
            "kv_bytes": kv_bytes}


# --------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------

def _mismatch(tokens, baseline) -> dict:
    from models.decode import compare_tokens

    if baseline is None:
        return {"mismatched": None, "first_mismatch_step": None}
    c = compare_tokens(tokens, baseline)
    return {"mismatched": c["mismatched"], "first_mismatch_step": c["first_mismatch_step"]}


class Worker:
    """State of one process's sweep: emits records (rank 0), keeps the ranks
    in lock-step and agreeing on the deadline."""

    def __init__(self, args, *, emit, rank0: bool):
        self.args, self.emit, self.rank0 = args, emit, rank0
        self.time_left = True

    def record(self, **fields) -> None:
        if self.rank0:
            self.emit({"type": "result", **fields})

    def reduce(self, tag: str, base: dict, result: dict | None, error: str | None,
               width: tuple, read_bytes: int, baseline) -> None:
        """Max over ranks of each time, median over samples; emit the row.
        ``width``: (TTFT samples, steps, e2e samples), the same on every rank
        whatever happened, so the all-gather always matches."""
        import numpy as np

        n_ttft, n_steps, n_e2e = width
        good = error is None and result is not None
        row = [float(good), float(time.time() < self.args.deadline)]
        if good:
            row += result["ttft"] + result["steps"] + result["e2e"] + [result["host_step"],
                                                                       result["compile_s"]]
        row += [math.nan] * (2 + n_ttft + n_steps + n_e2e + 2 - len(row))
        rows = H.gather_rows(row)
        self.time_left = bool(rows[:, 1].min() > 0)
        if rows[:, 0].min() < 1 or not good:
            self.record(**base, status="error", reason=error or "failed on another rank")
            return
        rows = rows[:, 2:]
        ttft = rows[:, :n_ttft].max(axis=0)
        step_s, step_max = H.median_of_max(rows[:, n_ttft:n_ttft + n_steps].tolist())
        e2e = rows[:, n_ttft + n_steps:-2].max(axis=0)
        read = read_bytes + result["kv_bytes"]
        fields = dict(
            base, status="ok",
            ttft_ms=statistics.median(ttft) * 1e3,
            ttft_samples_ms=[round(float(t) * 1e3, 3) for t in ttft],
            step_median_ms=step_s * 1e3,
            step_mean_ms=statistics.fmean(step_max) * 1e3,
            step_p90_ms=float(np.percentile(step_max, 90)) * 1e3,
            step_max_ms=max(step_max) * 1e3,
            steps_timed=n_steps,
            e2e_ms=statistics.median(e2e) * 1e3,
            e2e_synced_ms=(statistics.median(ttft) + sum(step_max)) * 1e3,
            host_step_ms=float(rows[:, -2].max()) * 1e3,
            tokens_per_s=base["batch"] / step_s,
            e2e_tokens_per_s=base["batch"] * base["gen_len"] / statistics.median(e2e),
            weight_read_bytes=read_bytes, kv_read_bytes=result["kv_bytes"],
            hbm_gbps=read / step_s / 1e9,
            compile_s=round(float(rows[:, -1].max()), 2),
            deterministic=result["deterministic"],
            tokens_sha1=hashlib.sha1(result["tokens"].tobytes()).hexdigest()[:16],
            **_mismatch(result["tokens"], baseline))
        fields["roofline_pct"] = 100 * fields["hbm_gbps"] / base["copy_gbps"]
        self.record(**fields)
        H.log(f"{tag}: TTFT {fields['ttft_ms']:.2f} ms, step {step_s * 1e3:.3f} ms "
              f"(median), e2e {fields['e2e_ms']:.1f} ms, #mismatch "
              f"{fields['mismatched']}  (compile {fields['compile_s']:.1f} s)")

    def run_model(self, cfg, layers: int, role: str, mesh, vs, workloads, info) -> None:
        """Every case of one (model, layers): weights once, then lock-step."""
        from models import tp as tp_lib
        from models.generate import Generator

        args = self.args
        base0 = dict(info, layers=layers, role=role, tp=mesh.size, dtype=cfg.dtype,
                     truncated=layers < info["full_layers"])
        cases = [(w, b, v) for w in workloads for b in w.batches for v in vs]

        def base(w, b, v):
            return dict(base0, workload=w.name, batch=b, prompt_len=w.prompt_len,
                        gen_len=w.gen_len, max_len=w.max_len, backend=v.backend,
                        variant=v.label, layout=v.layout.name if v.layout else "any",
                        node_size=v.layout.node_size if v.layout else None,
                        psum=PSUM_DESCRIPTION[v.backend],
                        numerically_wrong=v.backend == "nocomm")

        if not self.time_left:
            for w, b, v in cases:
                self.record(**base(w, b, v), status="skipped",
                            reason="time budget spent (--time-budget)")
            return
        start = time.perf_counter()
        run_cfg = cfg.with_layers(layers)
        try:
            graphdef, state = tp_lib.init_weights(run_cfg, mesh, seed=args.seed)
        except Exception as exc:  # e.g. out of memory: the next model may fit
            H.log(f"{cfg.name} x {layers} layers: weights failed: {exc}")
            for w, b, v in cases:
                self.record(**base(w, b, v), status="error",
                            reason=f"weights: {type(exc).__name__}: {exc}"[:300])
            return
        read = weight_read_bytes(state)
        H.log(f"{cfg.name} x {layers} layers ({role}), tp={mesh.size}: weights "
              f"{read / 1e9:.2f} GB read per step per device, ready in "
              f"{time.perf_counter() - start:.1f} s")
        gens = {v.label: Generator(graphdef, state, mesh, v.psum()) for v in vs}
        baseline = {}
        for w, b, v in cases:
            record = base(w, b, v)
            tag = f"[tp={mesh.size}] {cfg.name}:{layers} {w.name} b={b} {v.label}"
            if not self.time_left:
                self.record(**record, status="skipped",
                            reason="time budget spent (--time-budget)")
                continue
            result, error = None, None
            try:
                result = run_case(gens[v.label], run_cfg, w, b, args)
            except Exception as exc:  # recorded per case; the sweep goes on
                error = f"{type(exc).__name__}: {exc}"
                H.log(f"{tag}: {error}\n{traceback.format_exc(limit=4)}")
            if result is not None and v.backend == "xla":
                baseline[(w.name, b)] = result["tokens"]
            self.reduce(tag, record, result, error,
                        (args.prefill_repeats, w.gen_len - 1, args.repeats), read,
                        baseline.get((w.name, b)))
        del gens, state, graphdef
        gc.collect()


def _plan_model(cfg, tp: int, workloads, limit, request, emit, rank0: bool) -> dict:
    """{layers: [workloads with the batches that fit]}. Layers are planned per
    workload (prefill's attention scores need far more memory than decoding);
    the caller initialises weights once per layer count."""
    by_layers = {}
    for w in workloads:
        shapes = [(b, w.prompt_len, w.gen_len) for b in w.batches]
        layers, why, too_big = plan_layers(cfg, tp, shapes, limit, request)
        if rank0:
            emit({"type": "plan", "tp": tp, "model": cfg.name, "workload": w.name,
                  "layers": layers, "full_layers": cfg.n_layers, "why": why})
            for b, _, _ in too_big:
                emit({"type": "skip", "tp": tp, "model": f"{cfg.name} {w.name} b={b}",
                      "reason": "does not fit in device memory even with one layer "
                                "(estimate)"})
        H.log(f"[tp={tp}] {cfg.name} {w.name}: {layers} of {cfg.n_layers} layers ({why})")
        fitting = tuple(b for b in w.batches if (b, w.prompt_len, w.gen_len) not in too_big)
        if layers >= 1 and fitting:
            by_layers.setdefault(layers, []).append(dataclasses.replace(w, batches=fitting))
    return by_layers


def worker_main(args, *, cpu: bool, emit, rank0: bool) -> None:
    """One group: the TP sizes ``args.tp`` on this process's devices."""
    from jax_nvrar import _config
    from models import config as model_config
    from models import tp as tp_lib

    backends = set(H.parse_list(args.backends))
    layouts = [Layout.parse(t) for t in H.parse_list(args.layouts)]
    skipped = []
    uses_nvshmem = bool(backends & {"nvrar", "nvshmem"})
    if uses_nvshmem:
        if cpu:
            why = ("functional CPU run: the NVSHMEM kernel needs CUDA GPUs, and "
                   "backend='auto' would silently be lax.psum")
        else:
            why = H.start_nvshmem()
        if why:
            skipped += [{"what": f"backend {b}", "reason": why}
                        for b in sorted(backends & {"nvrar", "nvshmem"})]
            backends -= {"nvrar", "nvshmem"}

    import jax

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    env = H.device_env()
    if rank0:
        emit({"type": "env", "device": env, "skipped": skipped,
              "jax_nvrar_config": {k: _config.get(k) for k in _config.VARIABLES}})
    dtype = args.dtype if args.dtype != "auto" else (
        "float32" if env["backend"] == "cpu" else "bfloat16")
    workloads = args.workload_list
    requests = layer_requests(args.layers)
    worker = Worker(args, emit=emit, rank0=rank0)
    for tp in (int(t) for t in H.parse_list(args.tp)):
        if tp > jax.device_count() or (not cpu and tp != jax.device_count()):
            if rank0:
                emit({"type": "skip", "tp": tp, "reason":
                      f"tp={tp} needs {tp} devices in this group; it has "
                      f"{jax.device_count()}"})
            continue
        mesh = tp_lib.make_mesh(tp)
        vs = variants(backends, layouts, tp)
        copy = copy_bandwidth(mesh, args.copy_mb)
        if rank0:
            emit({"type": "copy", "tp": tp, **copy})
        H.log(f"[tp={tp}] copy bandwidth {copy['copy_gbps']:.0f} GB/s per device")
        limit = memory_limit()
        for name in H.parse_list(args.models):
            cfg = model_config.get_config(name, dtype=dtype)
            info = {"model": name, "full_layers": cfg.n_layers,
                    "copy_gbps": copy["copy_gbps"]}
            try:
                tp_lib.check_tp(cfg, tp)
            except ValueError as exc:
                if rank0:
                    emit({"type": "skip", "tp": tp, "model": name, "reason": str(exc)})
                continue
            by_layers = _plan_model(cfg, tp, workloads, limit,
                                    requests.get(name, requests.get("*")), emit, rank0)
            for layers, ws in sorted(by_layers.items(), reverse=True):
                worker.run_model(cfg, layers, "main", mesh, vs, ws, info)
            # A second point per case for the per-layer fit of truncated runs.
            fit = [w for layers, ws in by_layers.items() if 1 < layers < cfg.n_layers
                   for w in ws]
            if fit:
                worker.run_model(cfg, 1, "fit", mesh, vs, fit, info)
    if uses_nvshmem and not cpu:
        import jax_nvrar

        H.barrier("jax_nvrar_decode_end")
        jax_nvrar.finalize()  # a no-op where initialize() failed
    if rank0:
        emit({"type": "end"})
