"""Tensor parallelism for ``models/llama.py``: the mesh, the sharding rules, sharded weights and the
``shard_map`` that runs the single-device model code on each device's shard.

Megatron layout over one mesh axis, ``tp``:

* column-parallel ``q/k/v_proj`` and ``gate/up_proj`` (output heads / ffn columns split), row-parallel
  ``o_proj`` and ``down_proj`` (input heads / ffn rows split). Attention heads and the SwiGLU product
  stay local; the row-parallel outputs are partial sums, reduced by one all-reduce each: the only
  collectives inside a layer, and both go through the pluggable ``psum``.
* KV heads (and the KV cache) are split by head. When ``tp`` exceeds the number of KV heads, each KV
  head is replicated ``tp // n_kv_heads`` times (identical copies), so every device holds exactly the
  KV head its query heads use: the model then sees a GQA model with ``tp`` KV heads.
* Embedding and LM head are split by vocabulary rows. The LM head is then column-parallel: each
  device produces the logits of its vocabulary slice and the caller's jit samples from the
  vocab-sharded ``[B, vocab]`` array (argmax/top-p need only a small gather). The embedding lookup is a
  masked local lookup plus one all-reduce through the same ``psum``. This keeps 1/tp of the largest
  matrices per device (2 x 4.2 GB at 405B) and lets tied embeddings share one array and one sharding.
  Norm weights are replicated.

Weights are created directly in this layout, tensor by tensor: random ones by a jit whose output is
constrained to the layout (each device generates only its shard; threefry is partitionable),
checkpoint ones with ``jax.make_array_from_callback`` (each process reads only its devices' slices). The mesh is
built from ``jax.devices()``, so the same code runs one process on simulated or real devices, or one
process per GPU under ``python -m jax_nvrar.launch``.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.checkpoint import Checkpoint, hf_name
from models.config import LlamaConfig
from models.llama import KVCache, Llama

__all__ = ["AXIS", "RULES", "ALLREDUCES", "make_mesh", "check_tp", "get_psum", "init_weights",
           "load_weights", "abstract_state", "state_specs", "cache_shardings", "shard_forward", "replicated"]

AXIS = "tp"
# Logical axis -> mesh axis. Every axis not named here is replicated.
RULES = {"vocab": AXIS, "heads": AXIS, "kv_heads": AXIS, "ffn": AXIS}
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")

Psum = Callable[[jax.Array, str], jax.Array]
#: The all-reduces ``get_psum`` knows.
ALLREDUCES = ("nvrar", "reference", "xla")


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def spec(axes: tuple[str, ...]) -> P:
    return P(*(RULES.get(a) for a in axes))


def make_mesh(tp: int | None = None) -> Mesh:
    """A 1-D ``tp`` mesh over the first ``tp`` of ``jax.devices()`` (all of them by default)."""
    devices = jax.devices()
    tp = len(devices) if tp is None else tp
    if not isinstance(tp, int) or not 1 <= tp <= len(devices):
        raise ValueError(f"tp={tp!r} must be between 1 and the {len(devices)} available devices")
    if jax.process_count() > 1 and tp != len(devices):
        raise ValueError(f"with {jax.process_count()} processes tp must span all {len(devices)} devices, "
                         f"got tp={tp}")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def check_tp(cfg: LlamaConfig, tp: int) -> None:
    """Raise ValueError unless ``cfg`` can be split ``tp`` ways."""
    for field in ("n_heads", "ffn_dim", "vocab_size"):
        if getattr(cfg, field) % tp:
            raise ValueError(f"tp={tp} does not divide {field}={getattr(cfg, field)} of {cfg.name}")
    kv = cfg.n_kv_heads
    if (kv % tp) if tp <= kv else (tp % kv):
        raise ValueError(f"tp={tp} and n_kv_heads={kv} of {cfg.name}: one must divide the other")


def kv_replicas(cfg: LlamaConfig, tp: int) -> int:
    return max(1, tp // cfg.n_kv_heads)


def get_psum(name: str) -> Psum:
    """The all-reduce for ``--allreduce``: ``xla`` is ``lax.psum``; ``nvrar`` and ``reference`` are
    ``jax_nvrar.psum`` with backend ``auto`` and ``reference``."""
    if name not in ALLREDUCES:
        raise ValueError(f"unknown all-reduce {name!r}; expected one of {', '.join(ALLREDUCES)}")
    if name == "xla":
        return jax.lax.psum
    import jax_nvrar  # imported here so the model runs (with 'xla') before the package is built

    return functools.partial(jax_nvrar.psum, backend="auto" if name == "nvrar" else "reference")


# ------------------------------------------------------------------------------------ shardings
def state_specs(state):
    """PartitionSpec of each parameter of a model state, from its ``axes`` metadata and ``RULES``."""
    return jax.tree.map(lambda v: spec(v.axes), state, is_leaf=_is_var)


def cache_specs(n_layers: int) -> KVCache:
    kv = spec(CACHE_AXES)
    return KVCache(k=[kv] * n_layers, v=[kv] * n_layers, start=P(), pos=P())


def cache_shardings(n_layers: int, mesh: Mesh) -> KVCache:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(n_layers))


def replicated(x, mesh: Mesh) -> jax.Array:
    """A host value as a replicated global array (valid with several processes, unlike device_put of
    a numpy array onto devices other processes own)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


