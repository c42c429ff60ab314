"""The runtime's checks that run before NVSHMEM starts (CPU)."""

import json

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
    settings = {"workspace_mb": 128, "slots": 4, "timeout_s": 120.0}
    settings.update({name: _config.get(name)
                     for name in _runtime._SHARED_VARIABLES})
    settings.update(changes)
    return settings


def _agree(per_process):
    """Runs the check in every process as if all ran at once: the others'
    settings are in the store. -> {process: error text or None}"""
    errors = {}
    for pid in range(len(per_process)):
        store = _Store()
        store.values = {f"jax_nvrar/settings/{other}": json.dumps(settings)
                        for other, settings in enumerate(per_process)
                        if other != pid}
        try:
            _runtime._agree_on_settings(store, pid, len(per_process),
                                        per_process[pid], 1000)
            errors[pid] = None
        except RuntimeError as error:
            errors[pid] = str(error)
    return errors


def test_every_shared_variable_is_a_known_setting():
    assert set(_runtime._SHARED_VARIABLES) <= set(_config.VARIABLES)
    assert "JAX_NVRAR_ALGO" in _runtime._SHARED_VARIABLES


def test_equal_settings_pass():
    assert _agree([_settings()] * 4) == {0: None, 1: None, 2: None, 3: None}


def test_a_differing_process_is_named_with_both_values():
    per_process = [_settings()] * 4
    per_process[2] = _settings(JAX_NVRAR_ALGO="oneshot_ll")
    errors = _agree(per_process)
    assert errors[1] is None and errors[3] is None
    for pid in (0, 2):
        assert "disagree about JAX_NVRAR_ALGO" in errors[pid]
        assert "'oneshot_ll'" in errors[pid] and "'auto'" in errors[pid]
        assert "process 2" in errors[pid]


def test_workspace_size_must_match():
    errors = _agree([_settings(), _settings(workspace_mb=64)])
    assert "disagree about workspace_mb: 128 in process 0, 64 in process 1" \
        in errors[0]


def test_initialize_without_the_extension_says_why(monkeypatch):
    monkeypatch.setattr(_runtime, "_C", None)
    with pytest.raises(RuntimeError):
        _runtime.initialize()
