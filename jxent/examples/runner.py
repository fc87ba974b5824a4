"""One run of the trainer in its output directory, from its settings to its exit code.

:func:`run` checks the output directory (:func:`prepare_out_dir`), resumes from its
latest checkpoint or starts afresh, builds the :class:`jxent.examples.trainer.Trainer`,
trains, and turns the outcome into an exit code. The lm and digits tasks are one run;
the distill task (:mod:`jxent.examples.distill`) is several, one per phase.

Internal API: :data:`OUTPUT_FILES`, :func:`usable_dir`, :func:`has_checkpoint`,
:func:`prepare_out_dir`, :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from jax.experimental import multihost_utils

from jxent.examples.cli import EXIT_INTERRUPTED, EXIT_NONFINITE, PROG, UsageError
from jxent.examples.distributed import Runtime
from jxent.examples.settings import apply_saved_config, run_config

OUTPUT_FILES = ("metrics.json", "curves.png", "samples.txt")


def usable_dir(path) -> Path:
    """Creates ``path`` and checks that it can be written; raises :class:`UsageError`."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".jxent-write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UsageError(f"--out-dir {out} is not a usable directory: {reason}") from None
    return out


def has_checkpoint(ckpt: Path) -> bool:
    """Whether the checkpoint folder ``ckpt`` holds a complete checkpoint."""
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def prepare_out_dir(args: argparse.Namespace, main_process: bool = True) -> Path:
    """Creates and checks the output directory; raises :class:`UsageError` if unusable.

    Every process of a run checks it (they share it: a shared file system across hosts);
    only the main process deletes an earlier run's files for ``--overwrite``.
    """
    out = usable_dir(args.out_dir)
    ckpt = out / "checkpoints"
    has_run = has_checkpoint(ckpt)
    if args.overwrite:
        if main_process:
            shutil.rmtree(ckpt, ignore_errors=True)
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
    elif args.resume and not has_run:
        raise UsageError(f"--resume: no checkpoint in {ckpt}")
    elif has_run and not args.resume:
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
            f"afresh, or another --out-dir"
        )
    return out


def run(args: argparse.Namespace, runtime=None, *, resume_command: str | None = None) -> int:
    """Trains, evaluates, checkpoints and reports; returns the exit code.

    In a multi-process run every process calls it; process 0 reports. A run that is one
    phase of another (the distill task's) names the command that resumes the whole in
    ``resume_command``.
    """
    # Here, not above: a missing extra (Flax, Orbax) fails in one line; --help skips them.
    try:
        from jxent.examples import trainer as trainer_lib
        from jxent.examples.checkpointing import Checkpoints
    except ImportError as e:
        raise UsageError(
            f"the example trainer needs the 'examples' extra ({e.name} is missing): "
            f'pip install -e ".[examples]"'
        ) from None

    runtime = runtime or Runtime()
    main_process = runtime.is_main
    wall_start = time.perf_counter()
    out = prepare_out_dir(args, main_process)
    if runtime.multiprocess:  # the main process has cleared an earlier run (--overwrite)
        multihost_utils.sync_global_devices("jxent.examples: output directory ready")
    checkpoints = Checkpoints(out / "checkpoints", keep=args.keep_checkpoints)
    resume_step = None
    if args.resume:
        resume_step = checkpoints.latest_step()
        apply_saved_config(args, checkpoints.read_meta(resume_step)["config"])
    try:
        trainer = trainer_lib.Trainer(
            args, run_config(args), out, checkpoints, resume_step, runtime=runtime
        )
    except trainer_lib.SetupError as e:
        raise UsageError(str(e)) from None
    if main_process:
        print(trainer.header(), flush=True)

    with trainer_lib.StopFlag() as stop:
        try:
            outcome = trainer.fit(stop)
        except trainer_lib.NonFiniteLoss as e:
            checkpoints.wait()
            last = checkpoints.latest_step()
            if main_process:
                print(
                    f"{PROG}: error: {e.describe()}, {trainer.task.describe_batch(e.step)}; "
                    f"stopped without saving non-finite parameters (latest checkpoint: "
                    f"{'none' if last is None else f'step {last}'}). Try a lower "
                    f"--learning-rate.",
                    file=sys.stderr,
                )
            return EXIT_NONFINITE
        except BaseException:
            # One process waits for its last checkpoint; several must not: a save waits
            # for every process, and one of them may be gone.
            if not runtime.multiprocess:
                checkpoints.wait()
            raise
        trainer.finish(outcome, wall_seconds=time.perf_counter() - wall_start)
        checkpoints.close()
    if outcome == "interrupted":
        if main_process:
            again = "  # and --spawn, or each process's flags" if runtime.multiprocess else ""
            command = resume_command or f"{PROG} {args.task} --out-dir {out} --resume"
            print(
                f"\nInterrupted at step {trainer.step}; saved a checkpoint. Continue with:\n"
                f"  {command}{again}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    return 0