# -------------------------------------------------------------------------------------- weights
def _repeat_kv(x, axes: tuple[str, ...], rep: int):
    """Replicate KV heads ``rep`` times, copies adjacent: head ``j`` of the result is head ``j // rep``."""
    if rep == 1 or "kv_heads" not in axes:
        return x
    repeat = jnp.repeat if isinstance(x, jax.Array) else np.repeat
    return repeat(x, rep, axis=axes.index("kv_heads"))


def _base_state(cfg: LlamaConfig):
    """The model's parameters as abstract ``nnx.Param``s (shape, dtype, axes, init): no memory."""
    return nnx.state(Llama(cfg, None))


def abstract_state(cfg: LlamaConfig, tp: int):
    """Shapes, dtypes and axes of the state in its tp-way layout (KV heads replicated if needed)."""
    rep = kv_replicas(cfg, tp)

    def expand(v):
        shape = list(v.shape)
        if "kv_heads" in v.axes:
            shape[v.axes.index("kv_heads")] *= rep
        return v.replace(jax.ShapeDtypeStruct(tuple(shape), v.dtype))

    return jax.tree.map(expand, _base_state(cfg), is_leaf=_is_var)


def _map_params(cfg: LlamaConfig, make):
    """``(graphdef, state)`` whose every parameter is ``make(hf_name, abstract_param)``, tensor by tensor."""
    def one(key_path, var):
        return var.replace(make(hf_name(tuple(getattr(k, "key", k) for k in key_path)), var))

    graphdef, base = nnx.split(Llama(cfg, None))
    return graphdef, jax.tree_util.tree_map_with_path(one, base, is_leaf=_is_var)


@functools.partial(jax.jit, static_argnames=("init", "shape", "axes", "dtype", "rep", "sharding"))
def _init_tensor(seed_and_id, *, init, shape, axes, dtype, rep, sharding):
    key = jax.random.fold_in(jax.random.key(seed_and_id[0]), seed_and_id[1])
    return jax.lax.with_sharding_constraint(_repeat_kv(init(key, shape, dtype), axes, rep), sharding)


def init_weights(cfg: LlamaConfig, mesh: Mesh, seed: int = 0):
    """Random weights created in their sharded layout, one jit per tensor: ``(graphdef, state)``.

    Each device generates only its shard (threefry is partitionable) and peak memory is one tensor's
    worth, so 70B initialises on 4 x 80 GB. Tensors of one shape share an executable (a 70B model
    needs ~10 compilations, not 723). Tensor ``name`` is drawn from ``fold_in(key(seed), crc32(name))``:
    the values do not depend on the mesh, every tp gives the one-device model.
    """
    check_tp(cfg, mesh.size)
    rep = kv_replicas(cfg, mesh.size)

    def make(name, var):
        seed_and_id = replicated(np.array([seed, zlib.crc32(name.encode())], np.uint32), mesh)
        return _init_tensor(seed_and_id, init=var.init, shape=var.shape, axes=var.axes,
                            dtype=jnp.dtype(cfg.dtype), rep=rep, sharding=NamedSharding(mesh, spec(var.axes)))

    return _map_params(cfg, make)


def load_weights(cfg: LlamaConfig, mesh: Mesh, folder: str, *, progress: Callable[[str], None] | None = None):
    """Hugging Face safetensors from ``folder`` placed tensor by tensor into the sharded layout:
    ``(graphdef, state)``. Each process reads only the slices its devices hold; only the layers of
    ``cfg`` are read (``cfg.n_layers`` may truncate the checkpoint)."""
    check_tp(cfg, mesh.size)
    ckpt = Checkpoint(folder)
    rep = kv_replicas(cfg, mesh.size)
    dtype = jnp.dtype(cfg.dtype)

    def make(name, var):
        host = _repeat_kv(ckpt.read(name, var.shape, var.axes), var.axes, rep)  # lazy but for KV (small)
        if progress:
            progress(name)
        return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec(var.axes)),
                                            lambda idx: np.asarray(host[idx], dtype=dtype))

    return _map_params(cfg, make)


# ---------------------------------------------------------------------------------- the forward
def shard_forward(graphdef, abstract, mesh: Mesh, psum: Psum, *, with_cache: bool, last_only: bool):
    """``Llama.__call__`` over the mesh: ``f(state, tokens, cache_or_start) -> (logits, cache)``.

    Inside the ``shard_map`` each device runs the single-device model on its shards, with ``reduce``
    bound to ``psum(x, 'tp')``. Logits come out vocab-sharded, the cache head-sharded.
    """
    n_layers = len(abstract["layers"])

    def local(state, tokens, cache_or_start):
        model = nnx.merge(graphdef, state)
        vocab_start = jax.lax.axis_index(AXIS) * model.embed_tokens.shape[0]
        kwargs = dict(reduce=lambda x: psum(x, AXIS), vocab_start=vocab_start, last_only=last_only)
        if with_cache:
            return model(tokens, cache_or_start, **kwargs)
        return model(tokens, start=cache_or_start, **kwargs)[0]

    logits_spec = P(None, None, AXIS)
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(state_specs(abstract), P(), cache_specs(n_layers) if with_cache else P()),
        out_specs=(logits_spec, cache_specs(n_layers)) if with_cache else logits_spec,
        check_vma=True)
