"""A run's settings: the flags resolved for its task and checked, and those saved with it.

:func:`parse_args` turns a command line into the settings of one run (every flag of its
task set, explicitly or by default); :func:`run_config` is what a run saves in its
checkpoints and ``metrics.json``; :func:`apply_saved_config` adopts them on ``--resume``
and refuses flags that would change what the run computes.

Internal API: :func:`parse_args`, :func:`run_config`, :func:`apply_saved_config`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jxent.examples.cli import FLAGS, UsageError
from jxent.examples.flags import build_parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses and checks the flags; raises :class:`UsageError` on any problem.

    Returns a namespace with every flag resolved for the task, plus
    ``explicit``: the names of the flags given on the command line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {name for name in FLAGS if getattr(args, name) is not None}
    for name in sorted(explicit):
        if args.task not in FLAGS[name].tasks:
            flag = "--" + name.replace("_", "-")
            tasks = FLAGS[name].tasks
            which = (
                f"the {tasks[0]} task" if len(tasks) == 1 else f"the {' and '.join(tasks)} tasks"
            )
            raise UsageError(f"{flag} applies to {which}, not {args.task}")
    for name, flag in FLAGS.items():
        if name in explicit:
            continue
        default = flag.default
        if isinstance(default, dict):
            default = default.get(args.task)  # None where the flag does not apply
        setattr(args, name, default)
    args.explicit = explicit
    if args.out_dir is None:
        args.out_dir = Path("runs") / args.task
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if args.task == "digits":
        if args.loss != "focal" and explicit & {"focal_alpha", "focal_gamma"}:
            raise UsageError("--focal-alpha and --focal-gamma apply only with --loss focal")
        if args.loss == "focal" and "label_smoothing" in explicit:
            raise UsageError("--label-smoothing applies to --loss xent and bce, not focal")
    if args.task in ("lm", "distill") and args.d_model % args.num_heads:
        raise UsageError(f"--num-heads {args.num_heads} must divide --d-model {args.d_model}")
    if args.task == "distill":
        _check_distill(args)
    _check_processes(args)
    _resolve_warmup(args)
    return args


_TEACHER_FLAGS = ("teacher_steps", "teacher_d_model", "teacher_num_layers", "teacher_num_heads")


def _check_distill(args: argparse.Namespace) -> None:
    if args.teacher_checkpoint is not None:
        given = [n for n in _TEACHER_FLAGS if n in args.explicit]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(
                f"{flag} describes a teacher trained here; --teacher-checkpoint loads one"
            )
    elif args.teacher_d_model % args.teacher_num_heads:
        raise UsageError(
            f"--teacher-num-heads {args.teacher_num_heads} must divide --teacher-d-model "
            f"{args.teacher_d_model}"
        )
    if args.top_k > 256:
        raise UsageError(f"--top-k {args.top_k} is more than the 256 byte values")


def _check_processes(args: argparse.Namespace) -> None:
    joined = [n for n in ("num_processes", "process_id", "coordinator") if n in args.explicit]
    if args.spawn is not None and joined:
        flag = "--" + joined[0].replace("_", "-")
        raise UsageError(f"--spawn starts the processes itself: drop {flag}")
    if joined and (args.num_processes or 1) > 1 and len(joined) < 3:
        raise UsageError("--num-processes, --process-id and --coordinator go together")
    if joined and "num_processes" not in joined:
        raise UsageError("--process-id and --coordinator need --num-processes")
    if args.process_id is not None and args.process_id >= (args.num_processes or 1):
        raise UsageError(
            f"--process-id {args.process_id} must be less than --num-processes "
            f"{args.num_processes or 1}"
        )


def _resolve_warmup(args: argparse.Namespace) -> None:
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 20
    if args.warmup_steps >= args.steps:
        raise UsageError(
            f"--warmup-steps {args.warmup_steps} must be less than --steps {args.steps}"
        )


# Flags about this invocation only, never saved with a run.
_INVOCATION_FLAGS = {
    "out_dir",
    "resume",
    "overwrite",
    # how the processes meet and how the devices are laid out: a run may be resumed
    # with other processes and devices
    "spawn",
    "num_processes",
    "process_id",
    "coordinator",
    "cpu_devices",
    "model_parallel",
    "init_timeout",
    "heartbeat_timeout",
}


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings, saved in its checkpoints and metrics.json."""
    names = [n for n, f in FLAGS.items() if args.task in f.tasks and n not in _INVOCATION_FLAGS]
    return {"task": args.task} | {n: getattr(args, n) for n in names}


def apply_saved_config(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """On ``--resume``: adopts the run's saved settings. Flags given on the command line
    may change how the run is carried out (e.g. ``--eval-every``, ``--num-devices``), but
    not what it computes (e.g. ``--learning-rate``): those are refused."""
    if saved.get("task") != args.task:
        raise UsageError(
            f"--resume: {args.out_dir} holds a {saved.get('task')} run, not {args.task}"
        )
    for name, value in saved.items():
        if name == "task" or name not in FLAGS:
            continue
        if name in args.explicit:
            if FLAGS[name].defines(args.task) and getattr(args, name) != value:
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"--resume: {flag} {getattr(args, name)} differs from the run's {value}; "
                    f"drop the flag to continue the run, or use another --out-dir"
                )
        else:
            setattr(args, name, value)
