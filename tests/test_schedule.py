"""The schedule's pure functions: partners, folds and chunk ownership."""

import itertools

import pytest

from jax_nvrar import _schedule as s


@pytest.mark.parametrize("num_nodes", range(1, 13))
def test_fold_and_doubling_reach_every_node(num_nodes):
    # Simulate the inter-node phase on sets of contributing nodes: at the end
    # every node must hold the contributions of all nodes exactly once.
    held = {k: {k} for k in range(num_nodes)}
    layout = s.Layout(num_nodes=num_nodes, node_size=1)
    for src, dst in s.fold_pairs(layout):
        assert not held[dst] & held[src]
        held[dst] = held[dst] | held[src]
    for step in range(s.doubling_steps(num_nodes)):
        new = dict(held)
        for src, dst in s.doubling_pairs(layout, step):
            assert not held[dst] & held[src], "a contribution counted twice"
            new[dst] = held[dst] | held[src]
        held = new
    for src, dst in s.unfold_pairs(layout):
        held[dst] = held[src]
    assert all(v == set(range(num_nodes)) for v in held.values())


@pytest.mark.parametrize("num_nodes", range(1, 13))
def test_partners_are_symmetric(num_nodes):
    core = s.largest_power_of_two_at_most(num_nodes)
    for node in range(num_nodes):
        p = s.fold_partner(node, num_nodes)
        if p is not None:
            assert s.fold_partner(p, num_nodes) == node
        for step in range(s.doubling_steps(num_nodes)):
            q = s.doubling_partner(node, step, num_nodes)
            assert (q is None) == (node >= core)
            if q is not None:
                assert s.doubling_partner(q, step, num_nodes) == node


@pytest.mark.parametrize("count,parts", [(0, 4), (1, 4), (7, 4), (16, 4),
                                         (13, 3), (5, 8)])
def test_chunks_cover_the_message_once(count, parts):
    covered = list(itertools.chain.from_iterable(
        range(*s.chunk_bounds(count, parts, i)) for i in range(parts)))
    assert covered == list(range(count))


def test_intra_node_pairs_stay_inside_nodes():
    layout = s.make_layout(8, 4)
    for shift in range(1, 4):
        pairs = s.intra_node_pairs(layout, shift)
        assert sorted(d for _, d in pairs) == list(range(8))
        assert all(layout.node_of(a) == layout.node_of(b) for a, b in pairs)


@pytest.mark.parametrize("axis_size,node_size", [(8, 3), (6, 4), (4, 0)])
def test_bad_node_size(axis_size, node_size):
    with pytest.raises(ValueError, match="node_size"):
        s.make_layout(axis_size, node_size)


def test_node_size_must_be_int():
    with pytest.raises(TypeError, match="node_size"):
        s.make_layout(8, 2.0)
