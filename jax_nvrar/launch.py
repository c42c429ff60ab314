"""Start one process per GPU and run a JAX program in each, in the spirit of torchrun.

    python -m jax_nvrar.launch --nproc-per-node 4 train.py --lr 3e-4
    python -m jax_nvrar.launch --nproc-per-node 4 -m models.decode --model llama3.1-8b --tp 4
    # two nodes: the same command on each, with that node's --node-rank
    python -m jax_nvrar.launch --nnodes 2 --node-rank 0 --coordinator node0:29500 train.py

Each child calls ``jax.distributed.initialize`` before the program's first line runs, so the program
is written as for one process per GPU and never calls it itself. On GPU the child owns one device
(``local_device_ids=[local_rank]``) while all stay visible, which CUDA IPC and NVSHMEM need to map
peer memory; on CPU each child has one CPU device and collectives go through gloo.

Environment of each child (the launcher's own environment is passed through):

  JAX_NVRAR_COORDINATOR       host:port of the jax.distributed coordinator (in process 0)
  JAX_NVRAR_NUM_PROCESSES     processes in the job: nnodes * nproc-per-node
  JAX_NVRAR_PROCESS_ID        this process: node_rank * nproc-per-node + local_rank
  JAX_NVRAR_LOCAL_RANK        index on this node, which is also the GPU it drives
  JAX_NVRAR_LOCAL_WORLD_SIZE  processes on this node
  JAX_NVRAR_NODE_RANK         this node
  JAX_NVRAR_NUM_NODES         nodes in the job
  JAX_NVRAR_PLATFORM          cpu or gpu
  NVSHMEM_DISABLE_NVLS=1, NCCL_NVLS_ENABLE=0
                              NVLink multicast stays off, unless the user set these variables.
  XLA_FLAGS                   on GPU with jaxlib >= 0.11.2, --xla_gpu_command_buffer_update_mode=
                              SKIP_TEMP is appended unless XLA_FLAGS names that flag or turns command
                              buffers off (--xla_gpu_enable_command_buffer=). Under XLA's default
                              (ALWAYS_UPDATE) a Llama 8B decode step re-recorded all 601 of its
                              commands at every step, 2.8-4.8 ms of the host's time on 4xH100 (one
                              logged run). With SKIP_TEMP XLA maps the temporary buffers of command
                              buffers at fixed addresses, which takes its VMM allocator for the
                              whole process (XLA logs "Overriding allocator kind to kVmm"). The one
                              cost measured so far: a 256 MiB lax.ppermute ring shift 15% slower on
                              one machine (README).
                              Name the flag (=ALWAYS_UPDATE is XLA's default) to choose otherwise.
  JAX_PLATFORMS=cpu           on the cpu platform, unless set.
  PYTHONUNBUFFERED=1          when output passes through the launcher, unless set, so that lines
                              appear as they are printed rather than when a buffer fills.
  PYTHONFAULTHANDLER=1        unless set: a process that crashes (e.g. SIGSEGV) prints its Python
                              stack, so the rank and the call that died are known.

Failure handling: the launcher exits with the first non-zero exit code of any process (128+N for a
process killed by signal N). When one process fails, the others get SIGTERM and, after
``--grace-period`` seconds, SIGKILL: a collective whose peer is gone would otherwise wait forever.
SIGINT, SIGTERM and SIGHUP sent to the launcher are forwarded to every process (a second one kills
them); the launcher then exits with 128+signal. Each child runs in its own process group, so its own
subprocesses are stopped with it, and is killed by the kernel if the launcher itself dies.

For processes started by something else (SLURM, mpirun), call ``initialize_distributed()`` at the top
of the program: it reads the variables above, or SLURM_* / OMPI_COMM_WORLD_* when they are absent.
It leaves XLA_FLAGS alone: put the command-buffer update mode in the job's XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import random
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, NoReturn

from jax_nvrar import _config

__all__ = ["DistributedConfig", "initialize_distributed", "main", "visible_gpu_count"]

_WORKER_FLAG = "--_worker"
_PLATFORMS = ("auto", "cpu", "gpu")
_UPDATE_MODE_FLAG = "--xla_gpu_command_buffer_update_mode"
_UPDATE_MODE = "SKIP_TEMP"
_UPDATE_MODE_JAXLIB = (0, 11, 2, 1)  # the first jaxlib release measured with it; older ones may
                                     # reject the flag, and XLA aborts on an unknown flag
_PR_SET_PDEATHSIG = 1


def _log(message: str) -> None:
    print(f"[jax_nvrar.launch] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Process environment (child side, and SLURM / mpirun users)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where this process sits in the job; see the module docstring for the variables behind it."""

    coordinator: str | None  # None: jax.distributed finds it (SLURM)
    num_processes: int
    process_id: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    platform: str | None  # "cpu", "gpu", or None: decide from the machine
    source: str  # "jax_nvrar", "slurm" or "ompi"

    def environ(self) -> dict[str, str]:
        """The JAX_NVRAR_* variables that describe this process."""
        values = {
            "JAX_NVRAR_NUM_PROCESSES": self.num_processes,
            "JAX_NVRAR_PROCESS_ID": self.process_id,
            "JAX_NVRAR_LOCAL_RANK": self.local_rank,
            "JAX_NVRAR_LOCAL_WORLD_SIZE": self.local_world_size,
            "JAX_NVRAR_NODE_RANK": self.node_rank,
            "JAX_NVRAR_NUM_NODES": self.num_nodes,
        }
        if self.coordinator is not None:
            values["JAX_NVRAR_COORDINATOR"] = self.coordinator
        if self.platform is not None:
            values["JAX_NVRAR_PLATFORM"] = self.platform
        return {name: str(value) for name, value in values.items()}

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistributedConfig | None:
        """Read our variables, else SLURM's, else Open MPI's; None when none describe a job."""
        env = os.environ if environ is None else environ

        def integer(name: str, default: int | None = None) -> int:
            value = env.get(name)
            if value is None:
                if default is None:
                    raise ValueError(f"{name} is not set")
                return default
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None

        coordinator = env.get("JAX_NVRAR_COORDINATOR") or None
        platform = env.get("JAX_NVRAR_PLATFORM") or None
        if platform not in (None, "cpu", "gpu"):
            raise ValueError(f"JAX_NVRAR_PLATFORM={platform!r}: expected cpu or gpu")
        if "JAX_NVRAR_PROCESS_ID" in env:
            num_processes = integer("JAX_NVRAR_NUM_PROCESSES")
            local_world_size = integer("JAX_NVRAR_LOCAL_WORLD_SIZE", num_processes)
            return cls(coordinator, num_processes, integer("JAX_NVRAR_PROCESS_ID"),
                       integer("JAX_NVRAR_LOCAL_RANK", 0), local_world_size,
                       integer("JAX_NVRAR_NODE_RANK", 0), integer("JAX_NVRAR_NUM_NODES", 1),
                       platform, "jax_nvrar")
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            num_processes = integer("SLURM_NTASKS")
            num_nodes = integer("SLURM_NNODES", 1)
            return cls(coordinator, num_processes, integer("SLURM_PROCID"),
                       integer("SLURM_LOCALID", 0), -(-num_processes // num_nodes),
                       integer("SLURM_NODEID", 0), num_nodes, platform, "slurm")
        if "OMPI_COMM_WORLD_RANK" in env:
            num_processes = integer("OMPI_COMM_WORLD_SIZE")
            local_world_size = integer("OMPI_COMM_WORLD_LOCAL_SIZE", num_processes)
            rank = integer("OMPI_COMM_WORLD_RANK")
            return cls(coordinator, num_processes, rank, integer("OMPI_COMM_WORLD_LOCAL_RANK", 0),
                       local_world_size, rank // local_world_size,
                       -(-num_processes // local_world_size), platform, "ompi")
        return None


def initialize_distributed(platform: str | None = None) -> DistributedConfig:
    """Call ``jax.distributed.initialize`` for this process, from its environment.

    The launcher's children run this before the user's program. Programs started another way (SLURM,
    mpirun) call it first thing, before any JAX computation. Calling it again is a no-op.

    Args:
      platform: "cpu" or "gpu"; None takes $JAX_NVRAR_PLATFORM, else "gpu" when a GPU is visible.

    Returns:
      The DistributedConfig that was used.
    """
    config = DistributedConfig.from_environ()
    if config is None:
        raise RuntimeError(
            "initialize_distributed() found no process environment: start the program with "
            "python -m jax_nvrar.launch, or under SLURM or mpirun (set JAX_NVRAR_COORDINATOR=host:port "
            "for mpirun)")
    if config.coordinator is None and config.source == "ompi":
        raise RuntimeError("under mpirun, set JAX_NVRAR_COORDINATOR=host:port (a free port on rank 0's "
                           "host) for jax.distributed")
    platform = platform or config.platform or ("gpu" if visible_gpu_count() else "cpu")
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"platform={platform!r}: expected 'cpu' or 'gpu'")

    import jax

    if jax.distributed.is_initialized():
        return config
    if platform == "cpu":
        # Multi-process CPU collectives (psum across processes) need a transport; gloo ships in jaxlib.
        if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=config.coordinator,
                                   num_processes=config.num_processes, process_id=config.process_id)
    else:
        _config.keep_nvlink_multicast_off()  # before NCCL and NVSHMEM start
        jax.distributed.initialize(coordinator_address=config.coordinator,
                                   num_processes=config.num_processes, process_id=config.process_id,
                                   local_device_ids=[config.local_rank])
    return config


def visible_gpu_count() -> int:
    """GPUs this process may use: none unless `nvidia-smi -L` lists some; then as many as
    CUDA_VISIBLE_DEVICES names when it is set, else all of them."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    physical = sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    if listing.returncode != 0 or physical == 0:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    count = 0
    for device in visible.split(","):
        # CUDA stops enumerating at the first invalid entry; "-1" or "" hides every GPU.
        if not device.strip() or device.strip().startswith("-"):
            break
        count += 1
    return count


# --------------------------------------------------------------------------------------------------
# Child side: initialize, then run the program as `python script.py` / `python -m module` would
# --------------------------------------------------------------------------------------------------

def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _die(code: int) -> NoReturn:
    """Exit at once, skipping atexit: jax.distributed's shutdown barrier would wait for the other
    processes, which are still running, so a failing process would otherwise not exit at all."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _worker(argv: list[str]) -> int:
    kind, target, *args = argv
    # A launcher started in the background of a shell passes SIGINT on as ignored; it forwards SIGINT
    # deliberately, so the program sees it as KeyboardInterrupt, as in the foreground.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        initialize_distributed()
        # jax.distributed installs a preemption notifier that catches SIGTERM and keeps running until
        # the program reaches a sync point. The launcher sends SIGTERM to stop a job whose peer died,
        # where waiting means hanging, so SIGTERM ends a launched process at once, as for any program.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = [target, *args]
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            # `python script.py` puts the script's directory first on sys.path, not the cwd.
            script_dir = str(Path(target).resolve().parent)
            if sys.path and sys.path[0] in ("", os.getcwd()):
                sys.path[0] = script_dir
            else:
                sys.path.insert(0, script_dir)
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
        if code:
            _die(code)
        return 0
    except KeyboardInterrupt:
        traceback.print_exc()
        _die(128 + signal.SIGINT)
    except BaseException:  # the program's own error: report it as `python script.py` would
        traceback.print_exc()
        _die(1)
    return 0


# --------------------------------------------------------------------------------------------------
# Launcher side
# --------------------------------------------------------------------------------------------------

EXAMPLE = "--nproc-per-node 4 -m models.decode --model llama3.1-8b --tp 4"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jax_nvrar.launch",
        description="Run a JAX program as one process per GPU, with jax.distributed initialized.",
        epilog=f"Example: python -m jax_nvrar.launch {EXAMPLE}")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes on this node (default: number of visible GPUs)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default: 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node, 0..nnodes-1 (default: 0)")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="jax.distributed coordinator, reachable from every node; required with "
                             "--nnodes > 1 (default: 127.0.0.1 and a free port)")
    parser.add_argument("--platform", choices=_PLATFORMS, default="auto",
                        help="gpu, cpu, or auto: gpu when a GPU is visible (default: auto)")
    parser.add_argument("--no-prefix", dest="prefix", action="store_false",
                        help="pass output through untouched instead of prefixing lines with [rank N]")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="also write each process's output to LOG_DIR/rank<N>.log")
    parser.add_argument("--grace-period", type=float, default=5.0, metavar="SECONDS",
                        help="after SIGTERM, seconds before the remaining processes get SIGKILL "
                             "(default: 5)")
    parser.add_argument("-m", dest="module", action="store_true",
                        help="run TARGET as a module, like python -m")
    parser.add_argument("target", metavar="TARGET", help="script path, or module name with -m")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
    return parser


