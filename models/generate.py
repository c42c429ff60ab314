"""Batched generation over the tensor-parallel model: prefill, a jitted decode step, sampling.

Prompts of different lengths are left-padded to a common length ``P``: row ``b`` starts at slot
``start[b] = P - len(prompt_b)``, so all rows write each new token to the same cache slot and the
decode step is one ``dynamic_update_slice`` per layer. The decode step donates the cache (XLA updates
it in place) and its only changing inputs are arrays of fixed shape, so it compiles once.

Sampling runs inside the same jit, on the vocab-sharded logits: greedy when ``temperature == 0``,
else temperature then top-p (nucleus) sampling. The key for the token that lands in slot ``s`` is
``fold_in(key(seed), s)``: a run is reproducible from its seed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import tp as tp_lib

__all__ = ["Sampling", "sample", "Generator", "left_pad"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``temperature == 0`` is greedy; otherwise softmax(logits / temperature) cut to the smallest set
    of tokens whose probability reaches ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids ``[B]`` from float32 logits ``[B, vocab]``."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep a sorted token if the mass before it is below top_p; the first one is always kept.
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < sampling.top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(desc, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [B, P], start [B])`` for prompts of different lengths, left-padded with ``pad_id``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"every prompt needs at least one token, got lengths {[len(p) for p in prompts]}")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in zip(tokens, prompts):
        row[width - len(p):] = p
    return tokens, np.array([width - len(p) for p in prompts], np.int32)


def fetch(x: jax.Array) -> np.ndarray:
    """A replicated global array to host (works when other processes own some of its devices)."""
    return np.asarray(x.addressable_data(0))


class Generator:
    """Prefill and decode for a sharded model ``(graphdef, state)`` on ``mesh``.

    ``psum(x, axis_name)`` is the all-reduce after each row-parallel projection: ``jax.lax.psum`` or
    ``jax_nvrar.psum`` (see ``models.tp.get_psum``).

    The jitted functions take ``params``, the list of the state's leaves, not the ``nnx.State``: jit
    flattens its arguments on every call, a list of arrays in C++, the nested ``State`` through Python
    code for each of its nodes (hundreds for an 80-layer model), on the host's path of every step.
    """

    def __init__(self, graphdef, state, mesh: Mesh, psum=jax.lax.psum, sampling: Sampling = Sampling()):
        self.graphdef, self.state, self.mesh, self.sampling = graphdef, state, mesh, sampling
        self.params, self._treedef = jax.tree.flatten(state)
        self.n_layers = len(state["layers"])
        fwd = functools.partial(tp_lib.shard_forward, graphdef, state, mesh, psum)
        self._forward_cached = fwd(with_cache=True, last_only=True)
        self._forward_full = fwd(with_cache=False, last_only=False)
        self._replicated = NamedSharding(mesh, P())
        self.forward = jax.jit(self._forward)
        self.prefill = jax.jit(self._prefill, static_argnames=("max_len",))
        self.decode_step = jax.jit(self._decode, donate_argnames=("cache",))
        # The same cached forwards, compiled to return float32 logits ``[B, vocab]`` rather than a token
        # (teacher forcing through the cache: models.decode.teacher_forced_cached).
        self.prefill_logits = jax.jit(self._prefill_forward, static_argnames=("max_len",))
        self.step_logits = jax.jit(self._step_forward, donate_argnames=("cache",))

    def _state(self, params):
        return jax.tree.unflatten(self._treedef, params)

    def _forward(self, params, tokens, start):
        return self._forward_full(self._state(params), tokens, start)

    def _sample(self, logits, key, slot):
        tokens = sample(logits, jax.random.fold_in(key, slot), self.sampling)
        return jax.lax.with_sharding_constraint(tokens, self._replicated)

    def _prefill_forward(self, params, tokens, start, *, max_len: int):
        """Run the left-padded prompts ``tokens [B, P]`` into a new cache of ``max_len`` slots:
        ``(logits of the last position [B, vocab], cache)``."""
        state = self._state(params)
        cache = nnx.merge(self.graphdef, state).init_cache(tokens.shape[0], max_len)
        cache = jax.lax.with_sharding_constraint(cache, tp_lib.cache_shardings(self.n_layers, self.mesh))
        logits, cache = self._forward_cached(state, tokens, dataclasses.replace(cache, start=start))
        return logits[:, -1], cache

    def _step_forward(self, params, cache, tokens):
        """``tokens [B]`` go to slot ``cache.pos``: ``(logits [B, vocab], cache)``."""
        logits, cache = self._forward_cached(self._state(params), tokens[:, None], cache)
        return logits[:, -1], cache

    def _prefill(self, params, tokens, start, key, *, max_len: int):
        """``(first generated token [B], cache)`` after the prompts (see ``_prefill_forward``)."""
        logits, cache = self._prefill_forward(params, tokens, start, max_len=max_len)
        return self._sample(logits, key, cache.pos), cache

    def _decode(self, params, cache, tokens, key):
        """One step: ``tokens [B]`` go to slot ``cache.pos``; returns (next tokens [B], cache)."""
        logits, cache = self._step_forward(params, cache, tokens)
        return self._sample(logits, key, cache.pos), cache

    def generate(self, prompts: Sequence[Sequence[int]], gen_len: int, *, seed: int = 0,
                 max_len: int | None = None) -> tuple[np.ndarray, dict]:
        """Generate ``gen_len`` tokens after each prompt: ``(tokens [B, gen_len], timings)``.

        ``timings``: ``prefill_s`` (prompt to first token, on device) and ``decode_s`` (the remaining
        ``gen_len - 1`` decode steps). The first call of a shape includes compilation.
        """
        if gen_len < 1:
            raise ValueError(f"gen_len must be >= 1, got {gen_len}")
        tokens, start = left_pad(prompts)
        need = tokens.shape[1] + gen_len
        max_len = need if max_len is None else max_len
        if max_len < need:
            raise ValueError(f"max_len={max_len} is shorter than prompt ({tokens.shape[1]}) + gen_len ({gen_len})")
        key = tp_lib.replicated(jax.random.key_data(jax.random.key(seed)), self.mesh)
        key = jax.random.wrap_key_data(key)
        tokens, start = tp_lib.replicated(tokens, self.mesh), tp_lib.replicated(start, self.mesh)

        t0 = time.perf_counter()
        nxt, cache = self.prefill(self.params, tokens, start, key, max_len=max_len)
        nxt.block_until_ready()
        t1 = time.perf_counter()
        out, _, cache = self.decode(nxt, cache, key, gen_len - 1)
        out[-1].block_until_ready()
        t2 = time.perf_counter()
        return np.stack([fetch(t) for t in out], axis=1), {"prefill_s": t1 - t0, "decode_s": t2 - t1}

    def decode(self, nxt, cache, key, steps: int, *, sync_steps: bool = False):
        """``steps`` decode steps after the token ``nxt`` (device arrays, as ``prefill`` returns them):
        ``(tokens, step_seconds, cache)``, ``tokens`` the list of ``steps + 1`` token arrays ``[B]``
        starting with ``nxt``. With ``sync_steps`` every step is waited for and ``step_seconds`` are
        the steps' times; otherwise the steps are dispatched back to back and ``step_seconds`` are the
        host's times to dispatch them (until XLA's limit on executions in flight makes it wait)."""
        out, step_seconds = [nxt], []
        for _ in range(steps):
            t = time.perf_counter()
            nxt, cache = self.decode_step(self.params, cache, nxt, key)
            if sync_steps:
                nxt.block_until_ready()
            step_seconds.append(time.perf_counter() - t)
            out.append(nxt)
        return out, step_seconds, cache
