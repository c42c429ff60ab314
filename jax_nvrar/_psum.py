"""``jax_nvrar.psum`` and the primitive behind its non-XLA backends.

The primitive ``nvrar_allreduce`` is typed exactly as ``lax.psum``: its
abstract evaluation *is* psum's (``psum_invariant`` under ``check_vma=True``,
``psum`` otherwise), and its transpose is psum's transpose, so shard_map's
type checks, ``grad``, ``vmap``, ``scan`` and ``jit`` caching treat it as
psum. Only the lowering differs:
  * ``impl="reference"``: the NVRAR schedule from ``lax.ppermute``
    (``_reference.py``), on any platform;
  * ``impl="nvshmem"``: the CUDA kernel as an XLA FFI custom call. The group
    table (which PEs reduce together) is built at lowering time from the
    mesh, as JAX builds psum's replica groups.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import config as jax_config
from jax._src import core
from jax._src.interpreters import ad, batching, mlir, pxla
from jax._src.lax import parallel as lax_parallel

from jax_nvrar import _config, _reference, _runtime, _schedule, _tuning

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16),
                 np.dtype(np.float16))
_FFI_TARGET = "nvrar_allreduce"


def _psum_primitive():
    """psum's own primitive for the current vma mode."""
    if jax_config._check_vma.value:
        return lax_parallel.psum_invariant_p, {}
    return lax_parallel.psum_p, {"axis_index_groups": None}


def _abstract_eval(aval, *, axes, node_size, impl, algo):
    prim, extra = _psum_primitive()
    return prim.abstract_eval(aval, axes=axes, **extra)


def _transpose(ct, x, *, axes, node_size, impl, algo):
    prim, extra = _psum_primitive()
    return ad.primitive_transposes[prim](ct, x, axes=axes, **extra)


def _batch(args, dims, *, axes, node_size, impl, algo):
    # A positional vmap axis is just more elements to sum (so the message may
    # now need pieces); reductions over vmapped *named* axes never reach here
    # (psum() sends them to lax.psum).
    (x,), (dim,) = args, dims
    return _bind(x, axes, node_size, impl, algo), dim


def _reference_lowering(ctx, x, *, axes, node_size, impl, algo):
    size = math.prod(lax.axis_size(a) for a in axes)
    layout = _schedule.make_layout(size, node_size)
    fun = functools.partial(_reference.allreduce, axes=axes, layout=layout)
    return mlir.lower_fun(fun, multiple_results=False)(ctx, x)


def _concrete_mesh(axis_context):
    mesh = getattr(axis_context, "mesh", None)
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(
            "backend='nvshmem' needs the concrete device mesh at lowering "
            "time: pass a jax.sharding.Mesh (not an AbstractMesh) to "
            "jax.shard_map, or set one with jax.set_mesh")
    return mesh


def _pe_of(device) -> int:
    """The NVSHMEM PE driving a device: one process per GPU, PE = process."""
    return device.process_index


def _kernel_variant(algo: str, nbytes: int, node_size: int,
                    num_nodes: int) -> tuple[str, int]:
    """(variant, thread blocks) of a call (blocks 0: the kernel's rule). On
    one node, for "auto": the tuning table's choice (_tuning.py). Several
    nodes always take the hierarchical path, which the table was not
    measured on: "auto" goes to the kernel, which picks Lamport lines on
    each node where they fit; the LL variants' names ask for LL lines.
    $JAX_NVRAR_BLOCKS overrides the block count.
    Lamport lines have a region of their own; LL lines and the
    flag variants' raw data share regions, and a raw vector left there could
    carry words equal to a later LL call's sequence number, so the flag
    variants run only when JAX_NVRAR_ALGO asks for them (benchmarks)."""
    variant, blocks = ((algo, 0) if algo != "auto" or num_nodes > 1
                       else _tuning.variant_for(nbytes, node_size))
    return variant, _forced_blocks() or blocks


def _algo() -> str:
    """$JAX_NVRAR_ALGO: the kernel variant asked for (auto: the table's)."""
    return _config.get_choice("JAX_NVRAR_ALGO", _config.ALGOS)