@dataclasses.dataclass(frozen=True)
class _Job:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    coordinator: str
    platform: str
    command: list[str]
    prefix: bool
    log_dir: Path | None
    grace_period: float


def _check_coordinator(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {value!r}: expected HOST:PORT, e.g. node0:29500")
    return value


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel draws outgoing connections' local ports from."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _free_port(host: str) -> int:
    """A port free on every address, below the ephemeral range. The port is released before process
    0's coordinator binds it (on every address); a port the kernel handed out (bind to port 0) could
    meanwhile become the local port of an outgoing connection, e.g. of a job that just ended, and
    jax.distributed then fails to bind (seen as a segmentation fault in jaxlib 0.11.2)."""
    low = _ephemeral_ports()[0]
    candidates = random.Random().sample(range(10000, low), min(64, max(0, low - 10000)))
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no range below: any free port
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _job_from_args(argv: list[str]) -> _Job:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.args[:1] == ["--"]:
        args.args = args.args[1:]
    try:
        if args.nnodes < 1:
            raise ValueError(f"--nnodes {args.nnodes}: must be at least 1")
        if not 0 <= args.node_rank < args.nnodes:
            raise ValueError(f"--node-rank {args.node_rank}: must be in 0..{args.nnodes - 1}")
        if args.nnodes > 1 and args.coordinator is None:
            raise ValueError(f"--nnodes {args.nnodes} needs --coordinator HOST:PORT, the same on "
                             "every node (node 0's address and a free port)")
        if args.grace_period < 0:
            raise ValueError(f"--grace-period {args.grace_period}: must be >= 0")
        if not args.module and not Path(args.target).is_file():
            raise ValueError(f"script {args.target!r} not found (use -m to run a module)")
        coordinator = (_check_coordinator(args.coordinator) if args.coordinator
                       else f"127.0.0.1:{_free_port('127.0.0.1')}")
        gpus = visible_gpu_count() if args.platform != "cpu" else 0
        platform = args.platform if args.platform != "auto" else ("gpu" if gpus else "cpu")
        nproc = args.nproc_per_node
        if nproc is None:
            if platform == "cpu" or not gpus:
                raise ValueError("no GPU found (nvidia-smi -L, CUDA_VISIBLE_DEVICES): pass "
                                 "--nproc-per-node N")
            nproc = gpus
        if nproc < 1:
            raise ValueError(f"--nproc-per-node {nproc}: must be at least 1")
        if platform == "gpu" and nproc > gpus:
            raise ValueError(f"--nproc-per-node {nproc} but only {gpus} GPU(s) visible: one process "
                             "drives one GPU")
    except ValueError as error:
        parser.error(str(error))
    kind = "module" if args.module else "script"
    command = [sys.executable, "-m", "jax_nvrar.launch", _WORKER_FLAG, kind, args.target, *args.args]
    return _Job(nproc, args.nnodes, args.node_rank, coordinator, platform, command, args.prefix,
                args.log_dir, args.grace_period)


def _jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch, 1) for a release or post-release, (major, minor, patch, 0) for a
    pre-release of it (dev, a, b, rc), () if unreadable; a local part (+cuda13) is ignored."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)([^+]*)", version)
    if match is None:
        return ()
    pre = re.match(r"\.?-?(dev|a|b|rc)", match.group(4)) is not None
    return (*map(int, match.groups()[:3]), 0 if pre else 1)


