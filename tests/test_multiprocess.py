"""Several processes on JAX's distributed runtime, on this machine's CPU.

2 processes x 2 CPU devices (gloo collectives, a coordinator on a free localhost port)
against 1 process x 4 devices, the same logical ``("data", "model")`` mesh of 2 x 2:

- the losses (``tests/multiprocess_checks.py``): integer labels with and without
  smoothing, the fused loss with ``w`` split over the processes, ``jxent.parallel``
  under ``shard_map``; same value and gradients;
- the example trainer (``lm``): the same losses step by step, a checkpoint, a killed
  process (the survivor stops by itself, the launcher exits non-zero and leaves nothing
  behind), and ``--resume`` to the same parameters and metrics as the uninterrupted run.

Every subprocess has a timeout, and every process started here is killed at the end of
its test, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jxent.examples.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
CHECKS = Path(__file__).with_name("multiprocess_checks.py")
TIMEOUT = 240  # seconds, for any one subprocess (they take 10-30 s on 2 quiet cores)
HEARTBEAT = 10  # seconds: how long a silent process is given before it is declared dead
U = 2.0**-24  # float32 unit roundoff


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # the device counts come from --cpu-devices
    return env


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def processes():
    """Starts processes with ``start(cmd, **popen_kwargs)``; kills each one and its
    descendants on the way out."""
    started: list[subprocess.Popen] = []

    def start(cmd, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _ok(result: tuple[int, str, str], what: str) -> tuple[str, str]:
    code, out, err = result
    assert code == 0, f"{what}: exit {code}\n{out}\n{err[-6000:]}"
    assert "Traceback" not in err, err
    return out, err


# ---------------------------------------------------------------------------- the losses


def test_losses_on_two_processes_equal_one_process(tmp_path):
    """The same programs on the same logical mesh: every collective in them adds the
    results of the 2 devices of one mesh axis, and ``a + b == b + a`` exactly in floating
    point, so the two runs must agree bit for bit (no tolerance to choose)."""
    port = free_port()
    two, one = tmp_path / "two.npz", tmp_path / "one.npz"
    with processes() as start:
        joined = ["--cpu-devices", 2, "--num-processes", 2, "--coordinator", f"localhost:{port}"]
        procs = [
            start([sys.executable, CHECKS, two if i == 0 else tmp_path / "unused.npz", *joined,
                   "--process-id", i])
            for i in range(2)
        ] + [start([sys.executable, CHECKS, one, "--cpu-devices", 4])]  # fmt: skip
        for i, proc in enumerate(procs):
            _ok(_finish(proc), f"multiprocess_checks.py run {i}")
    a, b = np.load(two), np.load(one)
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 18
    for case in ("integer_labels", "integer_labels_smoothing", "linear_auto", "linear_explicit",
                 "parallel_logits", "parallel_linear"):  # fmt: skip
        assert f"{case}/value" in a.files
    for key in a.files:
        assert a[key].dtype == np.float32 and np.all(np.isfinite(a[key])), key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not (tmp_path / "unused.npz").exists()  # only process 0 wrote


# --------------------------------------------------------------------------- the trainer

STEPS = 20
LM = [
    "lm",
    "--seq-len", 32,
    "--d-model", 32,
    "--num-heads", 2,
    "--num-layers", 1,
    "--batch-size", 8,
    "--corpus-bytes", 40000,
    "--steps", STEPS,
    "--eval-every", STEPS,  # one evaluation, at the end
    "--checkpoint-every", 5,
    "--no-progress",
]  # fmt: skip
TOKENS_PER_STEP = 8 * 32


def _train(*args) -> list:
    return [sys.executable, "-m", "jxent.examples.train", *args]


def _steps(out: Path) -> list[int]:
    ckpt = out / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _params(out: Path, step: int) -> dict[str, np.ndarray]:
    """The saved state (parameters and optimizer state) of ``step``, on this process's
    one device (the checkpoint's own shardings name devices of the run's processes)."""
    path = out / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        getattr(metadata, "item_metadata", metadata),
    )
    leaves, _ = jax.tree_util.tree_flatten_with_path(checkpointer.restore(path, target))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early: {proc.returncode}\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _process(launcher: subprocess.Popen, process_id: int) -> int:
    """The pid of process ``process_id`` of a ``--spawn`` launcher."""
    for pid in _children(launcher.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        flag = b"--process-id"
        if flag in cmd and cmd[cmd.index(flag) + 1] == str(process_id).encode():
            return pid
    raise AssertionError(f"no process {process_id} under the launcher")


def test_trainer_on_two_processes(tmp_path):
    """``--spawn 2`` with 2 CPU devices each: the same run as 1 process x 4 devices, a
    killed process stops the run in bounded time, and ``--resume`` continues it exactly.

    Tolerance of "the same losses": both runs execute the same program on the same
    logical 2 x 2 mesh and differ only in the order in which the cross-device
    all-reduces (gloo between processes, XLA's own within one) add their partial sums.
    A step's loss is the mean of n = 256 non-negative per-token losses; any order of
    such a float32 sum is within (n - 1)u of the exact sum (Higham, Accuracy and
    Stability of Numerical Algorithms, 2002, section 4.2), so two orders agree to
    2(n - 1)u. The parameters a step starts from differ by the same kind of rounding in
    the gradient all-reduce, which Adam's normalised update turns into a relative O(u)
    change of each update: orders of magnitude below that bound over a few steps.
    """
    rtol = 2 * (TOKENS_PER_STEP - 1) * U  # 3.0e-5
    two, one, killed = tmp_path / "two", tmp_path / "one", tmp_path / "killed"
    spawn = ["--spawn", 2, "--cpu-devices", 2]
    with processes() as start:
        # Three runs side by side: uninterrupted on 2 processes, on 1 process (same mesh
        # shape: --model-parallel 2), and one whose process 1 is killed.
        run_two = start(_train(*LM, *spawn, "--sample-bytes", 8, "--out-dir", two))
        run_one = start(_train(*LM, "--cpu-devices", 4, "--model-parallel", 2,
                               "--sample-bytes", 0, "--out-dir", one))  # fmt: skip
        run_killed = start(
            _train(*LM, *spawn, "--heartbeat-timeout", HEARTBEAT, "--out-dir", killed)
        )

        # Kill process 1 once a checkpoint is written (SIGKILL: no chance to save).
        _wait_for(lambda: _steps(killed), run_killed)
        victim = _process(run_killed, 1)
        survivor = _process(run_killed, 0)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        code, out, err = _finish(run_killed)
        # The survivor notices at once (its collective fails) or, if it waits elsewhere,
        # after the heartbeat timeout (JAX checks within about twice that); the launcher
        # gives it 2 timeouts + 5 s.
        assert time.monotonic() - killed_at < 2 * HEARTBEAT + 30, err
        assert code == 128 + signal.SIGKILL, f"{code}\n{out}\n{err[-6000:]}"
        assert "process 1 of 2 was killed by SIGKILL; stopped the others" in err, err
        assert (
            "process 0 of 2: the distributed run failed" in err
            and "another process has probably died" in err
        ) or "detected fatal errors" in err, err
        assert not _alive(survivor) and not _children(run_killed.pid)
        # the launcher shows process 1's last lines (none of them a report)
        assert "--- last lines of process 1 (was killed by SIGKILL) ---" in err
        assert "jxent example" not in err.split("last lines of process 1")[1]
        assert out.count("jxent example: byte-level LM") == 1
        last = _steps(killed)[-1]
        assert last < STEPS, "the run ended before its process was killed"

        # Resume (every process is dead): only --resume and --out-dir, and the processes.
        resumed = start(_train("lm", "--resume", "--out-dir", killed, *spawn, "--no-progress"))
        out_resumed, _ = _ok(_finish(resumed), "the resumed run")
        assert f"resuming from the checkpoint at step {last}" in out_resumed

        out_two, err_two = _ok(_finish(run_two), "2 processes")
        _ok(_finish(run_one), "1 process")

    # Only process 0 reports: one header and one summary table; it names the layout.
    # Process 1's output (its log) has none of it.
    log = (two / "logs" / "process-1.log").read_text()
    assert "jxent example" not in log and "step " not in log and "| task " not in log, log
    assert "Traceback" not in log and "error" not in log, log
    assert out_two.count("jxent example: byte-level LM") == 1
    assert out_two.count("| task ") == 1
    assert "data parallel over 2 processes x 2 cpu devices" in out_two
    assert "output layer vocabulary parallel over 2" in out_two
    assert "2 processes x 2 cpu devices; mesh data 2 x model 2" in out_two
    assert "--- sample (prompt 'def ') ---" in out_two  # sampled on process 0
    m2, m1 = _metrics(two), _metrics(one)
    assert m2["layout"] == "2 processes x 2 cpu devices" and m2["processes"] == 2
    assert m1["layout"] == "1 process x 4 cpu devices" and m1["processes"] == 1
    assert m2["devices"] == m1["devices"] == 4
    assert m2["mesh"] == m1["mesh"] == {"data": 2, "model": 2}

    # The same run: the losses step by step, and the held-out loss.
    h2, h1 = m2["history"], m1["history"]
    assert h2["train"]["step"] == h1["train"]["step"] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(h2["train"]["loss"], h1["train"]["loss"], rtol=rtol, atol=0)
    np.testing.assert_allclose(
        [e["val_loss"] for e in h2["eval"]], [e["val_loss"] for e in h1["eval"]], rtol=rtol
    )

    # Killed and resumed = uninterrupted, bit for bit: parameters, optimizer state, metrics.
    assert _steps(killed)[-1] == _steps(two)[-1] == STEPS
    a, b = _params(two, STEPS), _params(killed, STEPS)
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    hk = _metrics(killed)["history"]
    assert hk["train"] == h2["train"] and hk["eval"] == h2["eval"]


def test_bad_process_flags_exit_2():
    """Flag errors are found before any process starts (in this process: no JAX work)."""
    from jxent.examples.cli import UsageError
    from jxent.examples.settings import parse_args

    for argv, message in [
        (["--spawn", "2", "--process-id", "0"], "--spawn starts the processes itself"),
        (["--num-processes", "2", "--process-id", "0"], "go together"),
        (["--process-id", "1"], "need --num-processes"),
        (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], "less than"),
        (["--coordinator", "nowhere"], "invalid HOST:PORT value"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_args(argv)


def test_missing_coordinator_exits_3_in_bounded_time(tmp_path):
    """A process whose coordinator never comes says so once --init-timeout has passed."""
    port = free_port()  # nothing listens there
    with processes() as start:
        started = time.monotonic()
        joined = ["--num-processes", 2, "--process-id", 1, "--coordinator", f"localhost:{port}"]
        proc = start(_train("lm", *joined, "--init-timeout", 1, "--out-dir", tmp_path))
        code, out, err = _finish(proc, timeout=60)
    assert code == 3, f"{code}\n{out}\n{err}"
    assert f"process 1 of 2: nothing listens at the coordinator address localhost:{port}" in err
    assert "Traceback" not in err and time.monotonic() - started < 60
