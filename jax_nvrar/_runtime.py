"""The NVSHMEM runtime behind backend="nvshmem": start, state, stop.

One process drives one GPU and is one NVSHMEM PE, with PE number equal to
``jax.process_index()``. Process 0 creates the NVSHMEM unique id and shares it
through the key-value store of ``jax.distributed``; every process then hands
it to the extension, which calls ``nvshmemx_init_attr`` itself (that is what
registers the device state of the NVSHMEM device library linked into it) and
allocates the symmetric workspace once.

Memory. JAX preallocates most GPU memory when its GPU client starts, at the
first JAX operation that touches a device. ``initialize()`` therefore runs
before that: it selects the GPU through CUDA directly and never asks JAX for
devices until NVSHMEM's symmetric heap exists. Called later, it still works
while the heap fits in what JAX left free (lower
XLA_PYTHON_CLIENT_MEM_FRACTION if it does not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading

from jax_nvrar import _config

try:
    from jax_nvrar import _C
    _IMPORT_ERROR = None
except ImportError as error:  # built without CUDA, or NVSHMEM not loadable
    _C = None
    _IMPORT_ERROR = error

_UID_KEY = "jax_nvrar/nvshmem_unique_id"
# The kernel's Algo enum (csrc/allreduce.cu).
_ALGO_CODES = {"auto": 0, "oneshot_ll": 1, "twoshot_ll": 2, "oneshot": 3,
               "twoshot": 4, "oneshot_lamport": 5, "twoshot_lamport": 6}


@dataclasses.dataclass
class _State:
    pe: int
    n_pes: int
    node_pes: tuple[int, ...]
    slot_bytes: int
    slots: dict  # group layout (tuple of tuples of PEs) -> slot index
    max_slots: int
    client: object = None  # jax.distributed's key-value store client
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class _Runtime:
    """Holds the single runtime of this process (NVSHMEM allows one)."""

    state: _State | None = None
    finalized = False


def extension_error() -> str | None:
    """Why the CUDA extension is unavailable, or None when it is built."""
    if _C is None:
        if getattr(_IMPORT_ERROR, "name", None) == "jax_nvrar._C":
            return f"the CUDA extension jax_nvrar._C is not built ({_IMPORT_ERROR})"
        return (f"the CUDA extension jax_nvrar._C is built but does not load "
                f"({_IMPORT_ERROR}); NVSHMEM's host library comes with "
                "pip install -e '.[gpu]'")
    return None


def is_available() -> bool:
    """True when backend="nvshmem" can run: extension built, runtime started."""
    return _Runtime.state is not None


def require() -> _State:
    state = _Runtime.state
    if state is None:
        reason = extension_error() or "jax_nvrar.initialize() was not called"
        raise RuntimeError(
            f"backend='nvshmem' is unavailable: {reason}. Build the extension "
            "(pip install with nvcc and nvidia-nvshmem-cu13 present), call "
            "jax_nvrar.initialize() after jax.distributed.initialize(), or "
            "use backend='auto', 'xla' or 'reference'.")
    return state


def _local_gpu() -> int:
    """The CUDA ordinal this process drives, without starting JAX's client:
    the launcher's local rank (or SLURM's / Open MPI's), else the single
    device given to jax.distributed.initialize(local_device_ids=...)."""
    import jax

    for name in ("JAX_NVRAR_LOCAL_RANK", "SLURM_LOCALID",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    visible = str(jax.config.values.get("jax_cuda_visible_devices", "all"))
    if visible.isdigit():
        return int(visible)
    return _distributed_state().process_id % max(_C.device_count(), 1)


def _check_jax_may_use_a_gpu(platforms: str | None) -> None:
    """RuntimeError, before anything starts, where the kernel cannot run: no
    CUDA GPU is visible, or JAX is restricted to other platforms."""
    where = ""
    if _C.device_count() == 0:
        where = "this process sees no CUDA GPU"
    elif platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
        where = f"JAX runs on {platforms!r} only (JAX_PLATFORMS)"
    if where:
        raise RuntimeError(
            f"jax_nvrar.initialize() starts the GPU kernel's runtime, but "
            f"{where}. Without GPUs leave initialize() out: psum's backend "
            "'auto' is lax.psum there and 'reference' runs the NVRAR "
            "schedule in JAX")


def _distributed_state():
    """jax.distributed's state. jax.process_index() would start the GPU
    client (and its preallocation), so it is not used before NVSHMEM runs."""
    from jax._src import distributed

    state = distributed.global_state
    if state.client is None:
        raise RuntimeError(
            "jax_nvrar.initialize() needs jax.distributed.initialize() first "
            "(or start the program with python -m jax_nvrar.launch)")
    return state


def _share_unique_id(client, process_id: int, timeout_ms: int) -> bytes:
    if process_id == 0:
        uid = _C.get_unique_id()
        client.key_value_set_bytes(_UID_KEY, uid)
        return uid
    return client.blocking_key_value_get_bytes(_UID_KEY, timeout_ms)


#: Settings that every process must share: the workspace layout (symmetric
#: allocations must match) and what psum decides at trace time (ranks that
#: lower different variants or routes would wait for each other forever).
_SHARED_VARIABLES = ("JAX_NVRAR_BACKEND", "JAX_NVRAR_NODE_SIZE",
                     "JAX_NVRAR_ALGO", "JAX_NVRAR_AUTO_MAX_KB",
                     "JAX_NVRAR_AUTO_MAX_KB_NODES", "JAX_NVRAR_FAULT_INJECT",
                     "JAX_NVRAR_INTER_NODE",
                     "JAX_NVRAR_TUNING", "JAX_NVRAR_BLOCKS")


def _shared_settings(workspace_mb: int, slots: int, timeout_s: float) -> dict:
    """What every process must agree on, as JSON-able values: arguments,
    the trace-time variables, and the variant table's contents (two files
    of one name can differ)."""
    from jax_nvrar import _tuning

    settings = {"workspace_mb": workspace_mb, "slots": slots,
                "timeout_s": timeout_s}
    settings.update({name: _config.get(name) for name in _SHARED_VARIABLES})
    settings["variant table"] = hashlib.sha256(
        repr(_tuning.table_entries()).encode()).hexdigest()[:16]
    return settings


def _differences(mine: dict, theirs: dict, me: int, other: int) -> list[str]:
    return [f"{name}: {mine.get(name)!r} in process {me}, "
            f"{theirs.get(name)!r} in process {other}"
            for name in sorted(set(mine) | set(theirs))
            if mine.get(name) != theirs.get(name)]


def _agree_on_settings(client, process_id: int, n_processes: int,
                       settings: dict, timeout_ms: int) -> None:
    """Every process publishes its settings in the key-value store; process 0
    compares everyone's with its own and publishes a verdict; every process
    raises the verdict's message where any differ, naming the settings,
    the values and the processes."""
    key = "jax_nvrar/settings/{}"
    verdict_key = "jax_nvrar/settings/verdict"
    client.key_value_set(key.format(process_id), json.dumps(settings))
    if process_id == 0:
        problems = []
        for other in range(1, n_processes):
            theirs = json.loads(client.blocking_key_value_get(
                key.format(other), timeout_ms))
            problems += _differences(settings, theirs, 0, other)
        verdict = "; ".join(problems)
        client.key_value_set(verdict_key, verdict or "ok")
    else:
        verdict = client.blocking_key_value_get(verdict_key, timeout_ms)
        verdict = "" if verdict == "ok" else verdict
    if verdict:
        raise RuntimeError(
            f"jax_nvrar: processes disagree about {verdict}. Every process "
            "must use the same settings (the launcher passes its environment "
            "to all of them)")


def _problems_anywhere(client, process_id: int, n_processes: int,
                       problem: str, topic: str, timeout_ms: int) -> str:
    """Every process publishes its problem ("" for none) under ``topic`` and
    reads everyone's: the same verdict in every process ("" when none has
    a problem), so all can act on it together (e.g. a collective finalize)."""
    key = f"jax_nvrar/{topic}/{{}}"
    client.key_value_set(key.format(process_id), problem or "ok")
    problems = []
    for other in range(n_processes):
        value = client.blocking_key_value_get(key.format(other), timeout_ms)
        if value != "ok":
            problems.append(f"process {other}: {value}")
    return "; ".join(problems)


def initialize(workspace_mb: int | None = None, *, slots: int | None = None,
               timeout_s: float | None = None) -> None:
    """Starts NVSHMEM for this process and allocates the symmetric workspace.

    Call after ``jax.distributed.initialize()`` (the launcher does that) and
    before the first JAX operation, once per process. One process per GPU.
    Every process must pass the same arguments and have the same
    ``JAX_NVRAR_*`` settings; a difference raises RuntimeError before
    NVSHMEM starts.

    Args:
      workspace_mb: symmetric workspace per communicator slot in MiB
        (default ``$JAX_NVRAR_WORKSPACE_MB``, 128). A message larger than a
        slot holds is reduced in pieces.
      slots: how many distinct reduction-group layouts may be used
        (default ``$JAX_NVRAR_SLOTS``, 4).
      timeout_s: seconds before a kernel spin-wait reports and traps
        (default ``$JAX_NVRAR_TIMEOUT_S``, 120).
    """
    if _Runtime.state is not None:
        raise RuntimeError("jax_nvrar.initialize() was already called")
    if _Runtime.finalized:
        # The unique id's key in the store and NVSHMEM itself are one-shot.
        raise RuntimeError(
            "jax_nvrar.initialize() after finalize() is not supported; "
            "start a new process")
    if _C is None:
        raise RuntimeError(extension_error())
    import jax

    _check_jax_may_use_a_gpu(jax.config.jax_platforms)
    if workspace_mb is None:
        workspace_mb = _config.get_number("JAX_NVRAR_WORKSPACE_MB", minimum=1)
    if slots is None:
        slots = _config.get_number("JAX_NVRAR_SLOTS", minimum=1)
    if timeout_s is None:
        timeout_s = _config.get_number("JAX_NVRAR_TIMEOUT_S", float)
    if workspace_mb < 1 or slots < 1 or timeout_s <= 0:
        raise ValueError(
            f"need workspace_mb >= 1, slots >= 1, timeout_s > 0; got "
            f"{workspace_mb}, {slots}, {timeout_s}")
    dist = _distributed_state()
    process_id, n_processes = dist.process_id, dist.num_processes
    timeout_ms = int(1000 * max(60, timeout_s))
    _agree_on_settings(dist.client, process_id, n_processes,
                       _shared_settings(workspace_mb, slots, timeout_s),
                       timeout_ms)
    uid = _share_unique_id(dist.client, process_id, timeout_ms=timeout_ms)
    slot_bytes = workspace_mb << 20
    gpu = _local_gpu()
    _config.keep_nvlink_multicast_off()  # NCCL starts after this, at XLA's first collective
    _C.init(uid, process_id, n_processes, gpu, slot_bytes, slots, timeout_s)
    _Runtime.state = _State(
        pe=_C.my_pe(), n_pes=_C.n_pes(), node_pes=tuple(_C.node_pes()),
        slot_bytes=slot_bytes, slots={}, max_slots=slots, client=dist.client)
    # The trait lets XLA record the kernel into command buffers (CUDA
    # graphs); without it every call is launched from the host.
    from jax._src.lib import xla_client
    for name, capsule in _C.ffi_targets().items():
        jax.ffi.register_ffi_target(
            name, capsule, platform="CUDA",
            traits=xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE)
    devices = jax.local_devices()
    problem = ""
    if len(devices) != 1:
        problem = f"it drives {len(devices)} GPUs"
    elif devices[0].local_hardware_id != gpu:
        problem = (f"NVSHMEM runs on CUDA device {gpu} (from the local rank) "
                   f"but JAX on CUDA device {devices[0].local_hardware_id}")
    # Every process learns of any process's problem: finalize() is collective.
    problems = _problems_anywhere(dist.client, process_id, n_processes,
                                  problem, "devices", timeout_ms)
    if problems:
        finalize()
        raise RuntimeError(
            f"backend='nvshmem' needs one GPU per process, the one NVSHMEM "
            f"runs on ({problems}). Start one process per GPU with python -m "
            "jax_nvrar.launch, or pass local_device_ids=[LOCAL_RANK] to "
            "jax.distributed.initialize()")


def finalize() -> None:
    """Frees the workspace and stops NVSHMEM (collective: every process
    calls it). The process cannot initialize() again."""
    if _Runtime.state is None:
        return
    _Runtime.state = None
    _Runtime.finalized = True
    _C.finalize()


def trace_rows() -> list[tuple[int, ...]]:
    """The kernel's trace ring (csrc/allreduce.cu, "tracing"): rows of
    (sequence number, entry, sends issued, last wait over, exit), global
    timer in ns, for benchmarks/kernel_trace.py. RuntimeError unless the
    extension was built with -DJAX_NVRAR_TRACE."""
    if _C is None:
        raise RuntimeError(extension_error())
    flat = _C.trace_rows()
    return [tuple(flat[i:i + 5]) for i in range(0, len(flat), 5)]


def node_size() -> int | None:
    """PEs on this process's physical node, or None before initialize()."""
    state = _Runtime.state
    return None if state is None else len(state.node_pes)