def _names_flag(xla_flags: str, name: str) -> bool:
    return re.search(rf"(^|\s){re.escape(name)}(=|\s|$)", xla_flags) is not None


def _xla_flags(platform: str, xla_flags: str) -> str:
    """``xla_flags`` with XLA's command-buffer update mode set to SKIP_TEMP on GPU, unless it
    already names the mode or turns command buffers off (the mode would then only change the
    allocator; see the module docstring)."""
    if (platform != "gpu" or _names_flag(xla_flags, _UPDATE_MODE_FLAG)
            or re.search(r"(^|\s)--xla_gpu_enable_command_buffer=(''|\"\")?(\s|$)", xla_flags)
            or _release(_jaxlib_version()) < _UPDATE_MODE_JAXLIB):
        return xla_flags
    return f"{xla_flags} {_UPDATE_MODE_FLAG}={_UPDATE_MODE}".strip()


def _child_environ(job: _Job, local_rank: int) -> dict[str, str]:
    env = dict(os.environ)
    config = DistributedConfig(
        coordinator=job.coordinator, num_processes=job.nnodes * job.nproc_per_node,
        process_id=job.node_rank * job.nproc_per_node + local_rank, local_rank=local_rank,
        local_world_size=job.nproc_per_node, node_rank=job.node_rank, num_nodes=job.nnodes,
        platform=job.platform, source="jax_nvrar")
    env.update(config.environ())
    _config.keep_nvlink_multicast_off(env)
    if job.platform == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")
    xla_flags = _xla_flags(job.platform, env.get("XLA_FLAGS", ""))
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    if job.prefix or job.log_dir:
        env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PYTHONFAULTHANDLER", "1")
    return env


