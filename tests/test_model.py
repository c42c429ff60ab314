"""Llama model (models/): parity with transformers, cache vs. no cache, padding, sampling, presets.

The Hugging Face reference is committed (tests/fixtures/make_llama_tiny.py regenerates it), so these
tests need neither torch nor transformers. 8 simulated CPU devices come from tests/conftest.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import tp as tp_lib
from models.config import PRESETS, from_hf_config, get_config
from models.generate import Generator, Sampling, left_pad, sample

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REFERENCE = os.path.join(FIXTURES, "llama_tiny_reference.npz")


def needs_devices(n):
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, have {jax.device_count()}")


def load(folder, tp=1, **overrides):
    cfg = from_hf_config(os.path.join(FIXTURES, folder), dtype="float32", **overrides)
    mesh = tp_lib.make_mesh(tp)
    graphdef, state = tp_lib.load_weights(cfg, mesh, os.path.join(FIXTURES, folder))
    return cfg, mesh, Generator(graphdef, state, mesh)


def full_logits(gen, tokens, start=None):
    """No-cache forward over whole (left-padded) sequences: float32 [B, T, vocab]."""
    start = np.zeros(len(tokens), np.int32) if start is None else start
    out = gen.forward(gen.params, tp_lib.replicated(np.asarray(tokens, np.int32), gen.mesh),
                      tp_lib.replicated(np.asarray(start, np.int32), gen.mesh))
    return np.asarray(out)


# ------------------------------------------------------------------------------ transformers parity
@pytest.mark.parametrize("folder,key", [("llama_tiny", "logits"), ("llama_tiny_tied", "logits_tied")])
@pytest.mark.parametrize("tp", [1, 4])
def test_logits_match_transformers(folder, key, tp):
    """bf16 untied (2 layers) and f32 tied (1 layer) checkpoints; GQA 8/2 heads; llama3 RoPE."""
    needs_devices(tp)
    ref = np.load(REFERENCE)
    _, _, gen = load(folder, tp)
    np.testing.assert_allclose(full_logits(gen, ref["tokens"]), ref[key], rtol=1e-5, atol=5e-5)


def test_preset_tiny_matches_fixture_config():
    """The committed checkpoint is the ``tiny`` preset, so preset runs and parity share one shape."""
    from_file = from_hf_config(os.path.join(FIXTURES, "llama_tiny"))
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                  "rope_theta", "rope_scaling", "tie_embeddings"):
        assert getattr(from_file, field) == getattr(PRESETS["tiny"], field), field


# ------------------------------------------------------------------------------ cache and padding
@pytest.mark.parametrize("tp", [1, 8])
def test_greedy_with_cache_equals_recomputed_argmax(tp):
    """Each cached greedy step equals argmax of a full no-cache forward over everything so far
    (tp=8 also replicates the 2 KV heads 4x in weights and cache). Prompts have different lengths."""
    needs_devices(tp)
    _, _, gen = load("llama_tiny", tp)
    prompts = [[5, 17, 99, 3, 250, 41, 7], [200, 11, 64], [9]]
    n = 6
    generated, _ = gen.generate(prompts, n)
    tokens, start = left_pad(prompts)
    width = tokens.shape[1]
    # One fixed-length buffer: causality makes the trailing zeros invisible to earlier positions.
    seq = np.concatenate([tokens, np.zeros((len(prompts), n), np.int32)], axis=1)
    for step in range(n):
        expect = full_logits(gen, seq, start)[:, width + step - 1].argmax(-1)
        np.testing.assert_array_equal(generated[:, step], expect, err_msg=f"step {step}")
        seq[:, width + step] = expect


def test_left_padding_does_not_change_a_row():
    """Row b of a padded batch generates what the prompt generates alone, and its logits match."""
    _, _, gen = load("llama_tiny")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    together, _ = gen.generate(prompts, 5)
    for row, p in enumerate(prompts):
        alone, _ = gen.generate([p], 5)
        np.testing.assert_array_equal(together[row], alone[0])
    tokens, start = left_pad(prompts)
    padded = full_logits(gen, tokens, start)[1, start[1]:]
    np.testing.assert_allclose(padded, full_logits(gen, [prompts[1]])[0], rtol=1e-5, atol=1e-5)


def test_decode_step_compiles_once_and_donates_cache():
    _, mesh, gen = load("llama_tiny", 2)
    traces = []
    inner = gen._forward_cached

    def counting(*args):
        traces.append(args[1].shape)
        return inner(*args)

    gen._forward_cached = counting
    gen.generate([[1, 2, 3]], 5)
    gen.generate([[4, 5, 6]], 5, seed=1)
    assert traces == [(1, 3), (1, 1)], traces  # one prefill and one decode trace for 2 x 4 steps
    tokens, start = (tp_lib.replicated(x, mesh) for x in left_pad([[1, 2, 3]]))
    key = jax.random.key(0)
    nxt, cache = gen.prefill(gen.params, tokens, start, key, max_len=8)
    old = cache.k[0]
    nxt, cache = gen.decode_step(gen.params, cache, nxt, key)
    assert old.is_deleted(), "decode_step must donate the cache"
    assert int(cache.pos) == 4
    out, dispatch, cache = gen.decode(nxt, cache, key, 3)  # pipelined: the host's time per step
    assert len(out) == 4 and len(dispatch) == 3 and all(t > 0 for t in dispatch)
    assert int(cache.pos) == 7


def test_max_len_too_short():
    _, _, gen = load("llama_tiny")
    with pytest.raises(ValueError, match="max_len=5"):
        gen.generate([[1, 2, 3]], 4, max_len=5)


# -------------------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_top_p_cuts_the_tail():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.3, 0.2]] * 512))
    keys = jax.random.key(7)
    seen = set(np.asarray(sample(logits, keys, Sampling(1.0, 0.6))).tolist())
    assert seen == {1, 2}, seen  # 0.4 + 0.3 reach 0.6; 0.2 and 0.1 are cut
    all_of_them = set(np.asarray(sample(logits, keys, Sampling(1.0, 1.0))).tolist())
    assert all_of_them == {0, 1, 2, 3}
    assert set(np.asarray(sample(logits, keys, Sampling(1.0, 1e-6))).tolist()) == {1}
    assert set(np.asarray(sample(logits, keys, Sampling(0.0))).tolist()) == {1}


def test_generation_sampling_reproducible():
    cfg = get_config("tiny")
    mesh = tp_lib.make_mesh(2)
    graphdef, state = tp_lib.init_weights(cfg, mesh, seed=3)
    prompts = [[1, 2, 3, 4], [5, 6]]
    hot = Generator(graphdef, state, mesh, sampling=Sampling(temperature=1.0, top_p=0.95))
    a, _ = hot.generate(prompts, 8, seed=1)
    b, _ = hot.generate(prompts, 8, seed=1)
    c, _ = hot.generate(prompts, 8, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy, _ = Generator(graphdef, state, mesh).generate(prompts, 8)
    nucleus, _ = Generator(graphdef, state, mesh, sampling=Sampling(1.0, 1e-6)).generate(prompts, 8, seed=5)
    np.testing.assert_array_equal(greedy, nucleus)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)


# --------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name,billions", [("llama3.2-1b", 1.236), ("llama3.2-3b", 3.213),
                                           ("llama3.1-8b", 8.030), ("llama3.1-70b", 70.554),
                                           ("llama3.1-405b", 405.853)])
def test_preset_parameter_counts(name, billions):
    """Abstract shapes only (no memory): the presets have the released models' parameter counts."""
    state = tp_lib.abstract_state(get_config(name), 1)
    assert sum(x.size for x in jax.tree.leaves(state)) / 1e9 == pytest.approx(billions, abs=1e-3)


def test_layer_override_and_unknown_preset():
    assert get_config("llama3.1-70b", n_layers=2).n_layers == 2
    with pytest.raises(ValueError, match="'llama-7'"):
        get_config("llama-7")
    with pytest.raises(ValueError, match="81"):
        get_config("llama3.1-70b", n_layers=81)