_SLOT_KEY = "jax_nvrar/slot/{}"


def _claim_slot(client, layout: str, max_slots: int) -> int | None:
    """The slot of a layout, agreed through jax.distributed's store: the
    first process to need it claims the lowest free slot for it; the others
    find the claim. The store orders the claims, so every process gets the
    same slot whatever order it lowers its programs in. None: all taken."""
    for slot in range(max_slots):
        key = _SLOT_KEY.format(slot)
        try:
            client.key_value_set(key, layout)  # refused if already claimed
            return slot
        except RuntimeError as error:  # jax.errors.JaxRuntimeError
            if "ALREADY_EXISTS" not in str(error):
                raise
        if client.key_value_try_get(key) == layout:
            return slot
    return None


def slot_for(groups: tuple[tuple[int, ...], ...]) -> int:
    """The workspace slot of a reduction-group layout: the same in every
    process (_claim_slot). Layouts of one slot are disjoint groups of PEs,
    so each group's sequence numbers advance only with its own calls.
    """
    state = require()
    with state.lock:
        if groups not in state.slots:
            layout = hashlib.sha256(repr(groups).encode()).hexdigest()
            slot = (_claim_slot(state.client, layout, state.max_slots)
                    if state.client is not None else
                    len(state.slots) if len(state.slots) < state.max_slots
                    else None)
            if slot is None:
                raise RuntimeError(
                    f"jax_nvrar uses {state.max_slots} reduction-group "
                    f"layouts already ({list(state.slots)} in this process; "
                    "each distinct set of reduced mesh axes is one); raise "
                    "JAX_NVRAR_SLOTS or slots= in initialize()")
            state.slots[groups] = slot
        return state.slots[groups]


def max_message_bytes(node_size: int, num_nodes: int) -> int:
    """Largest message one kernel launch reduces for this group layout."""
    return _C.max_message_bytes(require().slot_bytes, node_size, num_nodes)


def algo_code(algo: str) -> int:
    return _ALGO_CODES[algo]
