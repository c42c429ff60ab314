"""python -m jax_nvrar.launch on CPU: real processes, two per job, a few seconds per test.

Programs are written to tmp_path and started through the launcher exactly as a user would; the
launcher's own decisions (arguments, environment) are also checked in-process where no child is
needed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jax_nvrar import launch

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NVSHMEM_DISABLE_NVLS", "NCCL_NVLS_ENABLE", "PYTHONFAULTHANDLER")}
    # Children import jax_nvrar.launch; make that work from a checkout that is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env.update(overrides)
    return env


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _launch(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    command = [sys.executable, "-m", "jax_nvrar.launch", "--platform", "cpu",
               "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=tmp_path, env=env or _env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _rank_lines(stdout: str, marker: str) -> dict[int, str]:
    """{rank: rest of line} for lines '[rank N] <marker> ...'."""
    lines = {}
    for line in stdout.splitlines():
        head, _, rest = line.partition("] ")
        if head.startswith("[rank ") and rest.startswith(marker):
            lines[int(head.removeprefix("[rank "))] = rest.removeprefix(marker).strip()
    return lines


def test_two_processes_reduce_across_processes(tmp_path):
    _write(tmp_path, "prog.py", """
        import sys
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P

        assert jax.process_count() == 2, jax.process_count()
        assert jax.device_count() == 2 and jax.local_device_count() == 1
        rank = jax.process_index()
        mesh = jax.make_mesh((2,), ("tp",))
        local = np.full((1, 3), rank + 1.0, np.float32)  # rank 0 holds 1s, rank 1 holds 2s
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("tp")), local)
        psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "tp"), mesh=mesh,
                                     in_specs=P("tp"), out_specs=P()))
        reduced = np.asarray(psum(x).addressable_data(0)).tolist()
        total = float(jax.jit(jnp.sum)(x).addressable_data(0))
        print("RESULT", reduced, total, sys.argv[1:], flush=True)
    """)
    result = _launch(tmp_path, "prog.py", "--flag", "value")
    assert result.returncode == 0, result.stderr
    lines = _rank_lines(result.stdout, "RESULT")
    expected = "[[3.0, 3.0, 3.0]] 9.0 ['--flag', 'value']"
    assert lines == {0: expected, 1: expected}, result.stdout


def test_failing_rank_sets_exit_code_and_stops_the_others(tmp_path):
    _write(tmp_path, "prog.py", """
        import sys, time
        import jax
        if jax.process_index() == 1:
            sys.exit(3)
        time.sleep(120)  # rank 0 would wait for its peer forever
    """)
    start = time.monotonic()
    result = _launch(tmp_path, "--grace-period", "30", "prog.py")
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr
    assert "rank 1 exited with code 3" in result.stderr
    # SIGTERM alone must end rank 0: well before the 30 s grace period that would precede SIGKILL.
    assert elapsed < 25, f"took {elapsed:.1f}s"


def test_uncaught_exception_exits_1_with_traceback(tmp_path):
    _write(tmp_path, "prog.py", """
        import jax
        if jax.process_index() == 0:
            raise ValueError("deliberate")
    """)
    result = _launch(tmp_path, "prog.py")
    assert result.returncode == 1
    assert "[rank 0] ValueError: deliberate" in result.stderr


def test_child_environment_and_module_mode(tmp_path):
    _write(tmp_path, "probe.py", """
        import json, os, sys
        import jax
        names = ["NVSHMEM_DISABLE_NVLS", "NCCL_NVLS_ENABLE", "JAX_NVRAR_NUM_PROCESSES",
                 "JAX_NVRAR_PROCESS_ID", "JAX_NVRAR_LOCAL_RANK", "JAX_NVRAR_LOCAL_WORLD_SIZE",
                 "JAX_NVRAR_NODE_RANK", "JAX_NVRAR_NUM_NODES", "JAX_NVRAR_PLATFORM",
                 "PYTHONFAULTHANDLER"]
        values = {n: os.environ.get(n) for n in names}
        values["argv"] = sys.argv[1:]
        values["process_index"] = jax.process_index()
        print("ENV", json.dumps(values), flush=True)
    """)
    # The user asked for NCCL's NVLS explicitly: the launcher must not override that.
    result = _launch(tmp_path, "-m", "probe", "-x", "1", env=_env(NCCL_NVLS_ENABLE="1"))
    assert result.returncode == 0, result.stderr
    lines = _rank_lines(result.stdout, "ENV")
    assert sorted(lines) == [0, 1], result.stdout
    for rank, line in lines.items():
        assert json.loads(line) == {
            "NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "1",
            "JAX_NVRAR_NUM_PROCESSES": "2", "JAX_NVRAR_PROCESS_ID": str(rank),
            "JAX_NVRAR_LOCAL_RANK": str(rank), "JAX_NVRAR_LOCAL_WORLD_SIZE": "2",
            "JAX_NVRAR_NODE_RANK": "0", "JAX_NVRAR_NUM_NODES": "1", "JAX_NVRAR_PLATFORM": "cpu",
            "PYTHONFAULTHANDLER": "1", "argv": ["-x", "1"], "process_index": rank}


def test_a_crash_names_its_rank_and_python_stack(tmp_path):
    _write(tmp_path, "crash.py", """
        import ctypes
        import jax
        def deliberate_crash():
            if jax.process_index() == 1:
                ctypes.string_at(0)  # SIGSEGV
        deliberate_crash()
    """)
    result = _launch(tmp_path, "crash.py", env=_env())
    assert result.returncode == 128 + 11, result.stderr
    assert "[rank 1] Fatal Python error: Segmentation fault" in result.stderr, result.stderr
    assert "deliberate_crash" in result.stderr, result.stderr


def test_sigint_is_forwarded(tmp_path):
    _write(tmp_path, "prog.py", """
        import pathlib, time
        import jax
        pathlib.Path(f"ready{jax.process_index()}").touch()
        time.sleep(120)
    """)
    command = [sys.executable, "-m", "jax_nvrar.launch", "--platform", "cpu",
               "--nproc-per-node", "2", "--no-prefix", "prog.py"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "ranks never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "received SIGINT" in stderr


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "prog.py"], "needs --coordinator"),
    (["--nnodes", "2", "--node-rank", "2", "--coordinator", "h:1", "prog.py"], "must be in 0..1"),
    (["--coordinator", "localhost", "--nproc-per-node", "2", "prog.py"], "expected HOST:PORT"),
    (["--nproc-per-node", "0", "--platform", "cpu", "prog.py"], "must be at least 1"),
    (["--platform", "cpu", "prog.py"], "pass --nproc-per-node"),
    (["--nproc-per-node", "2", "missing.py"], "'missing.py' not found"),
    (["--platform", "gpu", "--nproc-per-node", "2", "prog.py"], "only 0 GPU(s) visible"),
    (["--nproc-per-node", "2"], "required: TARGET"),
    (["--platform", "tpu", "prog.py"], "invalid choice: 'tpu'"),
])
def test_bad_arguments_are_reported(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "prog.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "visible_gpu_count", lambda: 0)
    with pytest.raises(SystemExit) as exit_:
        launch.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_config_from_slurm_and_open_mpi():
    slurm = launch.DistributedConfig.from_environ({
        "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
        "SLURM_NODEID": "1"})
    assert (slurm.num_processes, slurm.process_id, slurm.local_rank, slurm.local_world_size,
            slurm.node_rank, slurm.coordinator) == (8, 5, 1, 4, 1, None)
    ompi = launch.DistributedConfig.from_environ({
        "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "JAX_NVRAR_COORDINATOR": "n0:1234"})
    assert (ompi.num_processes, ompi.process_id, ompi.local_rank, ompi.node_rank,
            ompi.num_nodes, ompi.coordinator) == (8, 6, 2, 1, 2, "n0:1234")
    assert launch.DistributedConfig.from_environ({}) is None
    with pytest.raises(ValueError, match="JAX_NVRAR_NUM_PROCESSES='x'"):
        launch.DistributedConfig.from_environ({"JAX_NVRAR_PROCESS_ID": "0",
                                               "JAX_NVRAR_NUM_PROCESSES": "x"})


@pytest.mark.parametrize("user_set", [False, True])
def test_initialize_distributed_keeps_nvlink_multicast_off(monkeypatch, user_set):
    # Under SLURM (no launcher) on GPU: set before jax.distributed starts,
    # unless the user set them.
    import jax

    for name in ("NVSHMEM_DISABLE_NVLS", "NCCL_NVLS_ENABLE"):
        if user_set:
            monkeypatch.setenv(name, "7")
        else:
            monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
                        "JAX_NVRAR_COORDINATOR": "n0:1234"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JAX_NVRAR_PROCESS_ID", raising=False)
    seen = {}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(
        kw, nvls=(os.environ.get("NVSHMEM_DISABLE_NVLS"), os.environ.get("NCCL_NVLS_ENABLE"))))
    launch.initialize_distributed("gpu")
    assert seen["local_device_ids"] == [1]
    assert seen["nvls"] == (("7", "7") if user_set else ("1", "0"))


@pytest.mark.parametrize("visible, count", [(None, 4), ("0,1", 2), ("2", 1), ("", 0), ("0,-1,1", 1)])
def test_visible_gpu_count(monkeypatch, visible, count):
    listing = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\n" for i in range(4))
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=listing, stderr=""))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert launch.visible_gpu_count() == count


@pytest.mark.parametrize("differ", [False, True])
def test_settings_are_compared_through_the_real_store(tmp_path, differ):
    # initialize() compares every process's settings through jax.distributed's
    # key-value store before NVSHMEM starts; here with the real store.
    _write(tmp_path, "agree.py", f"""
        import os
        import jax
        from jax._src import distributed
        from jax_nvrar import _config, _runtime
        pid = jax.process_index()
        if {differ} and pid == 1:
            os.environ["JAX_NVRAR_ALGO"] = "oneshot_ll"
        settings = {{name: _config.get(name) for name in _runtime._SHARED_VARIABLES}}
        try:
            _runtime._agree_on_settings(distributed.global_state.client, pid,
                                        jax.process_count(), settings, 20000)
            print("AGREE ok", flush=True)
        except RuntimeError as error:
            print("AGREE", error, flush=True)
    """)
    result = _launch(tmp_path, "agree.py", env=_env(JAX_NVRAR_ALGO="auto"))
    assert result.returncode == 0, result.stderr
    lines = _rank_lines(result.stdout, "AGREE")
    assert sorted(lines) == [0, 1], result.stdout
    for line in lines.values():
        if differ:
            assert line.startswith("jax_nvrar: processes disagree about JAX_NVRAR_ALGO: "), line
        else:
            assert line == "ok"


MODE = "--xla_gpu_command_buffer_update_mode"


@pytest.mark.parametrize("platform, jaxlib, given, expected", [
    ("gpu", "0.11.2", "", f"{MODE}=SKIP_TEMP"),
    ("gpu", "0.12.0+cuda13", "--xla_dump_to=/tmp/d", f"--xla_dump_to=/tmp/d {MODE}=SKIP_TEMP"),
    # The user's choice stands, and only the flag itself counts as naming it.
    ("gpu", "0.11.2", f"{MODE}=ALWAYS_UPDATE", f"{MODE}=ALWAYS_UPDATE"),
    ("gpu", "0.11.2", f"--xla_dump_to=/d/{MODE}", f"--xla_dump_to=/d/{MODE} {MODE}=SKIP_TEMP"),
    # Command buffers off: the mode would only swap the allocator.
    ("gpu", "0.11.2", "--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_command_buffer="),
    ("gpu", "0.11.2", "--xla_gpu_enable_command_buffer=FUSION",
     f"--xla_gpu_enable_command_buffer=FUSION {MODE}=SKIP_TEMP"),
    # Older jaxlibs (and pre-releases of 0.11.2), which may reject the flag, and CPUs get none.
    ("gpu", "0.10.2", "", ""),
    ("gpu", "0.11.2.dev20260101", "", ""),
    ("gpu", "0.11.2rc1", "", ""),
    ("gpu", "", "", ""),
    ("cpu", "0.11.2", "", ""),
])
def test_command_buffer_update_mode(monkeypatch, platform, jaxlib, given, expected):
    monkeypatch.setattr(launch, "_jaxlib_version", lambda: jaxlib)
    monkeypatch.setenv("XLA_FLAGS", given)
    job = launch._Job(nproc_per_node=1, nnodes=1, node_rank=0, coordinator="127.0.0.1:1",
                      platform=platform, command=[], prefix=True, log_dir=None, grace_period=0.0)
    assert launch._child_environ(job, 0)["XLA_FLAGS"] == expected


def test_release_order():
    assert launch._release("0.11.2") == (0, 11, 2, 1) == launch._release("0.11.2+cuda13")
    assert launch._release("0.11.2.post1") == (0, 11, 2, 1)
    assert launch._release("0.11.2rc1") < launch._release("0.11.2") < launch._release("0.11.3.dev1")
    assert launch._release("unknown") == ()


def test_free_port_is_outside_the_ephemeral_range_and_bindable():
    low, high = launch._ephemeral_ports()
    assert 0 < low <= high < 65536
    port = launch._free_port("127.0.0.1")
    assert low <= 10000 or 10000 <= port < low
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", port))  # free on every address, as the coordinator binds it


def test_help_example_is_a_valid_command():
    # The example in --help starts models.decode with arguments it takes.
    from models.decode import parse_args

    args = launch.EXAMPLE.split()
    module = args.index("-m") + 1
    assert args[module] == "models.decode"
    assert parse_args(args[module + 1:]).model == "llama3.1-8b"
    assert launch._parser().epilog.endswith(f"launch {launch.EXAMPLE}")
