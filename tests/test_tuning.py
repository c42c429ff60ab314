"""The variant table behind backend="auto" (jax_nvrar/_tuning.py) and
benchmarks/tune.py, which writes it (CPU)."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_nvrar
from jax_nvrar import _tuning

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import tune  # noqa: E402


def rows(*entries):
    return tuple((g, size, tuple(sorted(times.items()))) for g, size, times in entries)


def test_rule_interpolates_between_measured_sizes():
    # one-shot is cheaper small, two-shot large; the crossover lies between
    # the measured sizes and the rule finds it by log-log interpolation.
    entries = rows((4, 1 << 10, {"oneshot_lamport": 5.0, "twoshot_lamport": 10.0}),
                   (4, 1 << 20, {"oneshot_lamport": 40.0, "twoshot_lamport": 20.0}))
    assert _tuning.pick(entries, 1 << 10, 4) == "oneshot_lamport"
    assert _tuning.pick(entries, 1 << 14, 4) == "oneshot_lamport"
    assert _tuning.pick(entries, 1 << 18, 4) == "twoshot_lamport"
    assert _tuning.pick(entries, 1 << 26, 4) == "twoshot_lamport"  # beyond: nearest
    assert _tuning.pick(entries, 1, 4) == "oneshot_lamport"
    assert _tuning.pick((), 1 << 10, 4) is None


def test_rule_takes_the_nearest_node_size():
    entries = rows((2, 4096, {"oneshot_ll": 1.0, "oneshot_lamport": 2.0}),
                   (8, 4096, {"oneshot_ll": 2.0, "oneshot_lamport": 1.0}))
    assert _tuning.pick(entries, 4096, 2) == "oneshot_ll"
    assert _tuning.pick(entries, 4096, 3) == "oneshot_ll"  # log2 distance
    assert _tuning.pick(entries, 4096, 6) == "oneshot_lamport"


def table(**entry):
    base = {"node_size": 4, "size": 4096, "times_us": {"oneshot_lamport": 8.0}}
    return {"schema": _tuning.SCHEMA, "entries": [dict(base, **entry)]}


@pytest.mark.parametrize("bad,match", [
    ({"schema": "other"}, "not a jax_nvrar tuning table"),
    ({"schema": _tuning.SCHEMA, "entries": []}, "no entries"),
    (table(times_us={"oneshot": 1.0}), "needs times_us"),
    (table(times_us={"oneshot_ll": 0}), "not positive"),
    (table(size=0), "positive integer"),
])
def test_malformed_tables_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        _tuning.check_table(bad, "t.json")


def test_shipped_table_is_valid_and_measured():
    shipped = json.loads(_tuning.SHIPPED.read_text())
    entries = _tuning.check_table(shipped, "shipped")
    assert "H100" in shipped["device"]
    assert {e["node_size"] for e in entries} == {2, 4}
    for nbytes in (4, 4096, 300_000, 1 << 20, 64 << 20):
        variant, blocks = _tuning.variant_for(nbytes, 4)
        assert variant in _tuning.CANDIDATES and 0 <= blocks <= _tuning.MAX_BLOCKS


def _lower_variant(monkeypatch, nbytes_per_device, node_size=4):
    """The kernel's (algo, blocks) attributes for psum(backend='nvshmem')
    lowered for CUDA on the CPU, with a stand-in runtime."""
    from jax_nvrar import _psum, _runtime
    monkeypatch.setattr(_runtime, "require", lambda: type("R", (), {"slot_bytes": 128 << 20}))
    monkeypatch.setattr(_runtime, "slot_for", lambda table: 0)
    monkeypatch.setattr(_runtime, "max_message_bytes", lambda g, n: 1 << 30)
    monkeypatch.setattr(_psum, "_pe_of", lambda device: device.id)
    mesh = jax.sharding.Mesh(jax.devices()[:4], ("tp",))
    f = jax.jit(jax.shard_map(lambda v: jax_nvrar.psum(v, "tp", backend="nvshmem",
                                                       node_size=node_size),
                              mesh=mesh, in_specs=P("tp"), out_specs=P("tp"),
                              check_vma=False))
    x = jax.ShapeDtypeStruct((4, nbytes_per_device // 2), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("tp")))
    text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    call = next(line for line in text.splitlines() if "@nvrar_allreduce" in line)
    return tuple(int(call.split(f"{name} = ")[1].split(" ")[0])
                 for name in ("algo", "blocks"))


def test_psum_runs_the_variant_the_table_names(monkeypatch, tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"schema": _tuning.SCHEMA, "entries": [
        {"node_size": 4, "size": 4096, "times_us": {"twoshot_ll": 1.0, "oneshot_lamport": 2.0}},
        {"node_size": 4, "size": 1 << 20, "times_us": {"twoshot_ll": 9.0, "oneshot_lamport": 2.0}},
    ]}))
    monkeypatch.setenv("JAX_NVRAR_TUNING", str(path))
    assert _lower_variant(monkeypatch, 4096) == (2, 0)     # twoshot_ll, rule
    assert _lower_variant(monkeypatch, 1 << 20) == (5, 0)  # oneshot_lamport


def test_table_settings_carry_block_counts(monkeypatch, tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"schema": _tuning.SCHEMA, "entries": [
        {"node_size": 4, "size": 4096,
         "times_us": {"oneshot_lamport": 3.0, "oneshot_lamport/16": 2.0,
                      "twoshot_lamport/64": 4.0}},
        {"node_size": 4, "size": 1 << 20,
         "times_us": {"oneshot_lamport": 30.0, "oneshot_lamport/16": 20.0,
                      "twoshot_lamport/64": 9.0}},
    ]}))
    monkeypatch.setenv("JAX_NVRAR_TUNING", str(path))
    assert _lower_variant(monkeypatch, 4096) == (5, 16)
    assert _lower_variant(monkeypatch, 1 << 20) == (6, 64)
    # Two nodes of two: the hierarchical path, which the counts were not measured on.
    assert _lower_variant(monkeypatch, 1 << 20, node_size=2)[1] == 0
    # $JAX_NVRAR_BLOCKS overrides the table's count, not its variant.
    monkeypatch.setenv("JAX_NVRAR_BLOCKS", "8")
    assert _lower_variant(monkeypatch, 1 << 20) == (6, 8)
    assert _lower_variant(monkeypatch, 1 << 20, node_size=2)[1] == 8
    monkeypatch.setenv("JAX_NVRAR_BLOCKS", "129")
    with pytest.raises(ValueError, match="JAX_NVRAR_BLOCKS=129 exceeds"):
        _lower_variant(monkeypatch, 4096)


@pytest.mark.parametrize("setting", ["oneshot_lamport/0", "oneshot_lamport/x",
                                     "oneshot_lamport/129", "oneshot/8"])
def test_malformed_settings_are_refused(setting):
    table = {"schema": _tuning.SCHEMA, "entries": [
        {"node_size": 4, "size": 4096, "times_us": {setting: 1.0}}]}
    with pytest.raises(ValueError, match="needs times_us of variants"):
        _tuning.check_table(table, "t.json")


def test_unreadable_table_is_an_error_naming_it(monkeypatch, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    monkeypatch.setenv("JAX_NVRAR_TUNING", str(path))
    with pytest.raises(ValueError, match="JAX_NVRAR_TUNING=.*broken.json"):
        _tuning.variant_for(4096, 4)


def sweep(kind="performance"):
    """An allreduce.py-shaped payload, 4 KB - 2 MB: one-shot wins below
    about 130 KB, two-shot above."""
    results = []
    for g in (2, 4):
        for k in range(12, 22):
            size = 1 << k
            times = {"oneshot_lamport": 5 + size / 2e4, "twoshot_lamport": 10 + size / 8e4}
            for variant, us in times.items():
                results.append({"status": "ok", "wrong": 0, "base_backend": "nvshmem",
                                "nodes": 1, "node_size": g, "algo": variant,
                                "dtype": "bfloat16", "size": size, "time_us": us})
    return {"kind": kind, "results": results,
            "devices": {"4:default": {"device": {"device_kind": "Test GPU"}}},
            "env": {"command": "synthetic"}}


def test_tune_builds_the_table_and_validates_the_rule(tmp_path):
    src, out, rep = tmp_path / "s.json", tmp_path / "t.json", tmp_path / "t.md"
    src.write_text(json.dumps(sweep()))
    assert tune.main(["--from", str(src), "--out", str(out), "--report", str(rep)]) == 0
    written = json.loads(out.read_text())
    _tuning.check_table(written, "written")
    # Held out: 8 KB, 32 KB, 128 KB (at the crossover), 512 KB, 2 MB.
    assert len(written["validation"]) == 2 * 5
    assert 1.0 <= written["validation_worst_ratio"] <= 1.01
    assert "Worst held-out ratio: 1.007" in rep.read_text()


def test_tune_fails_where_the_rule_misses_a_held_out_size(tmp_path):
    # At 512 KB (held out) one-shot is made far faster than its neighbours
    # suggest: the interpolated pick (two-shot) then misses the bar.
    src, out = tmp_path / "s.json", tmp_path / "t.json"
    payload = sweep()
    for r in payload["results"]:
        if r["size"] == 1 << 19 and r["algo"] == "oneshot_lamport":
            r["time_us"] = 1.0
    src.write_text(json.dumps(payload))
    assert tune.main(["--from", str(src), "--out", str(out),
                      "--report", str(tmp_path / "t.md")]) == 1


def test_tune_refuses_times_that_are_not_measurements(tmp_path):
    src = tmp_path / "s.json"
    src.write_text(json.dumps(sweep(kind="functional")))
    with pytest.raises(SystemExit, match="not a GPU measurement"):
        tune.main(["--from", str(src), "--out", str(tmp_path / "t.json"),
                   "--report", str(tmp_path / "t.md")])


def test_fault_switch_values(monkeypatch):
    from jax_nvrar import _psum
    for value in ("0", "1", "2", "3"):
        monkeypatch.setenv("JAX_NVRAR_FAULT_INJECT", value)
        assert _psum._fault_switch() == int(value)
    monkeypatch.setenv("JAX_NVRAR_FAULT_INJECT", "4")
    with pytest.raises(ValueError, match="JAX_NVRAR_FAULT_INJECT=4 is not 0, 1, 2 or 3"):
        _psum._fault_switch()


def test_inter_node_transport_values(monkeypatch):
    from jax_nvrar import _psum
    monkeypatch.delenv("JAX_NVRAR_INTER_NODE", raising=False)
    assert _psum._inter_node_puts() is False  # default: stores where reachable
    monkeypatch.setenv("JAX_NVRAR_INTER_NODE", "put")
    assert _psum._inter_node_puts() is True
    monkeypatch.setenv("JAX_NVRAR_INTER_NODE", "puts")
    with pytest.raises(ValueError, match="JAX_NVRAR_INTER_NODE='puts' is not one of auto, put"):
        _psum._inter_node_puts()
