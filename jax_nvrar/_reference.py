"""The NVRAR schedule written with ``lax.ppermute``.

This is the executable specification of the kernel: the same chunk per local
rank (the kernel counts packets, not elements), the same partners at every
step, the same summation order (sources of a chunk are
added in local-rank order with float32 accumulation for half types; the two
operands of an inter-node step are added commutatively), so every device ends
with bitwise-identical values. It runs wherever XLA collectives run (CPU
included) and is what the kernel is tested against.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_nvrar import _schedule


def accumulation_dtype(dtype) -> np.dtype:
    """float32 for the half types, the dtype itself otherwise."""
    dtype = np.dtype(dtype)
    if dtype in (jnp.bfloat16, jnp.float16):
        return np.dtype(np.float32)
    return dtype


def _from_local_rank_order(received, local_rank, node_size):
    """``received[k]`` came from local rank ``(r - k) % g``; reorder so row
    ``s`` holds what local rank ``s`` sent."""
    order = (local_rank - jnp.arange(node_size)) % node_size
    return jnp.take(jnp.stack(received), order, axis=0)


def _add(a, b, dtype):
    acc = accumulation_dtype(dtype)
    return (a.astype(acc) + b.astype(acc)).astype(dtype)


def allreduce(x, axes: tuple, layout: _schedule.Layout):
    """Sum of ``x`` over the mapped ``axes`` (inside ``shard_map``)."""
    shape, dtype = x.shape, x.dtype
    g, num_nodes = layout.node_size, layout.num_nodes
    flat = x.reshape(-1)
    count = flat.size
    chunk = -(-count // g)
    chunks = jnp.pad(flat, (0, chunk * g - count)).reshape(g, chunk)

    member = lax.axis_index(axes)
    node, local_rank = member // g, member % g

    # Phase 1: reduce-scatter inside the node. At shift k, local rank r sends
    # chunk (r + k) % g to local rank (r + k) % g.
    received = [lax.dynamic_index_in_dim(chunks, local_rank, keepdims=False)]
    for shift in range(1, g):
        send = lax.dynamic_index_in_dim(
            chunks, (local_rank + shift) % g, keepdims=False)
        received.append(lax.ppermute(
            send, axes, _schedule.intra_node_pairs(layout, shift)))
    by_source = _from_local_rank_order(received, local_rank, g)
    acc = by_source[0].astype(accumulation_dtype(dtype))
    for source in range(1, g):
        acc = acc + by_source[source].astype(acc.dtype)
    mine = acc.astype(dtype)

    # Phase 2: recursive doubling across nodes, non-power-of-two counts folded.
    if num_nodes > 1:
        core = _schedule.largest_power_of_two_at_most(num_nodes)
        if core < num_nodes:
            got = lax.ppermute(mine, axes, _schedule.fold_pairs(layout))
            mine = jnp.where(node < num_nodes - core, _add(mine, got, dtype),
                             mine)
        for step in range(_schedule.doubling_steps(num_nodes)):
            got = lax.ppermute(mine, axes,
                               _schedule.doubling_pairs(layout, step))
            mine = jnp.where(node < core, _add(mine, got, dtype), mine)
        if core < num_nodes:
            got = lax.ppermute(mine, axes, _schedule.unfold_pairs(layout))
            mine = jnp.where(node >= core, got, mine)

    # Phase 3: all-gather inside the node.
    gathered = [mine]
    for shift in range(1, g):
        gathered.append(lax.ppermute(
            mine, axes, _schedule.intra_node_pairs(layout, shift)))
    full = _from_local_rank_order(gathered, local_rank, g).reshape(-1)
    return full[:count].reshape(shape)