def _forced_blocks() -> int:
    """$JAX_NVRAR_BLOCKS: thread blocks per launch, 0 for the table's."""
    return _config.get_number("JAX_NVRAR_BLOCKS", maximum=_tuning.MAX_BLOCKS)


def _fault_switch() -> int:
    """$JAX_NVRAR_FAULT_INJECT: 0, 1 (no wait for any data), 2 (none for
    data from other nodes) or 3 (the kernel returns at once); testing only."""
    fault = _config.get_number("JAX_NVRAR_FAULT_INJECT")
    if fault > 3:
        raise ValueError(f"JAX_NVRAR_FAULT_INJECT={fault} is not 0, 1, 2 or 3")
    return fault


def _inter_node_puts() -> bool:
    """$JAX_NVRAR_INTER_NODE: whether every inter-node step uses puts."""
    return _config.get_choice("JAX_NVRAR_INTER_NODE", _config.INTER_NODE) == "put"


def _check_kernel_settings() -> None:
    """ValueError naming the variable where a kernel setting is malformed,
    whatever the backend: a typo shows where it is made (on CPU too), not
    first when the kernel runs on a GPU machine."""
    _algo()
    _forced_blocks()
    _fault_switch()
    _inter_node_puts()
    _tuning.table_entries()


def _nvshmem_lowering(ctx, x, *, axes, node_size, impl, algo):
    (aval,) = ctx.avals_in
    nbytes = math.prod(aval.shape) * aval.dtype.itemsize
    axis_context = ctx.module_context.axis_context
    mesh = _concrete_mesh(axis_context)
    devices = mesh.devices.flat
    # psum's replica groups (positions in the mesh), as NVSHMEM PEs.
    groups = tuple(tuple(_pe_of(devices[i]) for i in group)
                   for group in pxla.axis_groups(axis_context, axes))
    slot = _runtime.slot_for(groups)
    variant, blocks = _kernel_variant(algo, nbytes, node_size,
                                      len(groups[0]) // node_size)
    return jax.ffi.ffi_lowering(_FFI_TARGET)(
        ctx, x,
        groups=np.asarray(groups, dtype=np.int64).reshape(-1),
        group_size=np.int64(len(groups[0])),
        node_size=np.int64(node_size),
        slot=np.int64(slot),
        algo=np.int64(_runtime.algo_code(variant)),
        blocks=np.int64(blocks),
        puts=np.int64(_inter_node_puts()),
        fault=np.int64(_fault_switch()))


def _lowering(ctx, x, *, impl, **params):
    if impl == "reference":
        return _reference_lowering(ctx, x, impl=impl, **params)
    raise ValueError(
        f"backend={impl!r} has no lowering for platform(s) "
        f"{ctx.module_context.platforms}; the kernel runs on CUDA GPUs only")


def _cuda_lowering(ctx, x, *, impl, **params):
    if impl == "nvshmem":
        return _nvshmem_lowering(ctx, x, impl=impl, **params)
    return _lowering(ctx, x, impl=impl, **params)


#: One DEBUG record per leaf psum traces, saying where it goes (attributes
#: route, nbytes, dtype, axes); models/decode.py summarises them.
logger = logging.getLogger("jax_nvrar")

allreduce_p = core.Primitive("nvrar_allreduce")
allreduce_p.def_effectful_abstract_eval(_abstract_eval)
ad.deflinear2(allreduce_p, _transpose)
batching.primitive_batchers[allreduce_p] = _batch
mlir.register_lowering(allreduce_p, _lowering)
mlir.register_lowering(allreduce_p, _cuda_lowering, platform="cuda")


def _normalize_axes(axis_name) -> tuple:
    axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
        axis_name,)
    for name in axes:
        try:
            lax.axis_size(name)
        except NameError:
            raise NameError(
                f"axis name {name!r} is not bound: call jax_nvrar.psum "
                "inside jax.shard_map (or another transformation) that maps "
                "an axis of that name") from None
    return axes


def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        return _config.get_choice("JAX_NVRAR_BACKEND", _config.BACKENDS)
    if backend not in _config.BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of "
            f"{', '.join(map(repr, _config.BACKENDS))}")
    return backend


