"""End-to-end tests of ``python -m jxent.examples.train``, mostly as subprocesses.

Each run is short (a few steps, tiny models). The README's main command is
``python -m jxent.examples.train`` with no task: the digits test runs it in
short form. The resume test kills a run mid-way (Ctrl-C, then SIGKILL) and
checks that resuming gives bit-identical parameters to an uninterrupted run; the
distill test resumes its student from an earlier checkpoint the same way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jxent.examples import train
from jxent.examples.cli import EXIT_INTERRUPTED, EXIT_NONFINITE, FLAGS, TASKS
from jxent.examples.flags import build_parser

ROOT = Path(__file__).resolve().parents[1]
TINY_DIGITS = ["--hidden", "32", "--eval-every", "10", "--checkpoint-every", "10"]
TINY_LM = [
    "lm",
    "--seq-len", "32",
    "--d-model", "32",
    "--num-heads", "2",
    "--num-layers", "1",
    "--batch-size", "8",
    "--corpus-bytes", "40000",
    "--eval-every", "3",
    "--checkpoint-every", "3",
    "--sample-bytes", "24",
]  # fmt: skip
TINY_DISTILL = [
    "distill",
    "--seq-len", "32",
    "--d-model", "16",
    "--num-heads", "2",
    "--num-layers", "1",
    "--teacher-d-model", "32",
    "--teacher-num-heads", "2",
    "--teacher-num-layers", "1",
    "--teacher-steps", "8",
    "--steps", "8",
    "--batch-size", "8",
    "--corpus-bytes", "40000",
    "--top-k", "4",
    "--temperature", "1.5",
    "--eval-every", "4",
    "--checkpoint-every", "4",
    "--no-progress",
]  # fmt: skip


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _command(args) -> list[str]:
    return [sys.executable, "-m", "jxent.examples.train", *map(str, args)]


def run_trainer(
    args, *, devices: int = 1, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(args),
        env=_env(devices) | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_trainer(args, *, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        _command(args), env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _steps(out: Path) -> list[int]:
    ckpt = out / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _params(out: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(out / "checkpoints" / str(step) / "state")


def _leaves(tree) -> dict[str, np.ndarray]:
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = np.asarray(node)

    walk("", tree)
    return flat


def main(argv: list[str]) -> int:
    """The trainer in this process. Optax is not clean under the suite's strict dtype
    promotion (it mixes Python floats with int32 step counts), so use JAX's default."""
    with jax.numpy_dtype_promotion("standard"):
        return train.main(argv)


def _check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The README's main command in short form (no task: digits is the default)."""
    out = tmp_path_factory.mktemp("digits")
    proc = run_trainer(["--steps", "30", *TINY_DIGITS, "--out-dir", out])
    return out, proc


def test_digits_end_to_end(digits_run):
    out, proc = digits_run
    _check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "digits" and metrics["outcome"] == "completed"
    assert metrics["steps_done"] == 30 and metrics["devices"] == 1
    final = metrics["final"]
    assert final["step"] == 30 and final["val_accuracy"] > 0.3  # chance is 0.1
    assert 0 <= final["val_ece"] <= 1
    assert metrics["history"]["train"]["step"] == list(range(1, 31))
    assert [e["step"] for e in metrics["history"]["eval"]] == [10, 20, 30]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _steps(out) == [10, 20, 30]
    # the summary table names the loss and the held-out metrics
    assert "softmax_cross_entropy_with_integer_labels" in proc.stdout
    assert "held-out accuracy" in proc.stdout and "calibration error" in proc.stdout


def test_lm_end_to_end_on_four_devices(tmp_path):
    """The lm task, data parallel: the fused loss's custom VJP under a sharded batch."""
    proc = run_trainer([*TINY_LM, "--steps", "6", "--out-dir", tmp_path], devices=4)
    _check_ok(proc)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    final = metrics["final"]
    assert metrics["task"] == "lm" and final["step"] == 6 and metrics["devices"] == 4
    assert final["val_bits_per_byte"] == pytest.approx(final["val_loss"] / np.log(2))
    assert 0 < final["val_bits_per_byte"] < 9
    samples = (tmp_path / "samples.txt").read_text(encoding="utf-8")
    assert samples.startswith("def ") and "\nimport " in samples
    assert "linear_softmax_cross_entropy" in proc.stdout and "bits per byte" in proc.stdout
    assert "--- sample (prompt 'def ') ---" in proc.stdout
    assert (tmp_path / "curves.png").exists() and _steps(tmp_path) == [3, 6]


