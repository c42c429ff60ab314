"""Backend "nvshmem4py": NVSHMEM's own on-stream sum reduction, as a baseline.

``nvshmemx_<type>_sum_reduce_on_stream`` over NVSHMEM_TEAM_WORLD, called
through nvshmem4py's bindings (``nvshmem.bindings``, the layer under
``nvshmem.core.reduce``) on two symmetric buffers from
``nvshmem.core.buffer``. It runs in its own group of processes, where
jax_nvrar has not started NVSHMEM (one NVSHMEM runtime per process), and
with JAX's preallocation off so the symmetric heap fits beside JAX.

Measured like the JAX backends: inputs from ``allreduce.host_input``, the
first call checked against the exact sum, then ``calls`` reductions enqueued
back to back on one stream (src -> dst each time, so values stay exact and
the last result is checked too), timed on the host to stream completion.
Anything missing or failing is reported as the backend's skip reason; this
baseline never stops the benchmark.
"""

from __future__ import annotations

import time

import numpy as np

import _harness as H
from _allreduce_cases import (chain_modulus, default_steps, expected_sum,
                              host_input)

_NVSHMEM_TYPES = {"bfloat16": "bfloat16", "float16": "half",
                  "float32": "float"}
_MAX_BYTES = 1 << 30


class _State:
    """The started runtime (module state of this process's NVSHMEM PE)."""

    core = None
    bindings = None
    driver = None
    device = None
    stream = None
    buffers: dict = {}


def start():
    """Starts NVSHMEM through nvshmem4py. Returns (runner class, None) or
    (None, reason). Collective: every process of the group calls it."""
    try:
        import jax
        import nvshmem.bindings as bindings
        import nvshmem.core as core
        from jax.experimental import multihost_utils
        try:
            from cuda.core.experimental import Device
        except ImportError:
            from cuda.core import Device
        from cuda.bindings import driver
    except ImportError as exc:
        return None, f"nvshmem4py not usable: {exc}"
    try:
        device = Device(jax.local_devices()[0].local_hardware_id)
        device.set_current()
        rank, nranks = jax.process_index(), jax.process_count()
        uid = core.get_unique_id(empty=(rank != 0))
        raw = uid._data.view(np.int8)
        raw[:] = multihost_utils.broadcast_one_to_all(raw.copy())
        core.init(device=device, uid=uid, rank=rank, nranks=nranks,
                  initializer_method="uid")
        _State.core, _State.bindings, _State.driver = core, bindings, driver
        _State.device, _State.stream = device, device.create_stream()
    except Exception as exc:  # reported as the skip reason
        return None, f"nvshmem4py init failed: {type(exc).__name__}: {exc}"
    return Nvshmem4pyCase, None


def stop() -> None:
    core = _State.core
    if core is None:
        return
    for buf in _State.buffers.values():
        try:
            core.free(buf)
        except Exception:  # freeing at exit; the runtime ends next anyway
            pass
    _State.buffers = {}
    core.finalize()
    _State.core = None


def _buffer(name: str, nbytes: int):
    """A symmetric buffer of at least nbytes, grown by reallocation. Every
    PE asks for the same sizes in the same order (symmetric allocation)."""
    buf = _State.buffers.get(name)
    if buf is None or buf.size < nbytes:
        if buf is not None:
            _State.core.free(buf)
        buf = _State.core.buffer(max(nbytes, 1 << 20))
        _State.buffers[name] = buf
    return buf


def _check(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver call failed: {err}")


class Nvshmem4pyCase:
    """Same contract as allreduce.JaxCase: run() -> (wrong per run,
    seconds per call per timed run, extra fields)."""

    def __init__(self, series, point, args):
        self.series, self.point, self.args = series, point, args
        self.n = series.layout.n
        self.m = chain_modulus(point.dtype, self.n)
        self.calls = 1 + (args.steps or default_steps(
            point.nbytes, args.target_ms, args.unroll, cpu=False))

    def run(self):
        import jax

        point, nbytes = self.point, self.point.nbytes
        if nbytes > _MAX_BYTES:
            raise ValueError(f"{nbytes} bytes exceeds the {_MAX_BYTES} cap")
        reduce = getattr(_State.bindings,
                         f"{_NVSHMEM_TYPES[point.dtype]}_sum_reduce_on_stream")
        src, dst = _buffer("src", nbytes), _buffer("dst", nbytes)
        src_ptr, dst_ptr = int(src.handle), int(dst.handle)
        stream = _State.stream
        team = _State.core.Teams.TEAM_WORLD
        host = np.ascontiguousarray(host_input(point, jax.process_index(),
                                               self.m))
        _check(_State.driver.cuMemcpyHtoD(src_ptr, host.ctypes.data, nbytes))
        expected = expected_sum(point, self.n, self.m).reshape(-1)
        out = np.empty_like(host)

        def wrong_now() -> int:
            stream.sync()
            _check(_State.driver.cuMemcpyDtoH(out.ctypes.data, dst_ptr,
                                              nbytes))
            return int(np.count_nonzero(
                out.reshape(-1).astype(np.float64) != expected))

        wrong, times = [], []
        for i in range(self.args.warmup + self.args.repeats):
            _check(_State.driver.cuMemsetD8(dst_ptr, 0, nbytes))
            stream.sync()
            H.barrier("nvshmem4py")
            start = time.perf_counter()
            for _ in range(self.calls):
                status = reduce(team, dst_ptr, src_ptr, point.count,
                                int(stream.handle))
                if status:
                    raise RuntimeError(f"reduce_on_stream returned {status}")
            stream.sync()
            elapsed = time.perf_counter() - start
            wrong.append(wrong_now())
            if i >= self.args.warmup:
                times.append(elapsed / self.calls)
        return wrong, times, {"steps": self.calls - 1, "calls": self.calls,
                              "chain_checked": False, "modulus": self.m,
                              "compile_s": 0.0}

