"""jax_nvrar.psum against lax.psum on 8 simulated CPU devices."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_nvrar

# On CPU "xla" and "auto" are lax.psum itself, so correctness is checked on
# the reference backend; routing has its own tests below.
BACKENDS = ["reference"]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def mesh_of(shape, names):
    devices = np.array(jax.devices()[:math.prod(shape)]).reshape(shape)
    return jax.sharding.Mesh(devices, names)


def reduce_with(psum_fn, mesh, spec, x, *, check_vma=True, out_spec=P()):
    """jit(shard_map(psum_fn)) on x laid out as ``spec`` over ``mesh``."""
    x = jax.device_put(x, NamedSharding(mesh, spec))
    f = jax.shard_map(psum_fn, mesh=mesh, in_specs=spec, out_specs=out_spec,
                      check_vma=check_vma)
    return jax.jit(f)(x)


def integer_valued(shape, dtype, seed=0):
    # |sum of 8 values| <= 128: exact in every dtype, bf16 included.
    values = np.random.default_rng(seed).integers(-16, 17, shape)
    values[values == 0] = 3  # never zeros: they hide unwritten outputs
    return jnp.asarray(values, dtype)


def assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got, np.float64),
                                  np.asarray(want, np.float64))


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("node_size", [1, 2, 4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_valued_matches_lax_psum(dtype, backend, node_size, check_vma):
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued((8, 37), dtype)
    ours = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", backend=backend,
                                 node_size=node_size),
        mesh, P("tp"), x, check_vma=check_vma)
    want = reduce_with(lambda v: lax.psum(v, "tp"), mesh, P("tp"), x,
                       check_vma=check_vma)
    assert_same(ours, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_three_nodes_of_two(dtype, backend):
    mesh = mesh_of((6,), ("tp",))
    x = integer_valued((6, 11, 3), dtype, seed=1)
    ours = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", backend=backend, node_size=2),
        mesh, P("tp"), x)
    assert_same(ours, reduce_with(lambda v: lax.psum(v, "tp"), mesh,
                                  P("tp"), x))


@pytest.mark.parametrize("node_size", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_floats_within_rounding(dtype, node_size):
    mesh = mesh_of((8,), ("tp",))
    x = jax.random.normal(jax.random.key(node_size), (8, 1000), dtype)
    ours = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", backend="reference",
                                 node_size=node_size),
        mesh, P("tp"), x)
    parts = np.asarray(x, np.float64).reshape(8, 1, 1000)
    exact, magnitude = parts.sum(0), np.abs(parts).sum(0)
    eps = float(jnp.finfo(dtype).eps)
    # Rounding of the node partial, of each doubling step and of the result.
    bound = (2 + math.log2(8)) * eps * magnitude
    err = np.abs(np.asarray(ours, np.float64) - exact)
    assert np.all(err <= bound), float((err / magnitude).max())


@pytest.mark.parametrize("backend", ["reference"])
def test_bitwise_identical_on_every_device(backend):
    mesh = mesh_of((8,), ("tp",))
    x = jax.random.normal(jax.random.key(7), (8, 513), jnp.bfloat16)
    stacked = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", backend=backend, node_size=2),
        mesh, P("tp"), x, check_vma=False, out_spec=P("tp"))
    rows = np.asarray(stacked).view(np.uint16)
    assert (rows == rows[:1]).all()


@pytest.mark.parametrize("shape", [(8,), (8, 1), (8, 7), (8, 3, 5, 2),
                                   (8, 1001)])
def test_odd_shapes(shape):
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued(shape, jnp.bfloat16, seed=2)
    ours = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", backend="reference", node_size=4),
        mesh, P("tp"), x)
    assert_same(ours, reduce_with(lambda v: lax.psum(v, "tp"), mesh,
                                  P("tp"), x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dimensional(backend):
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued((8,), jnp.float32, seed=3)

    def body(v):
        scalar = v.reshape(())
        out = jax_nvrar.psum(scalar, "tp", backend=backend, node_size=2)
        assert out.shape == ()
        return out[None]

    ours = reduce_with(body, mesh, P("tp"), x)
    assert float(ours[0]) == float(np.asarray(x).sum())


def test_empty_array():
    mesh = mesh_of((8,), ("tp",))
    x = jnp.ones((8, 0), jnp.float32)
    ours = reduce_with(lambda v: jax_nvrar.psum(v, "tp", backend="reference"),
                       mesh, P("tp"), x)
    assert ours.shape == (1, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pytree_of_mixed_dtypes(backend):
    mesh = mesh_of((8,), ("tp",))
    tree = {"a": integer_valued((8, 5), jnp.float32),
            "b": (integer_valued((8, 3, 3), jnp.bfloat16, 1),
                  integer_valued((8, 2), jnp.int32, 2)),
            "c": jnp.asarray(np.arange(8) % 2 == 0)}
    specs = jax.tree_util.tree_map(lambda _: P("tp"), tree)
    tree = jax.tree_util.tree_map(
        lambda a: jax.device_put(a, NamedSharding(mesh, P("tp"))), tree)

    def run(fn):
        out_specs = jax.tree_util.tree_map(lambda _: P(), tree)
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(specs,),
                                     out_specs=out_specs))(tree)

    ours = run(lambda t: jax_nvrar.psum(t, "tp", backend=backend,
                                        node_size=4))
    want = run(lambda t: lax.psum(t, "tp"))
    jax.tree_util.tree_map(assert_same, ours, want)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("axes", ["tp", "dp", ("dp", "tp")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_axis_mesh(backend, axes, check_vma):
    mesh = mesh_of((2, 4), ("dp", "tp"))
    x = integer_valued((2, 4, 19), jnp.bfloat16, seed=4)
    spec = P("dp", "tp")
    out_spec = P(*[None if a in np.atleast_1d(axes) else a
                   for a in ("dp", "tp")])
    ours = reduce_with(
        lambda v: jax_nvrar.psum(v, axes, backend=backend, node_size=2),
        mesh, spec, x, check_vma=check_vma, out_spec=out_spec)
    want = reduce_with(lambda v: lax.psum(v, axes), mesh, spec, x,
                       check_vma=check_vma, out_spec=out_spec)
    assert_same(ours, want)


@pytest.mark.parametrize("check_vma", [True, False])
def test_invariant_input_is_summed_like_psum(check_vma):
    # psum of a value that does not vary over the axis is axis_size * value.
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued((4,), jnp.float32, seed=5)
    ours = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", backend="reference", node_size=2),
        mesh, P(), x, check_vma=check_vma)
    np.testing.assert_array_equal(ours, 8 * np.asarray(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_scan_and_fori_loop(backend):
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued((8, 6), jnp.float32, seed=6)

    def bounded(total):
        # Integer-valued, small, and varying again so the carry keeps its type.
        return total % 64 - 32 + lax.axis_index("tp")

    def body(fn):
        def per_device(v):
            def step(carry, _):
                return bounded(fn(carry)), None
            out, _ = lax.scan(step, v, None, length=5)
            return lax.fori_loop(0, 3, lambda i, c: bounded(fn(c)), out)
        return per_device

    ours = reduce_with(
        body(lambda c: jax_nvrar.psum(c, "tp", backend=backend,
                                      node_size=2)),
        mesh, P("tp"), x, out_spec=P("tp"))
    want = reduce_with(body(lambda c: lax.psum(c, "tp")), mesh, P("tp"), x,
                       out_spec=P("tp"))
    assert_same(ours, want)


def test_jit_does_not_retrace():
    mesh = mesh_of((8,), ("tp",))
    traces = []

    def per_device(v):
        traces.append(1)
        return jax_nvrar.psum(v, "tp", backend="reference", node_size=2)

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("tp"),
                              out_specs=P()))
    sharding = NamedSharding(mesh, P("tp"))
    for seed in range(4):
        f(jax.device_put(integer_valued((8, 9), jnp.float32, seed), sharding))
    assert len(traces) == 1


@pytest.mark.parametrize("check_vma", [True, False])
def test_grad_matches_lax_psum(check_vma):
    mesh = mesh_of((8,), ("tp",))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (8, 5)),
                       NamedSharding(mesh, P("tp")))
    w = jnp.arange(5.0) + 1

    def loss(fn):
        f = jax.shard_map(lambda v: fn(jnp.sin(v)) * w, mesh=mesh,
                          in_specs=P("tp"), out_specs=P(),
                          check_vma=check_vma)
        return jax.jit(jax.grad(lambda v: f(v).sum()))

    ours = loss(lambda v: jax_nvrar.psum(v, "tp", backend="reference",
                                         node_size=2))(x)
    want = loss(lambda v: lax.psum(v, "tp"))(x)
    np.testing.assert_allclose(ours, want, rtol=1e-6)


def test_vmap_inside_shard_map():
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued((8, 3, 4), jnp.float32, seed=8)

    def run(fn):
        return reduce_with(lambda v: jax.vmap(fn)(v), mesh, P("tp"), x)

    ours = run(lambda r: jax_nvrar.psum(r, "tp", backend="reference",
                                        node_size=4))
    assert_same(ours, run(lambda r: lax.psum(r, "tp")))


def test_reduction_over_a_vmap_axis_name():
    x = jnp.arange(12.0).reshape(3, 4)
    ours = jax.vmap(lambda r: jax_nvrar.psum(r, "i", backend="reference"),
                    axis_name="i")(x)
    np.testing.assert_array_equal(ours, jnp.broadcast_to(x.sum(0), (3, 4)))


def test_default_backend_from_environment(monkeypatch):
    # Variables are read at trace time; trace() builds a new function each
    # time, so nothing comes from JAX's trace cache.
    monkeypatch.setenv("JAX_NVRAR_BACKEND", "reference")
    assert "nvrar_allreduce" in str(trace(lambda v: jax_nvrar.psum(v, "tp")))
    monkeypatch.setenv("JAX_NVRAR_BACKEND", "xla")
    assert "nvrar_allreduce" not in str(
        trace(lambda v: jax_nvrar.psum(v, "tp")))
    monkeypatch.setenv("JAX_NVRAR_BACKEND", "fast")
    with pytest.raises(ValueError, match="JAX_NVRAR_BACKEND='fast'"):
        trace(lambda v: jax_nvrar.psum(v, "tp"))


def test_auto_uses_xla_without_the_kernel():
    assert not jax_nvrar.is_available()
    mesh = mesh_of((8,), ("tp",))
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("tp")))
    f = jax.shard_map(lambda v: jax_nvrar.psum(v, "tp", backend="auto"),
                      mesh=mesh, in_specs=P("tp"), out_specs=P())
    jaxpr = str(jax.make_jaxpr(f)(x))
    assert "psum" in jaxpr and "nvrar_allreduce" not in jaxpr


def test_node_size_from_environment(monkeypatch):
    def reference(v):
        return jax_nvrar.psum(v, "tp", backend="reference")

    monkeypatch.setenv("JAX_NVRAR_NODE_SIZE", "2")
    assert "node_size=2" in str(trace(lambda v: reference(v)))
    monkeypatch.setenv("JAX_NVRAR_NODE_SIZE", "3")
    with pytest.raises(ValueError, match="JAX_NVRAR_NODE_SIZE=3: node_size=3 does not divide"):
        trace(lambda v: reference(v))
    monkeypatch.setenv("JAX_NVRAR_NODE_SIZE", "two")
    with pytest.raises(ValueError, match="JAX_NVRAR_NODE_SIZE='two'"):
        trace(lambda v: reference(v))


@pytest.mark.parametrize("node_size, error, message", [
    (3, ValueError, "node_size=3 does not divide"), (0, ValueError, "must be >= 1"),
    ("2", TypeError, "must be an int")])
def test_explicit_node_size_must_fit_on_xla_too(node_size, error, message):
    # XLA does not use it, but a wrong one is still the caller's mistake.
    with pytest.raises(error, match=message):
        trace(lambda v: jax_nvrar.psum(v, "tp", backend="xla", node_size=node_size))


def trace(fn, x=None):
    mesh = mesh_of((8,), ("tp",))
    x = jnp.ones((8, 4)) if x is None else x
    f = jax.shard_map(fn, mesh=mesh, in_specs=P("tp"), out_specs=P())
    return jax.make_jaxpr(f)(jax.device_put(x, NamedSharding(mesh, P("tp"))))


def test_error_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'nccl'"):
        trace(lambda v: jax_nvrar.psum(v, "tp", backend="nccl"))


def test_error_unbound_axis():
    with pytest.raises(NameError, match="axis name 'model' is not bound"):
        trace(lambda v: jax_nvrar.psum(v, "model"))
    with pytest.raises(NameError, match="not bound"):
        jax_nvrar.psum(jnp.ones(3), "tp")


@pytest.mark.parametrize("node_size", [3, 0, 16])
def test_error_bad_node_size(node_size):
    with pytest.raises(ValueError, match="node_size"):
        trace(lambda v: jax_nvrar.psum(v, "tp", backend="reference",
                                       node_size=node_size))


def test_error_non_numeric_dtype():
    keys = jax.random.split(jax.random.key(0), 8)
    mesh = mesh_of((8,), ("tp",))
    f = jax.shard_map(lambda k: jax_nvrar.psum(k, "tp"), mesh=mesh,
                      in_specs=P("tp"), out_specs=P())
    with pytest.raises(TypeError, match="numeric"):
        jax.make_jaxpr(f)(keys)


def test_error_nvshmem_unavailable():
    with pytest.raises(RuntimeError, match="backend='nvshmem' is unavailable"):
        trace(lambda v: jax_nvrar.psum(v, "tp", backend="nvshmem"))


def test_initialize_without_extension_or_distributed():
    with pytest.raises(RuntimeError):
        jax_nvrar.initialize()


def test_negative_control_broken_unfold_is_caught(monkeypatch):
    # Without the unfold step the folded-away node never gets the result:
    # the comparison above must then fail, or it proves nothing.
    from jax_nvrar import _schedule
    monkeypatch.setattr(_schedule, "unfold_pairs", lambda layout: [])
    mesh = mesh_of((6,), ("tp",))
    x = integer_valued((6, 4), jnp.float32, seed=9)
    stacked = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", backend="reference", node_size=2),
        mesh, P("tp"), x, check_vma=False, out_spec=P("tp"))
    want = np.asarray(x).reshape(6, 1, 4).sum(0)
    rows = np.asarray(stacked).reshape(6, 1, 4)
    assert (rows[:4] == want).all() and not (rows[4:] == want).all()


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_axis_of_one_device_is_the_identity(backend):
    # One device (e.g. one GPU): psum's answer, no communication.
    mesh = mesh_of((1,), ("tp",))
    x = integer_valued((1, 5), jnp.float32)
    ours = reduce_with(lambda v: jax_nvrar.psum(v, "tp", backend=backend),
                       mesh, P("tp"), x)
    np.testing.assert_array_equal(ours, x)


def test_node_size_variable_does_not_break_other_axes(monkeypatch):
    # A global node size that fits 'tp' (4) but not 'dp' (2): XLA and auto
    # still reduce over 'dp'; the NVRAR backends say what is wrong.
    monkeypatch.setenv("JAX_NVRAR_NODE_SIZE", "4")
    mesh = mesh_of((2, 4), ("dp", "tp"))
    x = integer_valued((2, 4, 3), jnp.float32, seed=10)
    spec, out_spec = P("dp", "tp"), P(None, "tp")
    want = reduce_with(lambda v: lax.psum(v, "dp"), mesh, spec, x,
                       out_spec=out_spec)
    for backend in ("xla", "auto"):
        ours = reduce_with(lambda v: jax_nvrar.psum(v, "dp", backend=backend),
                           mesh, spec, x, out_spec=out_spec)
        assert_same(ours, want)
    with pytest.raises(ValueError, match="JAX_NVRAR_NODE_SIZE=4: node_size=4 does not divide"):
        reduce_with(lambda v: jax_nvrar.psum(v, "dp", backend="reference"),
                    mesh, spec, x, out_spec=out_spec)


def test_blank_and_malformed_variables(monkeypatch):
    monkeypatch.setenv("JAX_NVRAR_AUTO_MAX_KB", "")  # blank: the default
    monkeypatch.setenv("JAX_NVRAR_BACKEND", " ")
    assert "psum" in str(trace(lambda v: jax_nvrar.psum(v, "tp")))
    monkeypatch.setenv("JAX_NVRAR_AUTO_MAX_KB", "lots")
    with pytest.raises(ValueError, match="JAX_NVRAR_AUTO_MAX_KB='lots'"):
        trace(lambda v: jax_nvrar.psum(v, "tp"))


@pytest.mark.parametrize("name, value, message", [
    ("JAX_NVRAR_ALGO", "foo", "JAX_NVRAR_ALGO='foo' is not one of"),
    ("JAX_NVRAR_BLOCKS", "-1", "JAX_NVRAR_BLOCKS=-1 must be >= 0"),
    ("JAX_NVRAR_BLOCKS", "abc", "JAX_NVRAR_BLOCKS='abc' is not an integer"),
    ("JAX_NVRAR_INTER_NODE", "bar", "JAX_NVRAR_INTER_NODE='bar' is not one of"),
    ("JAX_NVRAR_FAULT_INJECT", "7", "JAX_NVRAR_FAULT_INJECT=7 is not 0, 1, 2 or 3"),
    ("JAX_NVRAR_TUNING", "/nonexistent.json", "JAX_NVRAR_TUNING='/nonexistent.json'"),
])
@pytest.mark.parametrize("backend", ["auto", "xla", "reference"])
def test_malformed_kernel_settings_are_errors_on_every_backend(
        monkeypatch, name, value, message, backend):
    # Read only on the kernel's path, but checked on every call: a typo
    # shows where it is made, not first on a GPU machine.
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        trace(lambda v: jax_nvrar.psum(v, "tp", backend=backend))


def test_axis_index_groups_and_empty_axes():
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued((8, 3), jnp.float32, seed=11)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    ours = reduce_with(
        lambda v: jax_nvrar.psum(v, "tp", axis_index_groups=groups), mesh,
        P("tp"), x, check_vma=False, out_spec=P("tp"))
    want = reduce_with(lambda v: lax.psum(v, "tp", axis_index_groups=groups),
                       mesh, P("tp"), x, check_vma=False, out_spec=P("tp"))
    assert_same(ours, want)
    with pytest.raises(ValueError, match="axis_index_groups"):
        trace(lambda v: jax_nvrar.psum(v, "tp", axis_index_groups=groups,
                                       backend="reference"))
    assert jax_nvrar.psum(x, ()) is x


def test_large_messages_are_reduced_in_pieces(monkeypatch):
    # Pieces of 7 elements for a 40-element message: 6 launches, one ragged.
    from jax_nvrar import _psum
    monkeypatch.setattr(_psum, "_piece_elements", lambda *args: 7)
    mesh = mesh_of((8,), ("tp",))
    x = integer_valued((8, 5, 8), jnp.bfloat16, seed=12)

    def body(v):
        return jax_nvrar.psum(v, "tp", backend="reference", node_size=2)

    jaxpr = str(trace(body, x))
    assert jaxpr.count("nvrar_allreduce[") == 6
    assert_same(reduce_with(body, mesh, P("tp"), x),
                reduce_with(lambda v: lax.psum(v, "tp"), mesh, P("tp"), x))


class _FakeRuntime:
    """Enough of an initialised runtime to lower backend='nvshmem' on CPU."""

    slot_bytes = 128 << 20


@pytest.mark.parametrize("axes,groups", [
    ("tp", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("dp", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    (("dp", "tp"), [[0, 1, 2, 3, 4, 5, 6, 7]]),
])
def test_kernel_lowering_carries_the_group_table(monkeypatch, axes, groups):
    # The custom call gets psum's replica groups of the mesh (devices stand
    # in for PEs here), the node size and the variant.
    from jax_nvrar import _psum, _runtime
    monkeypatch.setattr(_runtime, "require", lambda: _FakeRuntime)
    monkeypatch.setattr(_runtime, "slot_for", lambda table: 0)
    monkeypatch.setattr(_runtime, "max_message_bytes", lambda g, n: 1 << 30)
    monkeypatch.setattr(_psum, "_pe_of", lambda device: device.id)
    mesh = mesh_of((2, 4), ("dp", "tp"))
    spec = P("dp", "tp")
    f = jax.jit(jax.shard_map(
        lambda v: jax_nvrar.psum(v, axes, backend="nvshmem", node_size=2),
        mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    x = jax.ShapeDtypeStruct((2, 4, 40000), jnp.bfloat16,
                             sharding=NamedSharding(mesh, spec))
    text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    call = next(l for l in text.splitlines() if "@nvrar_allreduce" in l)
    flat = ", ".join(str(pe) for group in groups for pe in group)
    assert f"groups = dense<[{flat}]>" in call
    assert f"group_size = {len(groups[0])} : i64" in call
    assert "node_size = 2 : i64" in call
    # One node (2 PEs): the table's pick at 80 KB, Lamport one-shot; several
    # nodes: 0, the kernel's choice of the hierarchical path's lines.
    assert f"algo = {5 if len(groups[0]) == 2 else 0} : i64" in call


@pytest.mark.parametrize("node_size,kib,kernel", [
    (4, 4096, True), (4, 4097, False),   # one node: JAX_NVRAR_AUTO_MAX_KB
    (2, 2048, True), (2, 2049, False),   # two nodes: ..._AUTO_MAX_KB_NODES
])
def test_auto_routes_by_size_and_layout(monkeypatch, node_size, kib, kernel):
    # backend="auto" takes the kernel up to the crossover measured for the
    # group's layout and lax.psum above it (lowered for CUDA on the CPU).
    from jax_nvrar import _psum, _runtime
    monkeypatch.setattr(_runtime, "is_available", lambda: True)
    monkeypatch.setattr(_runtime, "require", lambda: _FakeRuntime)
    monkeypatch.setattr(_runtime, "slot_for", lambda table: 0)
    monkeypatch.setattr(_runtime, "max_message_bytes", lambda g, n: 1 << 30)
    monkeypatch.setattr(_psum, "_pe_of", lambda device: device.id)
    mesh = mesh_of((4,), ("tp",))
    f = jax.jit(jax.shard_map(
        lambda v: jax_nvrar.psum(v, "tp", node_size=node_size),
        mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))
    x = jax.ShapeDtypeStruct((4, kib * 512), jnp.bfloat16,  # kib KiB each
                             sharding=NamedSharding(mesh, P("tp")))
    text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert ("@nvrar_allreduce" in text) == kernel
    assert ("all_reduce" in text) == (not kernel)


def test_docstring_example_runs():
    import doctest

    from jax_nvrar import _psum
    globs = dict(jax=jax, jnp=jnp, jax_nvrar=jax_nvrar, P=P)
    test = doctest.DocTestFinder().find(_psum.psum, "psum", globs=globs)[0]
    result = doctest.DocTestRunner().run(test)
    assert result.attempted == 4 and result.failed == 0
