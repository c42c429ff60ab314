"""Llama 3.x decoder in Flax NNX, written as single-device code.

Nothing here knows about meshes. Tensor parallelism (``models/tp.py``) runs this same code inside a
``shard_map`` on each device's shard of the weights, so every size below is read from the local
weight shapes (heads per device, vocabulary rows per device), never from the config. The two hooks it
needs are arguments of ``Llama.__call__``:

* ``reduce`` sums a partial result over the model shards; it is applied to the outputs of the
  row-parallel projections (``o_proj``, ``down_proj``) and of the vocabulary-sharded embedding
  lookup. It is the identity on one device.
* ``vocab_start`` is the first token id whose embedding row this shard holds (0 on one device).

Each weight is described once, by ``Weight(shape, axes, init)``; its logical axes ride along as the
``axes`` metadata of its ``nnx.Param``, from which ``tp.py`` derives shardings. Parameter names follow
Hugging Face's ``LlamaForCausalLM`` so checkpoint loading is a name-for-name mapping. Layouts are
``[in, out...]`` (``q_proj`` is ``[dim, heads, head_dim]``, ``o_proj`` is ``[heads, head_dim, dim]``);
``embed_tokens`` and ``lm_head`` are both ``[vocab, dim]``, so tied embeddings are one array.

Cache layout: slot ``s`` of row ``b`` holds the token at position ``s - start[b]``. Prompts are left
padded, so every row writes its next token to the same slot ``pos``, and a slot is visible to a query
when ``start[b] <= slot <= query slot``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import LlamaConfig

__all__ = ["Weight", "Llama", "KVCache", "rope_inv_freq"]

Array = jax.Array


def _identity(x: Array) -> Array:
    return x


# ----------------------------------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class Normal:
    """N(0, 1/fan_in): unit-variance outputs for unit-variance inputs."""

    fan_in: int

    def __call__(self, key, shape, dtype):
        return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(self.fan_in)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Ones:
    def __call__(self, key, shape, dtype):
        del key
        return jnp.ones(shape, dtype)


@dataclasses.dataclass(frozen=True)
class Weight:
    """One weight: its global shape, logical axis names and initializer ``init(key, shape, dtype)``.

    Logical axes: ``vocab``, ``embed`` (model dim), ``heads``, ``kv_heads``, ``head_dim``, ``ffn``.
    ``axes`` and ``init`` travel as metadata of the ``nnx.Param``, so an abstract model (``Llama(cfg, None)``)
    carries everything needed to shard, initialise or load it.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: Callable

    def create(self, rngs: nnx.Rngs | None, dtype) -> nnx.Param:
        """The parameter, initialised from ``rngs``; abstract (a ShapeDtypeStruct) when ``rngs`` is None."""
        value = (jax.ShapeDtypeStruct(self.shape, jnp.dtype(dtype)) if rngs is None
                 else self.init(rngs.params(), self.shape, dtype))
        return nnx.Param(value, axes=self.axes, init=self.init)


