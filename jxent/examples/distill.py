"""The distill task, ``python -m jxent.examples.train distill``: a teacher, then a student.

The task runs in phases, each an ordinary run of the trainer in its own directory, with
its own checkpoints, ``metrics.json`` and ``curves.png``:

1. ``<out-dir>/teacher``: the teacher, an ``lm`` run of the larger model
   (``--teacher-d-model``, ``--teacher-num-layers``, ``--teacher-steps``), skipped with
   ``--teacher-checkpoint``, which names an existing lm run instead;
2. ``<out-dir>/baseline`` (with ``--baseline``): the student's model trained alone, an
   ``lm`` run with the student's size and steps and no z-loss;
3. ``<out-dir>``: the student (:class:`jxent.examples.distill_task.DistillTask`), distilled
   from the teacher's latest checkpoint, whose summary and ``metrics.json`` hold the
   held-out bits per byte of the teacher, the student (and the baseline).

The run's settings are saved in ``<out-dir>/distill.json`` before the first phase, so
that ``--resume`` continues whichever phase was interrupted (a finished phase is not run
again) with the same settings, and refuses flags that would change them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from jax.experimental import multihost_utils

from jxent.examples import runner
from jxent.examples.cli import PROG, UsageError
from jxent.examples.settings import apply_saved_config, parse_args, run_config
from jxent.examples.teacher_dir import teacher_checkpoints

CONFIG = "distill.json"


def _lm_argv(args: argparse.Namespace, *, teacher: bool) -> list[str]:
    """The command line of a phase's lm run: the teacher's or the baseline's."""
    shared = {
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "seed": args.seed,
        "seq_len": args.seq_len,
        "corpus_bytes": args.corpus_bytes,
        "chunk_size": args.chunk_size,
        "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every,
        "keep_checkpoints": args.keep_checkpoints,
        "num_devices": args.num_devices,
        "model_parallel": args.model_parallel,
        "sample_bytes": 0,
    }
    if teacher:
        model = {
            "steps": args.teacher_steps,
            "d_model": args.teacher_d_model,
            "num_layers": args.teacher_num_layers,
            "num_heads": args.teacher_num_heads,
        }
    else:  # the student's model and schedule, cross-entropy alone
        model = {
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "d_model": args.d_model,
            "num_layers": args.num_layers,
            "num_heads": args.num_heads,
            "z_loss": 0.0,
        }
    argv = ["lm"]
    for name, value in (shared | model).items():
        if value is not None:
            argv += [
                "--" + name.replace("_", "-"),
                repr(value) if isinstance(value, float) else str(value),
            ]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def _finished(out: Path) -> dict | None:
    """The metrics of a completed run in ``out``, or None."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    done = metrics.get("outcome") == "completed"
    return metrics if done and metrics["steps_done"] == metrics["config"]["steps"] else None


def _prepare(args: argparse.Namespace, runtime) -> Path:
    """Checks the output directory and the flags against a saved run; on ``--overwrite``
    deletes an earlier run; saves the run's settings."""
    out = runner.usable_dir(args.out_dir)
    if args.teacher_checkpoint is not None:
        try:
            teacher_checkpoints(Path(args.teacher_checkpoint))
        except ValueError as e:
            raise UsageError(f"--teacher-checkpoint: {e}") from None
    saved = out / CONFIG
    phases = [out / "teacher", out / "baseline", out]
    has_run = saved.exists() or any(runner.has_checkpoint(p / "checkpoints") for p in phases)
    if args.overwrite:
        teacher = args.teacher_checkpoint
        if teacher is not None and out.resolve() in Path(teacher).resolve().parents:
            raise UsageError(
                f"--overwrite would delete the --teacher-checkpoint {teacher} inside --out-dir"
            )
        if runtime.is_main:
            for path in phases[:2] + [out / "checkpoints"]:
                shutil.rmtree(path, ignore_errors=True)
            for name in (*runner.OUTPUT_FILES, CONFIG):
                (out / name).unlink(missing_ok=True)
    elif args.resume:
        if not saved.exists():
            raise UsageError(f"--resume: no distill run in {out} (no {CONFIG})")
        apply_saved_config(args, json.loads(saved.read_text()))
    elif has_run:
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
            f"afresh, or another --out-dir"
        )
    if runtime.multiprocess:  # the main process has cleared an earlier run
        multihost_utils.sync_global_devices("jxent.examples.distill: output directory ready")
    if runtime.is_main and not args.resume:
        saved.write_text(json.dumps(run_config(args), indent=2) + "\n")
    return out


def _banner(runtime, text: str) -> None:
    if runtime.is_main:
        print(f"\n=== {text} ===", flush=True)


def _phase(name: str, argv: list[str], out: Path, runtime, resume_command: str) -> int:
    """Runs (or resumes) one lm phase in ``out``; a completed one is left as it is."""
    done = _finished(out)
    if done is not None:
        _banner(
            runtime,
            f"{name}: done in {out} ({done['final']['val_bits_per_byte']:.4f} held-out bits "
            f"per byte)",
        )
        return 0
    _banner(runtime, f"{name}: {PROG} {' '.join(argv)} --out-dir {out}")
    resume = ["--resume"] if runner.has_checkpoint(out / "checkpoints") else []
    args = parse_args([*argv, "--out-dir", str(out), *resume])
    return runner.run(args, runtime, resume_command=resume_command)


def run(args: argparse.Namespace, runtime) -> int:
    """The distill task's phases (see the module docstring); returns the exit code of the
    first that fails, else 0."""
    out = _prepare(args, runtime)
    resume_command = f"{PROG} distill --out-dir {out} --resume"
    if args.teacher_checkpoint is None:
        code = _phase(
            "teacher", _lm_argv(args, teacher=True), out / "teacher", runtime, resume_command
        )
        if code:
            return code
    if args.baseline:
        code = _phase(
            "baseline (the student's model without the teacher)",
            _lm_argv(args, teacher=False),
            out / "baseline",
            runtime,
            resume_command,
        )
        if code:
            return code
    _banner(
        runtime,
        f"student: distilled from the teacher in {args.teacher_checkpoint or out / 'teacher'}",
    )
    args.resume, args.overwrite = runner.has_checkpoint(out / "checkpoints"), False
    return runner.run(args, runtime, resume_command=resume_command)
