"""Every environment variable jax_nvrar reads, in one place.

Each is read when it is needed (at trace time or in ``initialize``), never on
the hot path of a compiled program. README.md's table mirrors this list.
"""

from __future__ import annotations

import contextlib
import os

BACKENDS = ("auto", "xla", "reference", "nvshmem")
ALGOS = ("auto", "oneshot", "twoshot", "oneshot_ll", "twoshot_ll",
         "oneshot_lamport", "twoshot_lamport")
INTER_NODE = ("auto", "put")

#: name -> (default, meaning). Defaults are strings, as the environment holds.
VARIABLES = {
    "JAX_NVRAR_BACKEND": (
        "auto", "default backend of jax_nvrar.psum when backend=None"),
    "JAX_NVRAR_NODE_SIZE": (
        "", "devices per (virtual) node along the reduced axis; empty: from "
            "the runtime, else the whole axis is one node"),
    "JAX_NVRAR_ALGO": (
        "auto", "kernel variant: auto, oneshot, twoshot (flag lines), "
                "oneshot_ll, twoshot_ll (LL lines), oneshot_lamport or "
                "twoshot_lamport (Lamport lines); on several nodes an LL name "
                "asks for LL lines within each node, any other for Lamport "
                "lines"),
    "JAX_NVRAR_BLOCKS": (
        "0", "thread blocks per kernel launch; 0: the tuning table's (or the "
             "kernel's rule) for the message size; never more than fit on "
             "the GPU at once"),
    "JAX_NVRAR_TUNING": (
        "", "tuning table of the single-node variants (benchmarks/tune.py "
            "writes it); empty: the table shipped in the package"),
    "JAX_NVRAR_WORKSPACE_MB": (
        "128", "symmetric workspace per communicator slot, in MiB"),
    "JAX_NVRAR_SLOTS": (
        "4", "communicator slots: distinct reduction-group layouts "
             "(e.g. 'tp' and 'dp' of one mesh) a process can use"),
    "JAX_NVRAR_TIMEOUT_S": (
        "120", "seconds a kernel spin-wait may last before it reports the PE, "
               "phase and sequence number and traps (long enough for peers "
               "still loading weights before their first all-reduce)"),
    "JAX_NVRAR_INTER_NODE": (
        "auto", "how data travel between (virtual) nodes: auto (LL lines "
                "stored over NVLink where the partner is load/store "
                "reachable and the message at most 512 KiB, else NVSHMEM "
                "puts with a signal) or put (always puts; for testing and "
                "comparison)"),
    "JAX_NVRAR_FAULT_INJECT": (
        "0", "testing only: 1 makes the kernel use data without waiting for "
             "it to arrive, 2 only data from other nodes (inter-node lines "
             "and signals), so results must go wrong (the GPU suite's negative "
             "controls); 3 makes the kernel return at its first instruction, "
             "leaving the output unwritten (the cost of the call itself, "
             "benchmarks/floor.py)"),
    "JAX_NVRAR_AUTO_MAX_KB": (
        "4096", "backend='auto' uses the kernel on one node up to this "
                "message size (KiB) and XLA's psum above it (the measured "
                "crossover on 4xH100)"),
    "JAX_NVRAR_AUTO_MAX_KB_NODES": (
        "2048", "the same limit where the group spans several (virtual) "
                "nodes: the hierarchical path (on 2x2 virtual nodes of "
                "4xH100 faster than XLA's psum up to 2 MiB, the largest size "
                "measured)"),
}


#: NVLink multicast stays off (NVSHMEM's NVLS, NCCL's NVLS algorithms)
#: unless the user set these.
NVLINK_MULTICAST_OFF = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0"}


def keep_nvlink_multicast_off(environ=os.environ) -> None:
    """Sets NVLINK_MULTICAST_OFF's variables in ``environ`` where unset; in
    this process's environment it must run before NVSHMEM and NCCL start."""
    for name, value in NVLINK_MULTICAST_OFF.items():
        environ.setdefault(name, value)


def get(name: str) -> str:
    """The variable's value; unset or blank means its default."""
    default, _ = VARIABLES[name]
    return os.environ.get(name, "").strip() or default


def get_choice(name: str, choices: tuple[str, ...]) -> str:
    value = get(name)
    if value not in choices:
        raise ValueError(
            f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def get_number(name: str, kind=int, *, minimum=0, maximum=None):
    """The variable as ``kind`` (int or float), None when it has no value
    and no default; ValueError naming the variable when malformed or outside
    [minimum, maximum]."""
    value = get(name)
    if not value:
        return None
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not a{'n integer' if kind is int else ' number'}"
        ) from None
    if number < minimum:
        raise ValueError(f"{name}={number} must be >= {minimum}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name}={number} exceeds its maximum, {maximum}")
    return number


@contextlib.contextmanager
def override(**values: str | None):
    """Sets the named variables (None: unset) for what runs inside and
    restores them after: psum reads its variables at trace time, so tests
    and benchmarks trace with a variant or the fault switch this way."""
    unknown = set(values) - set(VARIABLES)
    if unknown:
        raise KeyError(f"unknown jax_nvrar variables {sorted(unknown)}")
    old = {name: os.environ.get(name) for name in values}

    def apply(settings):
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(values)
    try:
        yield
    finally:
        apply(old)