# -------------------------------------------------------------------------------------- functions
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies with llama3 scaling, computed in float32 exactly as transformers does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    inv_freq = inv_freq.astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq).astype(np.float32)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / s.factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate ``x [B, T, H, D]`` by ``positions [B, T]`` (Hugging Face's half-split convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(freqs).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(freqs).astype(x.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention. q: [B, T, H, D]; k, v: [B, K, S, D] with K dividing H; mask: [B, T, S].

    Keys and values come head-major, the layout of a batched matmul over (B, K): the cache keeps them
    so, and a decode step reads it without transposing it."""
    b, t, h, d = q.shape
    n_kv = k.shape[1]
    q = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    # A finite floor rather than -inf: rows with no visible key (left padding) stay NaN-free.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


# ---------------------------------------------------------------------------------------- modules
class RMSNorm(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        self.eps = cfg.norm_eps
        self.weight = Weight((cfg.dim,), ("embed",), Ones()).create(rngs, cfg.dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        d, h, kv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Weight((d, h, hd), ("embed", "heads", "head_dim"), Normal(d)).create(rngs, cfg.dtype)
        self.k_proj = Weight((d, kv, hd), ("embed", "kv_heads", "head_dim"), Normal(d)).create(rngs, cfg.dtype)
        self.v_proj = Weight((d, kv, hd), ("embed", "kv_heads", "head_dim"), Normal(d)).create(rngs, cfg.dtype)
        self.o_proj = Weight((h, hd, d), ("heads", "head_dim", "embed"), Normal(h * hd)).create(rngs, cfg.dtype)

    def __call__(self, x, positions, inv_freq, mask, kv_cache, pos, reduce):
        q = apply_rope(jnp.einsum("btd,dhk->bthk", x, self.q_proj[...]), positions, inv_freq)
        k = apply_rope(jnp.einsum("btd,dhk->bthk", x, self.k_proj[...]), positions, inv_freq)
        k, v = k.transpose(0, 2, 1, 3), jnp.einsum("btd,dhk->bhtk", x, self.v_proj[...])  # [B, K, T, D]
        if kv_cache is not None:
            k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), (0, 0, pos, 0))
            v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), (0, 0, pos, 0))
        out = attention(q, k, v, mask)
        return reduce(jnp.einsum("bthk,hkd->btd", out, self.o_proj[...])), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        d, f = cfg.dim, cfg.ffn_dim
        self.gate_proj = Weight((d, f), ("embed", "ffn"), Normal(d)).create(rngs, cfg.dtype)
        self.up_proj = Weight((d, f), ("embed", "ffn"), Normal(d)).create(rngs, cfg.dtype)
        self.down_proj = Weight((f, d), ("ffn", "embed"), Normal(f)).create(rngs, cfg.dtype)

    def __call__(self, x, reduce):
        h = jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...])
        return reduce(h @ self.down_proj[...])


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        self.input_layernorm = RMSNorm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, inv_freq, mask, kv_cache, pos, reduce):
        with jax.named_scope("attention"):
            h, kv_cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, mask, kv_cache, pos, reduce)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x), reduce)
        return x, kv_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values ``[B, kv_heads, S, head_dim]``, each row's first valid slot ``start [B]``
    and the slot the next token goes to, ``pos`` (a scalar shared by all rows)."""

    k: list
    v: list
    start: Array
    pos: Array


class Llama(nnx.Module):
    """The decoder. ``Llama(cfg, None)`` builds it abstract: shapes and metadata only, in no time even
    for 405B (``nnx.eval_shape`` would trace every initializer)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        self.rope_inv_freq = tuple(float(f) for f in rope_inv_freq(cfg))  # static: part of the graphdef
        vocab = Weight((cfg.vocab_size, cfg.dim), ("vocab", "embed"), Normal(1))
        self.embed_tokens = vocab.create(rngs, cfg.dtype)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg, rngs)
        self.lm_head = None if cfg.tie_embeddings else Weight(
            (cfg.vocab_size, cfg.dim), ("vocab", "embed"), Normal(cfg.dim)).create(rngs, cfg.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for ``batch`` rows of ``max_len`` slots, shaped after this (shard of the) model."""
        shapes = [(batch, layer.self_attn.k_proj.shape[1], max_len, layer.self_attn.k_proj.shape[2])
                  for layer in self.layers]
        dtype = dtype or self.embed_tokens.dtype
        return KVCache(k=[jnp.zeros(s, dtype) for s in shapes], v=[jnp.zeros(s, dtype) for s in shapes],
                       start=jnp.zeros((batch,), jnp.int32), pos=jnp.zeros((), jnp.int32))

    def __call__(self, tokens: Array, cache: KVCache | None = None, *, start: Array | None = None,
                 last_only: bool = False, reduce: Callable[[Array], Array] = _identity,
                 vocab_start: Array | int = 0) -> tuple[Array, KVCache | None]:
        """Logits for ``tokens [B, T]``, written to the cache at slots ``cache.pos ... cache.pos + T - 1``.

        Without a cache the tokens are a whole (left-padded) sequence, row ``b`` starting at ``start[b]``.
        Returns float32 logits ``[B, T, vocab]`` (``[B, 1, vocab]`` with ``last_only``) and the new cache.
        """
        b, t = tokens.shape
        if cache is None:
            start = jnp.zeros((b,), jnp.int32) if start is None else start
            pos, n_slots = jnp.zeros((), jnp.int32), t
        else:
            start, pos, n_slots = cache.start, cache.pos, cache.k[0].shape[2]
        slots = pos + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.maximum(slots[None, :] - start[:, None], 0)
        keys = jnp.arange(n_slots, dtype=jnp.int32)
        mask = (keys[None, None, :] <= slots[None, :, None]) & (keys[None, None, :] >= start[:, None, None])
        inv_freq = jnp.asarray(self.rope_inv_freq, jnp.float32)

        with jax.named_scope("embed"):
            table = self.embed_tokens[...]
            local = tokens - vocab_start
            here = (local >= 0) & (local < table.shape[0])
            x = jnp.where(here[..., None], table[jnp.clip(local, 0, table.shape[0] - 1)], 0)
            x = reduce(x)

        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer{i}"):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, (k, v) = layer(x, positions, inv_freq, mask, kv, pos, reduce)
            new_k.append(k)
            new_v.append(v)

        with jax.named_scope("lm_head"):
            x = self.norm(x[:, -1:] if last_only else x)
            head = self.embed_tokens[...] if self.lm_head is None else self.lm_head[...]
            logits = jnp.einsum("btd,vd->btv", x, head, preferred_element_type=jnp.float32)
        if cache is None:
            return logits, None
        return logits, KVCache(k=new_k, v=new_v, start=start, pos=pos + t)
