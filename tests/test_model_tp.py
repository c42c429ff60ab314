"""Tensor parallelism of models/: every tp and every all-reduce gives the one-device model.

8 simulated CPU devices come from tests/conftest.py.
"""

import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from models import tp as tp_lib
from models.config import from_hf_config, get_config
from models.generate import Generator

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "llama_tiny")
PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8], [200, 11, 64], [9, 1, 2, 3, 4]]
COLLECTIVES = {"psum", "psum2", "psum_invariant", "all_gather", "all_gather_invariant", "ppermute",
               "all_to_all", "reduce_scatter", "psum_scatter", "pmax", "pmin", "nvrar_allreduce"}


def needs_devices(n):
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, have {jax.device_count()}")


def nvrar_psum(backend):
    try:
        from jax_nvrar import psum
    except ImportError as e:
        pytest.skip(f"jax_nvrar.psum is not importable yet: {e}")
    return functools.partial(psum, backend=backend)


PSUMS = {"xla": lambda: jax.lax.psum, "nvrar-reference": lambda: nvrar_psum("reference")}


def run(tp, psum):
    """Full no-cache logits of PROMPTS (left-padded) and 5 greedy tokens with the cache."""
    cfg = from_hf_config(FIXTURE, dtype="float32")
    mesh = tp_lib.make_mesh(tp)
    gen = Generator(*tp_lib.load_weights(cfg, mesh, FIXTURE), mesh, psum)
    tokens, _ = gen.generate(PROMPTS, 5)
    width = max(map(len, PROMPTS))
    padded = np.array([[0] * (width - len(p)) + p for p in PROMPTS], np.int32)
    start = np.array([width - len(p) for p in PROMPTS], np.int32)
    logits = gen.forward(gen.params, tp_lib.replicated(padded, mesh), tp_lib.replicated(start, mesh))
    return np.asarray(logits), tokens


@functools.lru_cache(maxsize=None)
def single_device():
    return run(1, jax.lax.psum)


@pytest.mark.parametrize("backend", list(PSUMS))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_equals_single_device(tp, backend):
    """tp=8 has one query-head pair per device and replicates each of the 2 KV heads 4 times."""
    needs_devices(tp)
    logits, tokens = run(tp, PSUMS[backend]())
    ref_logits, ref_tokens = single_device()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_without_the_all_reduce_tp_is_wrong():
    """Negative control: with the reductions replaced by the identity, tp=2 must not match."""
    needs_devices(2)
    logits, _ = run(2, lambda x, axis_name: x)
    assert np.abs(logits - single_device()[0]).max() > 1e-2


def _primitives(jaxpr, out):
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for value in eqn.params.values():
            for j in value if isinstance(value, (list, tuple)) else [value]:
                j = getattr(j, "jaxpr", j)  # ClosedJaxpr (jit) or Jaxpr (shard_map)
                if hasattr(j, "eqns"):
                    _primitives(j, out)
    return out


def test_only_collectives_are_one_psum_per_row_parallel_projection():
    """Per layer: one all-reduce after o_proj and one after down_proj; plus one for the embedding."""
    needs_devices(4)
    cfg = get_config("tiny")
    mesh = tp_lib.make_mesh(4)
    counted = []

    def psum(x, axis_name):
        counted.append(x.shape)
        return jax.lax.psum(x, axis_name)

    gen = Generator(*tp_lib.init_weights(cfg, mesh), mesh, psum)
    tokens = tp_lib.replicated(np.ones((2, 1), np.int32), mesh)
    cache = jax.eval_shape(lambda: gen.prefill(gen.params, tp_lib.replicated(np.ones((2, 3), np.int32), mesh),
                                               tp_lib.replicated(np.zeros(2, np.int32), mesh),
                                               jax.random.key(0), max_len=8))[1]
    jaxpr = jax.make_jaxpr(gen._forward_cached)(gen.state, tokens, cache)
    names = [n for n in _primitives(jaxpr.jaxpr, []) if n in COLLECTIVES]
    assert len(names) == 2 * cfg.n_layers + 1, names
    assert set(names) <= {"psum", "psum2", "psum_invariant"}, names
    assert counted[-(2 * cfg.n_layers + 1):] == [(2, 1, cfg.dim)] * (2 * cfg.n_layers + 1)


@pytest.mark.parametrize("tp", [2, 8])
def test_random_init_is_sharded_and_independent_of_tp(tp):
    needs_devices(tp)
    cfg = get_config("tiny")
    _, ref = tp_lib.init_weights(cfg, tp_lib.make_mesh(1), seed=4)
    mesh = tp_lib.make_mesh(tp)
    _, state = tp_lib.init_weights(cfg, mesh, seed=4)
    rep = tp // cfg.n_kv_heads if tp > cfg.n_kv_heads else 1
    flat_ref = dict(nnx.to_flat_state(ref))
    for path, var in nnx.to_flat_state(state):
        x = var[...]
        spec = tp_lib.spec(var.axes)
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (path, x.sharding)
        local = x.addressable_shards[0].data.shape
        assert local == tuple(n // tp if s else n for n, s in zip(x.shape, spec)), (path, local)
        value = np.asarray(x)
        if "kv_heads" in var.axes and rep > 1:
            axis = var.axes.index("kv_heads")
            np.testing.assert_array_equal(value, np.repeat(np.take(value, range(0, x.shape[axis], rep), axis),
                                                           rep, axis))
            value = np.take(value, range(0, x.shape[axis], rep), axis)
        np.testing.assert_array_equal(value, np.asarray(flat_ref[path][...]), err_msg=str(path))


@pytest.mark.parametrize("tp,match", [(3, "tp=3"), (16, "tp=16")])
def test_tp_must_divide_the_model(tp, match):
    with pytest.raises(ValueError, match=match):
        tp_lib.check_tp(get_config("tiny"), tp)
    with pytest.raises(ValueError, match=match):
        tp_lib.make_mesh(tp) if tp > jax.device_count() else tp_lib.init_weights(get_config("tiny"),
                                                                                 tp_lib.make_mesh(tp))


def test_kv_heads_must_divide_or_be_divided_by_tp():
    cfg = get_config("tiny").replace(n_heads=12, n_kv_heads=3, ffn_dim=132, vocab_size=264)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        tp_lib.check_tp(cfg, 2)
    tp_lib.check_tp(cfg, 1)
    tp_lib.check_tp(cfg, 3)


def test_unknown_allreduce():
    with pytest.raises(ValueError, match="'nccl'"):
        tp_lib.get_psum("nccl")