def _resolve_node_size(node_size: int | None, axis_size: int,
                       backend: str) -> int | None:
    """Devices per node for the NVRAR backends; None where the environment's
    node size does not fit this axis and backend="auto" may use XLA."""
    if node_size is not None:
        return _schedule.make_layout(axis_size, node_size).node_size
    node_size = _config.get_number("JAX_NVRAR_NODE_SIZE", minimum=1)
    if node_size is None:
        physical = _runtime.node_size()
        return math.gcd(physical, axis_size) if physical else axis_size
    if backend == "auto" and axis_size % node_size:
        return None  # a global hint for other axes; this one runs on XLA
    try:
        return _schedule.make_layout(axis_size, node_size).node_size
    except ValueError as error:
        raise ValueError(f"JAX_NVRAR_NODE_SIZE={node_size}: {error}") from None


def _mesh_axes() -> frozenset:
    """Axis names of the enclosing shard_map mesh (not vmap's names)."""
    return frozenset(jax.sharding.get_abstract_mesh().axis_names)


def _check_leaf(leaf):
    dtype = jnp.result_type(leaf)
    if not (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_):
        raise TypeError(
            f"jax_nvrar.psum sums numeric arrays; got dtype {dtype}")
    return dtype


def _choose(backend: str, dtype, nbytes: int, axes: tuple,
            node_size: int | None, axis_size: int) -> str:
    """The backend one leaf runs on. Trace-time only."""
    on_mesh = set(axes) <= _mesh_axes()
    if backend == "nvshmem":
        _runtime.require()
        if np.dtype(dtype) not in KERNEL_DTYPES:
            raise TypeError(
                f"backend='nvshmem' sums float32, bfloat16 and float16; got "
                f"{dtype}. Use backend='auto' or 'xla' for other dtypes")
        if not on_mesh:
            raise ValueError(
                f"backend='nvshmem' reduces over shard_map mesh axes; {axes} "
                "includes an axis of another transformation (e.g. vmap). "
                "Use backend='xla'")
        return "nvshmem"
    if backend == "reference" and not on_mesh:
        return "xla"  # a vmap axis: no devices to permute between
    if backend != "auto":
        return backend
    if node_size is None:
        return "xla"
    limit = _config.get_number("JAX_NVRAR_AUTO_MAX_KB" if node_size == axis_size
                               else "JAX_NVRAR_AUTO_MAX_KB_NODES") << 10
    if (_runtime.is_available() and on_mesh and nbytes <= limit
            and np.dtype(dtype) in KERNEL_DTYPES):
        return "nvshmem"
    return "xla"


def _piece_elements(impl: str, axes: tuple, node_size: int,
                    itemsize: int) -> int | None:
    """Most elements one kernel launch reduces, None for no limit."""
    if impl != "nvshmem":
        return None
    num_nodes = math.prod(lax.axis_size(a) for a in axes) // node_size
    return _runtime.max_message_bytes(node_size, num_nodes) // itemsize


def _bind(leaf, axes, node_size, impl, algo):
    if jax_config._check_vma.value:
        missing = tuple(a for a in axes if a not in core.typeof(leaf).mat.varying)
        if missing:  # psum of an invariant value: sum of axis_size copies
            leaf = lax.pcast(leaf, missing, to="varying")
    params = dict(axes=axes, node_size=node_size, impl=impl, algo=algo)
    piece = _piece_elements(impl, axes, node_size, leaf.dtype.itemsize)
    if piece is None or leaf.size <= piece:
        return allreduce_p.bind(leaf, **params)
    # A message larger than a workspace slot holds is reduced in pieces.
    flat = leaf.reshape(-1)
    parts = [allreduce_p.bind(flat[i:i + piece], **params)
             for i in range(0, flat.size, piece)]
    return jnp.concatenate(parts).reshape(leaf.shape)


