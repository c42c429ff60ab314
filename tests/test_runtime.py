"""The runtime's checks that run before NVSHMEM starts (CPU)."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from jax_nvrar import _config, _runtime


class _Store:
    """The part of jax.distributed's key-value client that the runtime uses,
    shared by the simulated processes of one test."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value):
        assert key not in self.values, f"{key} written twice"
        self.values[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        if key not in self.values:
            raise TimeoutError(f"{key} not set within {timeout_ms} ms")
        return self.values[key]


def _settings(**changes):
    return dict(_runtime._shared_settings(128, 4, 120.0), **changes)


def _agree(per_process):
    """Runs the check in every process as if all ran at once: process 0
    finds the others' settings in the store, the others find its verdict.
    -> {process: error text or None}"""
    def run(store, pid):
        try:
            _runtime._agree_on_settings(store, pid, len(per_process),
                                        per_process[pid], 1000)
        except RuntimeError as error:
            return str(error)
        return None

    first = _Store()
    first.values = {f"jax_nvrar/settings/{pid}": json.dumps(settings)
                    for pid, settings in enumerate(per_process) if pid}
    errors = {0: run(first, 0)}
    for pid in range(1, len(per_process)):
        store = _Store()
        store.values = {"jax_nvrar/settings/verdict":
                        first.values["jax_nvrar/settings/verdict"]}
        errors[pid] = run(store, pid)
    return errors


def test_every_shared_variable_is_a_known_setting():
    assert set(_runtime._SHARED_VARIABLES) <= set(_config.VARIABLES)
    assert "JAX_NVRAR_ALGO" in _runtime._SHARED_VARIABLES


def test_equal_settings_pass():
    assert _agree([_settings()] * 4) == {0: None, 1: None, 2: None, 3: None}


def test_every_process_names_the_differing_one():
    # Not only the odd one out: every process raises, so none waits for the
    # NVSHMEM unique id until its timeout.
    per_process = [_settings()] * 4
    per_process[2] = _settings(JAX_NVRAR_ALGO="oneshot_ll")
    errors = _agree(per_process)
    for pid in range(4):
        assert ("disagree about JAX_NVRAR_ALGO: 'auto' in process 0, "
                "'oneshot_ll' in process 2") in errors[pid]


def test_workspace_size_must_match():
    errors = _agree([_settings(), _settings(workspace_mb=64)])
    assert "disagree about workspace_mb: 128 in process 0, 64 in process 1" \
        in errors[1]


def test_variant_tables_are_compared_by_contents(monkeypatch, tmp_path):
    # Same variable, different file contents: the table's digest differs.
    from jax_nvrar import _tuning
    path = tmp_path / "table.json"
    mine = _settings()
    path.write_text(json.dumps({"schema": _tuning.SCHEMA, "entries": [
        {"node_size": 4, "size": 4096, "times_us": {"oneshot_ll": 1.0}}]}))
    monkeypatch.setenv("JAX_NVRAR_TUNING", str(path))
    theirs = dict(_runtime._shared_settings(128, 4, 120.0),
                  JAX_NVRAR_TUNING=mine["JAX_NVRAR_TUNING"])
    assert theirs["variant table"] != mine["variant table"]
    assert "variant table" in _agree([mine, theirs])[0]


@pytest.mark.parametrize("error, message", [
    (ModuleNotFoundError("No module named 'jax_nvrar._C'", name="jax_nvrar._C"),
     "jax_nvrar._C is not built"),
    (ImportError("libnvshmem_host.so.3: cannot open shared object file"),
     "jax_nvrar._C is built but does not load (libnvshmem_host.so.3"),
])
def test_initialize_without_the_extension_says_why(monkeypatch, error, message):
    monkeypatch.setattr(_runtime, "_C", None)
    monkeypatch.setattr(_runtime, "_IMPORT_ERROR", error)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _runtime.initialize()


class _FakeExtension:
    def __init__(self, gpus):
        self.gpus = gpus

    def device_count(self):
        return self.gpus


@pytest.mark.parametrize("gpus, message", [
    (0, "this process sees no CUDA GPU"),
    (1, "JAX runs on 'cpu' only (JAX_PLATFORMS)"),  # the tests' JAX_PLATFORMS
])
def test_initialize_without_a_gpu_says_so(monkeypatch, gpus, message):
    monkeypatch.setattr(_runtime, "_C", _FakeExtension(gpus))
    with pytest.raises(RuntimeError, match=re.escape(
            f"{message}. Without GPUs leave initialize() out")):
        _runtime.initialize()
    assert _runtime._Runtime.state is None


@pytest.mark.parametrize("platforms", [None, "", "cuda", "cuda,cpu", "gpu"])
def test_gpu_platforms_pass_the_check(monkeypatch, platforms):
    monkeypatch.setattr(_runtime, "_C", _FakeExtension(2))
    _runtime._check_jax_may_use_a_gpu(platforms)


def test_override_sets_and_restores_variables(monkeypatch):
    monkeypatch.setenv("JAX_NVRAR_ALGO", "twoshot_ll")
    monkeypatch.delenv("JAX_NVRAR_FAULT_INJECT", raising=False)
    with _config.override(JAX_NVRAR_ALGO=None, JAX_NVRAR_FAULT_INJECT="1"):
        assert _config.get("JAX_NVRAR_ALGO") == "auto"  # unset: the default
        assert _config.get("JAX_NVRAR_FAULT_INJECT") == "1"
    assert _config.get("JAX_NVRAR_ALGO") == "twoshot_ll"
    assert "JAX_NVRAR_FAULT_INJECT" not in os.environ
    with pytest.raises(KeyError, match="JAX_NVRAR_NOPE"):
        with _config.override(JAX_NVRAR_NOPE="1"):
            pass


def _slots_in_lowering_order(client, order, max_slots=4):
    """slot_for in a simulated process that lowers the layouts in `order`."""
    state = _runtime._State(pe=0, n_pes=4, node_pes=(0, 1, 2, 3),
                            slot_bytes=1 << 20, slots={},
                            max_slots=max_slots, client=client)
    old, _runtime._Runtime.state = _runtime._Runtime.state, state
    try:
        return {layout: _runtime.slot_for(layout) for layout in order}
    finally:
        _runtime._Runtime.state = old


TP = ((0, 1), (2, 3))   # 'tp' of a 2x2 ('dp', 'tp') mesh
DP = ((0, 2), (1, 3))   # 'dp'
ALL = ((0, 1, 2, 3),)


def test_slots_agree_whatever_order_processes_lower_in():
    # The real store of jax.distributed, in a fresh process (it starts once
    # per process): two simulated processes share it.
    script = f"""
import jax
jax.distributed.initialize("localhost:{_free_port()}", num_processes=1,
                           process_id=0)
from jax._src import distributed
import test_runtime as t
client = distributed.global_state.client
a = t._slots_in_lowering_order(client, [t.TP, t.DP, t.ALL])
b = t._slots_in_lowering_order(client, [t.ALL, t.DP, t.TP])
assert a == b == {{t.TP: 0, t.DP: 1, t.ALL: 2}}, (a, b)
try:
    t._slots_in_lowering_order(client, [((0, 3), (1, 2))], max_slots=3)
except RuntimeError as error:
    assert "raise JAX_NVRAR_SLOTS" in str(error), error
else:
    raise AssertionError("a fourth layout got one of three slots")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_a_problem_in_one_process_reaches_every_process():
    # Each simulated process finds the others' entries already published
    # (as if all ran at once) and reads the same verdict.
    published = {0: "ok", 1: "NVSHMEM runs on CUDA device 1 but JAX on CUDA device 0", 2: "ok"}
    verdicts = []
    for pid in range(3):
        store = _Store()
        store.values = {f"jax_nvrar/devices/{other}": value
                        for other, value in published.items() if other != pid}
        problem = "" if published[pid] == "ok" else published[pid]
        verdicts.append(_runtime._problems_anywhere(store, pid, 3, problem, "devices", 1000))
    assert verdicts == ["process 1: NVSHMEM runs on CUDA device 1 but JAX on CUDA device 0"] * 3
    store = _Store()
    store.values = {"jax_nvrar/devices/1": "ok"}
    assert _runtime._problems_anywhere(store, 0, 2, "", "devices", 1000) == ""


def test_trace_rows_says_how_to_get_a_trace(monkeypatch):
    # Built without -DJAX_NVRAR_TRACE (the default), or without the extension:
    # either way an error that says what is missing, not an empty trace.
    with pytest.raises(RuntimeError, match="JAX_NVRAR_TRACE|not built"):
        _runtime.trace_rows()
    monkeypatch.setattr(_runtime, "_C", None)
    monkeypatch.setattr(_runtime, "_IMPORT_ERROR", ModuleNotFoundError(name="jax_nvrar._C"))
    with pytest.raises(RuntimeError, match="not built"):
        _runtime.trace_rows()