@pytest.mark.parametrize("loss", ["focal", "bce"])
def test_digits_other_losses_in_process(loss, tmp_path, capsys):
    code = main(
        ["--loss", loss, "--steps", "12", *TINY_DIGITS, "--no-progress", "--out-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    name = {"focal": "sigmoid_focal_loss", "bce": "sigmoid_binary_cross_entropy"}[loss]
    assert name in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["loss"] == loss and np.isfinite(metrics["final"]["val_loss"])


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.returncode}\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def test_resume_after_interrupt_and_kill_equals_uninterrupted(tmp_path):
    steps = 400
    flags = ["--steps", steps, "--hidden", "32", "--eval-every", "50", "--checkpoint-every", "20"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _check_ok(run_trainer([*flags, "--out-dir", straight]))

    # Ctrl-C once training has started: saves a checkpoint of the current step, exit 130.
    proc = start_trainer([*flags, "--out-dir", broken])
    _wait_for(lambda: _steps(broken), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "--resume" in err and "Traceback" not in err
    interrupted_at = _steps(broken)[-1]
    assert 0 < interrupted_at < steps

    # Resume, then SIGKILL (no chance to save) once it has written a newer checkpoint.
    proc = start_trainer([*flags, "--out-dir", broken, "--resume"])
    _wait_for(lambda: _steps(broken)[-1] > interrupted_at, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_after = _steps(broken)[-1]
    assert killed_after < steps, "the run finished before it could be killed"

    # Resume to the end (only --resume and --out-dir: the settings come from the checkpoint).
    final = run_trainer(["--out-dir", broken, "--resume"])
    _check_ok(final)
    assert f"resuming from the checkpoint at step {killed_after}" in final.stdout

    a, b = _leaves(_params(straight, steps)), _leaves(_params(broken, steps))
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the metric histories agree too: every step's loss, every evaluation
    ma = json.loads((straight / "metrics.json").read_text())["history"]
    mb = json.loads((broken / "metrics.json").read_text())["history"]
    assert ma["train"] == mb["train"] and ma["eval"] == mb["eval"]


def test_distill_end_to_end_then_resume_the_student(tmp_path):
    """The teacher (an lm run), then the distilled student, in one command; then the
    student resumed from its step-4 checkpoint ends bit-identical. (--baseline and
    --teacher-checkpoint: tests/test_examples_units.py.)"""
    out = tmp_path / "run"
    # The resumed run loads the programs the first one compiled (13 s less on 2 cores).
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    proc = run_trainer([*TINY_DISTILL, "--out-dir", out], env=cache)
    _check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "distill" and metrics["outcome"] == "completed"
    assert metrics["config"]["top_k"] == 4 and metrics["config"]["temperature"] == 1.5
    report = metrics["distillation"]
    teacher, student = report["teacher"], report["student"]
    assert student["val_bits_per_byte"] == metrics["final"]["val_bits_per_byte"]
    assert report["baseline"] is None
    for r in (teacher, student):
        assert math.isfinite(r["val_bits_per_byte"]) and 0 < r["val_bits_per_byte"] < 9
        assert r["val_bits_per_byte"] == pytest.approx(r["val_loss"] / np.log(2))
    # the teacher's figure is its own run's, on the same held-out data
    teacher_run = json.loads((out / "teacher" / "metrics.json").read_text())
    assert teacher_run["task"] == "lm" and teacher_run["config"]["d_model"] == 32
    assert teacher["val_bits_per_byte"] == pytest.approx(
        teacher_run["final"]["val_bits_per_byte"], rel=1e-5
    )
    assert teacher["parameters"] > metrics["parameters"]
    losses = metrics["history"]["train"]["loss"]
    assert len(losses) == 8 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    for name in ("teacher", "student"):
        assert f"held-out bits per byte: {name}" in proc.stdout
    assert "jxent.linear_distillation_loss (alpha=0.5, temperature=1.5" in proc.stdout
    assert _steps(out) == [4, 8] and _steps(out / "teacher") == [4, 8]

    # Resume the student from step 4: the finished teacher is not trained again.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for name in ("metrics.json", "curves.png"):
        (again / name).unlink()
    shutil.rmtree(again / "checkpoints" / "8")
    proc = run_trainer(["distill", "--out-dir", again, "--resume", "--no-progress"], env=cache)
    _check_ok(proc)
    assert "resuming from the checkpoint at step 4" in proc.stdout
    assert "=== teacher: done in" in proc.stdout
    assert proc.stdout.count("jxent example: byte-level LM") == 1  # the student only
    a, b = _leaves(_params(out, 8)), _leaves(_params(again, 8))
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    resumed = json.loads((again / "metrics.json").read_text())
    assert resumed["history"]["train"] == metrics["history"]["train"]
    assert resumed["history"]["eval"] == metrics["history"]["eval"]
    assert resumed["distillation"]["teacher"] == teacher | {"directory": str(again / "teacher")}


def test_data_parallel_on_four_devices(digits_run, tmp_path):
    """The same run on 4 forced CPU devices: batch split 4 ways, same losses as 1 device."""
    single_out, single_proc = digits_run
    _check_ok(single_proc)
    script = """
import sys
import jax, numpy as np
from jxent.examples import train, trainer
assert jax.local_device_count() == 4
mesh = trainer.make_mesh(None)
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
batch = jax.device_put(np.zeros((16, 64), np.float32), sharding)
assert [s.data.shape for s in batch.addressable_shards] == [(4, 64)] * 4
assert len({s.device for s in batch.addressable_shards}) == 4
# a batch that does not split over the devices is refused up front (exit 2)
assert train.main(["--batch-size", "30", "--out-dir", sys.argv[-1] + "-bad"]) == 2
sys.exit(train.main(sys.argv[1:]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, "--steps", "30", *TINY_DIGITS, "--out-dir", tmp_path],
        env=_env(devices=4), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    _check_ok(proc)
    assert proc.stderr.splitlines()[0] == (
        "python -m jxent.examples.train: error: --batch-size 30 must be a multiple of the 4 devices"
    )
    assert "data parallel over 4 x cpu" in proc.stdout
    four = json.loads((tmp_path / "metrics.json").read_text())
    one = json.loads((single_out / "metrics.json").read_text())
    assert four["devices"] == 4
    np.testing.assert_allclose(
        four["history"]["train"]["loss"], one["history"]["train"]["loss"], rtol=1e-4
    )


def test_non_finite_loss_stops_with_step_and_batch(tmp_path, capsys):
    code = main(
        ["--learning-rate", "1e30", "--warmup-steps", "0", "--steps", "20", *TINY_DIGITS,
         "--no-progress", "--out-dir", str(tmp_path)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE
    # A step of lr 1e30 makes the weights huge, the next one non-finite.
    assert "at step 2, batch 2 of 11 in epoch 1 (training examples [" in err, err
    assert "the parameters became non-finite" in err or "the training loss is nan" in err, err
    assert len(err.strip().splitlines()) == 1
    assert _steps(tmp_path) == []  # nothing non-finite was saved


BAD_FLAGS = [
    (["--steps", "abc"], "invalid positive integer value: 'abc'"),
    (["--steps", "0"], "invalid positive integer value: '0'"),
    (["--learning-rate", "-1"], "invalid positive number value"),
    (["--label-smoothing", "2"], "invalid number in [0, 1] value"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["mnist"], "invalid choice: 'mnist'"),
    (["--loss", "hinge"], "invalid choice: 'hinge'"),
    (["digits", "--d-model", "64"], "--d-model applies to the lm and distill tasks, not digits"),
    (["lm", "--loss", "focal"], "--loss applies to the digits task, not lm"),
    (["--focal-gamma", "1"], "apply only with --loss focal"),
    (["--loss", "focal", "--label-smoothing", "0.1"], "not focal"),
    (["lm", "--d-model", "30", "--num-heads", "4"], "--num-heads 4 must divide --d-model 30"),
    (["--steps", "10", "--warmup-steps", "10"], "must be less than --steps 10"),
    (["--resume", "--overwrite"], "contradict"),
    (["--num-devices", "64"], "only 1 local device"),
    (["--batch-size", "5000"], "batch size must be in [1, 1438]"),
    (["lm", "--alpha", "0.5"], "--alpha applies to the distill task, not lm"),
    (["distill", "--alpha", "1.5"], "invalid number in [0, 1] value: '1.5'"),
    (["distill", "--top-k", "300"], "--top-k 300 is more than the 256 byte values"),
    (["distill", "--teacher-d-model", "30"], "--teacher-num-heads 4 must divide"),
    (["distill", "--teacher-checkpoint", "x", "--teacher-steps", "5"], "--teacher-steps desc"),
    (["distill", "--teacher-checkpoint", "/nonexistent"], "no checkpoint in /nonexistent"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code = main([*argv, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m jxent.examples.train: error: ") and message in err, err


def test_unusable_output_paths_exit_2(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in [a_file, a_file / "sub"]:
        assert main(["--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "is not a usable directory" in err, err
    assert main(["--out-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_existing_run_needs_resume_or_overwrite(digits_run, capsys):
    out, _ = digits_run
    assert main(["--out-dir", str(out)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["--out-dir", str(out), "--resume", "--steps", "99"]) == 2
    assert "--steps 99 differs from the run's 30" in capsys.readouterr().err
    assert main(["lm", "--out-dir", str(out), "--resume"]) == 2
    assert "holds a digits run, not lm" in capsys.readouterr().err


def test_command_line_errors_and_help_as_a_subprocess(tmp_path):
    bad = run_trainer(["--steps", "abc", "--out-dir", tmp_path], timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    helped = run_trainer(["--help"], timeout=60)
    assert helped.returncode == 0
    build_parser()
    for name in FLAGS:
        assert "--" + name.replace("_", "-") in helped.stdout
    for task in TASKS:
        assert task in helped.stdout
    assert "exit codes" in helped.stdout