def psum(x, axis_name, *, axis_index_groups=None, backend: str | None = None,
         node_size: int | None = None):
    """Compute an all-reduce sum on ``x`` over the mapped axis ``axis_name``.

    A drop-in for :func:`jax.lax.psum` inside :func:`jax.shard_map`: same
    arguments, same result, same output type (also under ``check_vma=True``),
    differentiable and batchable like psum. On GPUs it runs the NVRAR
    hierarchical all-reduce on NVSHMEM: reduce-scatter inside each node,
    recursive doubling across nodes, all-gather inside each node.

    If ``x`` is a pytree then the result is equivalent to mapping this
    function to each leaf in the tree.

    Args:
      x: array(s) with a mapped axis named ``axis_name``. float32, bfloat16
        and float16 run on the kernel; other numeric dtypes (and booleans,
        summed as int32) on XLA.
      axis_name: name of the mapped axis to reduce over, or a tuple of names.
      axis_index_groups: as for :func:`jax.lax.psum`; only XLA implements
        it, so it needs ``backend`` "auto" or "xla".
      backend: ``"auto"`` (the kernel where it is initialised and fastest for
        the message size, else XLA), ``"xla"`` (:func:`jax.lax.psum`),
        ``"reference"`` (the NVRAR schedule from ``lax.ppermute``, any
        platform) or ``"nvshmem"`` (the kernel; an error where it is not
        available). None takes ``$JAX_NVRAR_BACKEND``, default ``"auto"``.
      node_size: how many consecutive devices of the reduced axis form a
        node. None takes ``$JAX_NVRAR_NODE_SIZE``, else the GPUs per host
        known to the runtime, else the whole axis. Smaller values make
        virtual nodes (4 GPUs of one host as 2 nodes x 2).

    Returns:
      Array(s) with the same shape as ``x`` holding the sum over
      ``axis_name``. Half-precision inputs are accumulated in float32 by the
      NVRAR backends, so their last bit can differ from XLA's psum. On the
      kernel's default (Lamport) lines a float32 -0.0 (for 16-bit types: a
      -0.0 at the odd index of a +0.0/-0.0 pair), in an input or, with
      two-shot or several nodes, in a result, becomes +0.0, so a zero sum
      can come out +0.0 where psum gives -0.0. The backward pass of the
      NVRAR backends is psum's own (XLA) transpose.

    Example:
      With 4 devices:

      >>> mesh = jax.make_mesh((4,), ('tp',))
      >>> f = jax.shard_map(lambda x: jax_nvrar.psum(x, 'tp'), mesh=mesh,
      ...                   in_specs=P('tp'), out_specs=P())
      >>> x = jax.device_put(jnp.arange(4.0), jax.NamedSharding(mesh, P('tp')))
      >>> print(f(x))
      [6.]
    """
    backend = _resolve_backend(backend)
    _check_kernel_settings()
    axes = _normalize_axes(axis_name)
    if not axes:
        return x
    if axis_index_groups is not None:
        if backend not in ("auto", "xla"):
            raise ValueError(
                f"axis_index_groups is implemented by XLA's psum only; got "
                f"backend={backend!r}. Use backend='auto' or 'xla'")
        return lax.psum(x, axes, axis_index_groups=axis_index_groups)
    axis_size = math.prod(lax.axis_size(a) for a in axes)
    if backend != "xla":
        node_size = _resolve_node_size(node_size, axis_size, backend)
    elif node_size is not None:  # unused by XLA, but must fit the axis
        _schedule.make_layout(axis_size, node_size)

    def one(leaf):
        dtype = _check_leaf(leaf)
        if dtype == np.bool_:
            leaf, dtype = jnp.asarray(leaf, np.int32), np.dtype(np.int32)
        nbytes = math.prod(np.shape(leaf)) * dtype.itemsize
        impl = _choose(backend, dtype, nbytes, axes, node_size, axis_size)
        # Nothing to exchange (constants, empty arrays, one device): psum.
        if (impl == "xla" or not isinstance(leaf, core.Tracer)
                or nbytes == 0 or axis_size == 1):
            impl = "xla"
        logger.debug("psum of %d bytes of %s over %s: %s", nbytes, dtype, axes,
                     impl, extra={"route": impl, "nbytes": nbytes,
                                  "dtype": str(dtype), "axes": axes})
        if impl == "xla":
            return lax.psum(leaf, axes)
        algo = "auto" if impl == "reference" else _algo()
        return _bind(leaf, axes, node_size, impl, algo)

    return jax.tree_util.tree_map(one, x)
