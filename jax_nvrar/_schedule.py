"""The NVRAR schedule: who talks to whom, and which chunk each device owns.

One description of the algorithm: the pure-JAX reference backend
(``_reference.py``) is built from it, and the CUDA kernel's host launcher
(``make_plan`` in ``csrc/allreduce.cu``) follows the same layout, partners and
fold, on the group table it receives as attributes. Everything here is a small
pure function of integers so it can be unit-tested without devices.

Terms. A reduction group has ``n = num_nodes * node_size`` members, numbered
``0..n-1`` in axis-index order. Members ``[k*node_size, (k+1)*node_size)``
form node ``k``. Within a node a member has a *local rank* ``0..node_size-1``.

Phases (the paper's NVRAR):
  1. reduce-scatter inside each node: the message is cut into ``node_size``
     chunks and local rank ``r`` ends up with chunk ``r`` summed over its node;
  2. recursive doubling across nodes between members of equal local rank,
     so local rank ``r`` of every node holds chunk ``r`` summed over the group.
     A node count that is not a power of two is first *folded*: node
     ``p + i`` (``p`` the largest power of two <= num_nodes) sends its chunk to
     node ``i`` and gets the result back at the end (*unfold*);
  3. all-gather inside each node.
With one node this is a two-shot all-reduce; with ``node_size == 1`` it is a
pure recursive-doubling all-reduce.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the members of one reduction group split into nodes."""

    num_nodes: int
    node_size: int

    @property
    def size(self) -> int:
        return self.num_nodes * self.node_size

    def node_of(self, member: int) -> int:
        return member // self.node_size

    def local_rank(self, member: int) -> int:
        return member % self.node_size

    def member(self, node: int, local_rank: int) -> int:
        return node * self.node_size + local_rank


def make_layout(axis_size: int, node_size: int) -> Layout:
    """Validates ``node_size`` against ``axis_size`` and returns the layout."""
    if isinstance(node_size, bool) or not isinstance(node_size, int):
        raise TypeError(f"node_size must be an int, got {node_size!r}")
    if node_size < 1:
        raise ValueError(f"node_size must be >= 1, got {node_size}")
    if axis_size % node_size:
        raise ValueError(
            f"node_size={node_size} does not divide the size of the reduced "
            f"axis ({axis_size}); a node is node_size consecutive devices of "
            "the axis, so node_size must divide it")
    return Layout(num_nodes=axis_size // node_size, node_size=node_size)


def chunk_bounds(count: int, parts: int, index: int) -> tuple[int, int]:
    """Half-open element range ``[start, stop)`` of chunk ``index``.

    Chunks are ``ceil(count / parts)`` long, so trailing chunks may be short
    or empty. The kernel splits the same way, counting 8-byte packets (LL
    lines) or 16-byte vectors (flag lines) instead of elements.
    """
    if not 0 <= index < parts:
        raise ValueError(f"chunk index {index} out of range for {parts} parts")
    size = -(-count // parts)
    start = min(index * size, count)
    return start, min(start + size, count)


def largest_power_of_two_at_most(n: int) -> int:
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    return 1 << (n.bit_length() - 1)


def fold_partner(node: int, num_nodes: int) -> int | None:
    """The node that ``node`` exchanges with in the fold / unfold step.

    Nodes ``p..num_nodes-1`` (``p`` the largest power of two) fold into nodes
    ``0..num_nodes-p-1``; every other node has no fold partner.
    """
    p = largest_power_of_two_at_most(num_nodes)
    if node >= p:
        return node - p
    if node < num_nodes - p:
        return node + p
    return None


def doubling_steps(num_nodes: int) -> int:
    """Number of recursive-doubling steps among the power-of-two core."""
    return largest_power_of_two_at_most(num_nodes).bit_length() - 1


def doubling_partner(node: int, step: int, num_nodes: int) -> int | None:
    """Partner of ``node`` at doubling ``step``; None for folded-away nodes."""
    p = largest_power_of_two_at_most(num_nodes)
    if node >= p:
        return None
    if not 0 <= step < doubling_steps(num_nodes):
        raise ValueError(f"step {step} out of range for {num_nodes} nodes")
    return node ^ (1 << step)


def intra_node_pairs(layout: Layout, shift: int) -> list[tuple[int, int]]:
    """(source, destination) members for one shift of a direct intra-node
    exchange: local rank ``r`` sends to local rank ``(r + shift) % node_size``
    of its own node."""
    g = layout.node_size
    return [(layout.member(k, r), layout.member(k, (r + shift) % g))
            for k in range(layout.num_nodes) for r in range(g)]


def inter_node_pairs(layout: Layout, node_map) -> list[tuple[int, int]]:
    """(source, destination) members when every node ``k`` with a partner
    ``node_map(k)`` sends to it, between members of equal local rank."""
    pairs = []
    for k in range(layout.num_nodes):
        dst = node_map(k)
        if dst is None:
            continue
        for r in range(layout.node_size):
            pairs.append((layout.member(k, r), layout.member(dst, r)))
    return pairs


def fold_pairs(layout: Layout) -> list[tuple[int, int]]:
    """Extra nodes send their chunk to their fold partner."""
    core = largest_power_of_two_at_most(layout.num_nodes)
    return inter_node_pairs(
        layout,
        lambda k: fold_partner(k, layout.num_nodes) if k >= core else None)


def unfold_pairs(layout: Layout) -> list[tuple[int, int]]:
    """Fold partners send the finished chunk back to the extra nodes."""
    core = largest_power_of_two_at_most(layout.num_nodes)
    return inter_node_pairs(
        layout,
        lambda k: fold_partner(k, layout.num_nodes) if k < core else None)


def doubling_pairs(layout: Layout, step: int) -> list[tuple[int, int]]:
    return inter_node_pairs(
        layout, lambda k: doubling_partner(k, step, layout.num_nodes))