def _death_signal_setter():
    """A preexec_fn that has the kernel SIGKILL the child when the launcher dies (Linux only), so a
    killed launcher leaves no process behind holding a GPU. Resolved here, before fork, because the
    child must not load libraries between fork and exec."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _pump(stream: BinaryIO, sink: BinaryIO | None, prefix: bytes, log: BinaryIO | None,
          lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with lock:
            if sink is not None:
                sink.write(prefix + line)
                sink.flush()
            if log is not None:
                log.write(line)
                log.flush()
    stream.close()


def _return_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _Group:
    """The processes of this node: start, watch, stop."""

    def __init__(self, job: _Job):
        self.job = job
        self.procs: list[subprocess.Popen] = []
        self.ranks: list[int] = []
        self.threads: list[threading.Thread] = []
        self.logs: list[BinaryIO] = []
        self.lock = threading.Lock()
        self.failure: int | None = None
        self.received: int | None = None
        self.kill_at: float | None = None

    def start(self) -> None:
        job = self.job
        piped = job.prefix or job.log_dir is not None
        if job.log_dir is not None:
            job.log_dir.mkdir(parents=True, exist_ok=True)
        preexec = _death_signal_setter()
        for local_rank in range(job.nproc_per_node):
            rank = job.node_rank * job.nproc_per_node + local_rank
            self.ranks.append(rank)
            self.procs.append(subprocess.Popen(
                job.command, env=_child_environ(job, local_rank), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if piped else None, stderr=subprocess.PIPE if piped else None,
                start_new_session=True, preexec_fn=preexec))
        if not piped:
            return
        # Readers start after every fork: preexec_fn is unsafe while other threads run.
        for rank, proc in zip(self.ranks, self.procs):
            log = open(job.log_dir / f"rank{rank}.log", "wb") if job.log_dir is not None else None
            if log is not None:
                self.logs.append(log)
            prefix = f"[rank {rank}] ".encode() if job.prefix else b""
            for stream, sink in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
                thread = threading.Thread(target=_pump, args=(stream, sink if job.prefix else None,
                                                              prefix, log, self.lock), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        if self.kill_at is None:
            self.kill_at = time.monotonic() + self.job.grace_period
        self._signal_all(signum)

    def _on_signal(self, signum: int, _frame) -> None:
        if self.received is not None:
            self._signal_all(signal.SIGKILL)
            return
        self.received = signum
        _log(f"received {signal.Signals(signum).name}, forwarding it to every process")
        self._stop(signum)

    def wait(self) -> int:
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        try:
            reported = set()
            while any(proc.returncode is None for proc in self.procs):
                for rank, proc in zip(self.ranks, self.procs):
                    if proc.poll() is None or rank in reported:
                        continue
                    reported.add(rank)
                    code = _return_code(proc.returncode)
                    if code and self.failure is None and self.kill_at is None:
                        self.failure = code
                        _log(f"rank {rank} exited with code {code}; stopping the other processes")
                        self._stop()
                if self.kill_at is not None and time.monotonic() >= self.kill_at:
                    survivors = [r for r, p in zip(self.ranks, self.procs) if p.poll() is None]
                    if survivors:
                        _log(f"rank(s) {survivors} still running {self.job.grace_period:g}s after "
                             "SIGTERM; sending SIGKILL")
                        self._signal_all(signal.SIGKILL)
                    self.kill_at = float("inf")
                time.sleep(0.05)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        for thread in self.threads:
            thread.join(timeout=5.0)  # a grandchild may hold the pipe open; do not wait for it
        for log in self.logs:
            log.close()
        if self.received is not None:
            return 128 + self.received
        return self.failure or 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [_WORKER_FLAG]:
        return _worker(argv[1:])
    job = _job_from_args(argv)
    total = job.nnodes * job.nproc_per_node
    _log(f"starting {job.nproc_per_node} process(es) on node {job.node_rank} of {job.nnodes} "
         f"({total} in all, platform {job.platform}, coordinator {job.coordinator})")
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if _xla_flags(job.platform, xla_flags) != xla_flags:
        _log(f"XLA_FLAGS += {_UPDATE_MODE_FLAG}={_UPDATE_MODE} (command buffers keep their "
             f"temporaries at fixed addresses; name the flag in XLA_FLAGS to choose otherwise)")
    group = _Group(job)
    group.start()
    return group.wait()


if __name__ == "__main__":
    sys.exit(main())
