"""Several cooperating processes: joining JAX's distributed runtime, and a local launcher.

One JAX process runs per host (a TPU VM of a pod slice, a GPU node, or, to try it on one
machine, a local process with its own CPU devices). :func:`initialize` joins them with
:func:`jax.distributed.initialize`: from the ``--num-processes``, ``--process-id`` and
``--coordinator`` flags, or, with none of them, from what JAX detects of the cluster
(a Cloud TPU slice, SLURM, Open MPI); a plain machine runs one process. After that,
``jax.devices()`` lists every process's devices, the trainer's mesh spans them all, and
each process feeds only its own rows of every batch.

:func:`spawn` is ``--spawn N``: it starts the N processes on this machine (each joins a
coordinator on a free localhost port), streams process 0's output (the others' goes to
``<out-dir>/logs/process-<i>.log``), forwards Ctrl-C and SIGTERM, and returns the first
failing process's exit code after stopping the others.

Failures: a process that loses a peer (a collective fails when the peer's connection
drops) reports it and exits with :data:`jxent.examples.cli.EXIT_PEER` *without* JAX's
shutdown barrier, which would wait for the dead peer. A peer that stops answering
without dropping its connections is declared dead by the coordination service after
``heartbeat_timeout`` seconds; JAX then terminates the survivors itself ("the JAX
distributed service detected fatal errors"). Either way no process waits forever.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax


class DistributedError(Exception):
    """The distributed runtime could not be joined, or it lost a peer."""


@dataclass(frozen=True)
class Runtime:
    """Where this process stands among the cooperating processes."""

    process_index: int = 0
    process_count: int = 1

    @property
    def is_main(self) -> bool:
        """Process 0 prints, writes the metrics, plots and samples."""
        return self.process_index == 0

    @property
    def multiprocess(self) -> bool:
        return self.process_count > 1

    def exit(self, code: int) -> int:
        """Ends a failed multi-process run at once (see the module docstring): JAX's
        shutdown barrier at interpreter exit would wait for peers that may be gone.
        A single process just returns ``code``."""
        if self.multiprocess and code != 0:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


#: The PCI vendor of Google's TPU chips (what JAX looks for to tell a TPU host).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def quiet_absent_tpu() -> None:
    """Lets libtpu fail quietly on a machine with no TPU chip.

    Where libtpu is installed (the test extra installs it, for the deviceless TPU
    compiles of the tests) every JAX process tries it first. Without a chip it fails,
    as it should, and JAX takes the GPU or the CPU; but it prints errors that are no
    errors first (``TPU_WORKER_HOSTNAMES``, ``Failed to find host bounds``): JAX skips
    the TPU metadata query there, and libtpu reads the placeholders that leaves. With
    no chip attached and no platform chosen (``JAX_PLATFORMS``), this gives libtpu a
    one-host answer to read instead. A TPU host, and variables the user set, are left
    alone. Must run before JAX starts its backends.
    """
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    for vendor in Path("/sys/bus/pci/devices").glob("*/vendor"):
        with contextlib.suppress(OSError):
            if vendor.read_text().strip() == _GOOGLE_PCI_VENDOR:
                return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")


def initialize(
    *,
    num_processes: int | None = None,
    process_id: int | None = None,
    coordinator: str | None = None,
    cpu_devices: int | None = None,
    init_timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> Runtime:
    """Joins the distributed runtime (before any other JAX call of the process).

    With ``num_processes`` > 1 it joins ``coordinator`` (``host:port`` of process 0) as
    ``process_id``; with no arguments it asks :func:`jax.distributed.initialize` to
    detect a cluster and runs one process where there is none (or where JAX is already
    in use in this process, e.g. a notebook calling the trainer). ``cpu_devices`` sets
    the number of CPU devices of this process (``jax_num_cpu_devices``).

    Raises ``ValueError`` for settings that cannot work here, and
    :class:`DistributedError` when the coordinator cannot be reached in time.
    """
    quiet_absent_tpu()
    if cpu_devices is not None:
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError:
            raise ValueError(
                "--cpu-devices must be set before JAX starts; it cannot change the devices "
                "of a process that already uses JAX"
            ) from None
    if jax.distributed.is_initialized():  # by the caller
        return Runtime(jax.process_index(), jax.process_count())
    # CPU collectives across processes (JAX's default since 0.4.36; explicit here).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(
        initialization_timeout=init_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        # a process that finishes waits this long for the others at interpreter exit
        shutdown_timeout_seconds=max(init_timeout, heartbeat_timeout),
    )
    if num_processes is None:
        try:
            jax.distributed.initialize(**timeouts)
        except (ValueError, RuntimeError):
            # ValueError: no cluster detected. RuntimeError: JAX already runs in this
            # process, which therefore cannot join others: it trains alone.
            return Runtime()
        return Runtime(jax.process_index(), jax.process_count())
    if num_processes == 1:
        return Runtime()
    if process_id != 0:
        # JAX ends the process from C++ (no Python error, no clear message) when it cannot
        # reach the coordinator in time: check that it listens first.
        _wait_for_coordinator(coordinator, init_timeout, num_processes, process_id)
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise ValueError(
                "--num-processes needs a fresh process: JAX is already in use in this one"
            ) from None
        raise DistributedError(_join_failure(coordinator, num_processes, process_id, e)) from e
    except Exception as e:  # a timeout, an unreachable or busy address
        raise DistributedError(_join_failure(coordinator, num_processes, process_id, e)) from e
    return Runtime(jax.process_index(), jax.process_count())


def _wait_for_coordinator(address: str, timeout: float, num_processes: int, process_id: int):
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"process {process_id} of {num_processes}: nothing listens at the "
                    f"coordinator address {address} after {timeout:g} s ({e.strerror or e}); "
                    f"is process 0 running, with the same --coordinator?"
                ) from None
        time.sleep(0.2)


def _join_failure(coordinator, num_processes, process_id, error) -> str:
    return (
        f"process {process_id} of {num_processes} could not join the coordinator at "
        f"{coordinator}: {first_line(error)}"
    )


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def peer_failure_message(runtime: Runtime, error: BaseException) -> str:
    """What a process says when a collective or barrier fails under it."""
    return (
        f"process {runtime.process_index} of {runtime.process_count}: the distributed run "
        f"failed ({type(error).__name__}: {first_line(error)}); another process has probably "
        f"died (see its output). Stopping this one."
    )


# ------------------------------------------------------------------------------ launcher


def free_port() -> int:
    """A TCP port free on localhost now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux)
    with contextlib.suppress(Exception):
        import ctypes  # in the suppress: a Python without ctypes spawns all the same

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: SIGKILL when the launcher dies


def _signal_text(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


def _first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """``(process, exit code)`` of the failure to report among the processes' exit codes
    (None: still running), or None.

    Several can have ended between two polls: one killed by a signal is the cause, a
    peer's exit with an error code its consequence (its connection to the dead one
    broke), so a signal wins; then the lowest process index.
    """
    failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
    return min(failed, key=lambda f: (f[1] > 0, f[0])) if failed else None


def _tail(path: Path, lines: int) -> str:
    """The last lines of a log, without gloo's connection notices."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if not line.startswith("[Gloo] ")]
    return "\n".join(kept[-lines:])


def spawn(
    child_argv: list[str],
    num_processes: int,
    *,
    prog: str,
    log_dir: Path,
    grace_seconds: float = 5.0,
    poll_seconds: float = 0.05,
) -> int:
    """Runs ``python -m jxent.examples.train *child_argv`` as ``num_processes`` cooperating
    processes on this machine; returns the exit code of the run.

    Process 0 writes to this process's stdout and stderr; process ``i`` > 0 writes to
    ``log_dir/process-<i>.log``, whose last lines are shown if it fails. The processes
    run on the CPU unless ``JAX_PLATFORMS`` is set. Ctrl-C and SIGTERM are forwarded to
    every process (they save a checkpoint and stop together). When a process fails, the
    others get ``grace_seconds`` to notice and report it, then are killed; on Linux they
    are also killed if this launcher itself dies. The exit code is the first failure's (128 + N
    for a process killed by signal N; of processes seen ended at once, one killed by a
    signal first), or 0.
    """
    logs = Path(log_dir)
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the processes' logs to {logs}: {e.strerror}") from None
    port = free_port()
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"  # process 0's lines reach the terminal as they come
    procs: list[subprocess.Popen] = []
    files = []
    previous = {}

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
        for i in range(num_processes):
            cmd = [sys.executable, "-m", "jxent.examples.train", *child_argv]
            cmd += ["--num-processes", str(num_processes), "--process-id", str(i)]
            cmd += ["--coordinator", f"localhost:{port}"]
            out = None
            if i > 0:
                out = open(logs / f"process-{i}.log", "wb")  # noqa: SIM115 (closed below)
                files.append(out)
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT if out is not None else None,
                    # Ctrl-C reaches the launcher only, which forwards it once.
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            )
        failure: tuple[int, int] | None = None  # (process, exit code)
        deadline = None
        while any(p.poll() is None for p in procs):
            if failure is None:
                failure = _first_failure([p.poll() for p in procs])
                if failure is not None:
                    deadline = time.monotonic() + grace_seconds
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(poll_seconds)
        if failure is None:
            failure = _first_failure([p.returncode for p in procs])
        if failure is None:
            return 0
        i, code = failure
        codes = {p.returncode for p in procs}
        if not (code > 0 and codes == {code}):  # not a shared, reported exit (e.g. 130)
            print(
                f"{prog}: error: process {i} of {num_processes} {_signal_text(code)}; "
                f"stopped the others",
                file=sys.stderr,
            )
            # The others' last words (process 0's are already on the terminal).
            for j, p in enumerate(procs):
                if j > 0 and p.returncode != 0:
                    tail = _tail(logs / f"process-{j}.log", lines=20 if j == i else 3)
                    print(
                        f"--- last lines of process {j} ({_signal_text(p.returncode)}) ---\n{tail}",
                        file=sys.stderr,
                    )
        return code if code > 0 else 128 - code
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
