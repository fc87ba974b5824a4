"""The example trainer: ``python -m jxent.examples.train [digits|lm|distill] [options]``.

Trains a Flax NNX model with Optax and a jxent loss, data parallel over every
device (a ``jax.sharding.Mesh`` with ``"data"`` and ``"model"`` axes: the batch is
split over all its devices, the parameters are replicated, and the lm task's output
layer is vocabulary parallel over ``"model"``), with a progress bar, periodic
evaluation, orbax checkpoints and ``--resume``, and writes ``metrics.json``,
``curves.png`` and a summary table at the end. ``--help`` lists every option. The
``distill`` task runs in phases, each an ordinary run in its own directory (a teacher
``lm`` run, then the student); see :mod:`jxent.examples.distill`.

Several processes (hosts) train together on JAX's distributed runtime: ``--spawn N``
on one machine, ``--num-processes``/``--process-id``/``--coordinator`` by hand, or no
flag at all where JAX detects the cluster (a Cloud TPU slice, SLURM, Open MPI); see
:mod:`jxent.examples.distributed`.

Every batch is a pure function of the seed and the step, and the training state
(parameters, optimizer state) is checkpointed whole, so a resumed run reproduces
an uninterrupted one bit for bit where XLA is deterministic: always on CPU; on
GPUs with ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``.

Exit codes: 0 done, 1 training stopped on a non-finite loss, 2 bad flags or an
unusable output directory, 3 a multi-process run lost a process (or could not start),
130 interrupted (Ctrl-C) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "python -m jxent.examples.train"
TASKS = ("digits", "lm", "distill")
EXIT_NONFINITE, EXIT_USAGE, EXIT_PEER, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    """Bad flags or an unusable output directory: reported in one line, exit code 2."""


# ------------------------------------------------------------------------------ flags


@dataclass(frozen=True)
class Flag:
    name: str  # the attribute name, e.g. "batch_size" for --batch-size
    default: Any  # a value, or a {task: value} dict for per-task defaults
    tasks: tuple[str, ...] = TASKS  # the tasks the flag applies to
    # on --resume it must match the checkpoint's value (True, False, or for these tasks)
    defines_run: bool | tuple[str, ...] = True
    shown: str | None = None  # how --help shows a default that is computed later

    def defines(self, task: str) -> bool:
        """Whether the flag's value changes what a run of ``task`` computes."""
        return self.defines_run if isinstance(self.defines_run, bool) else task in self.defines_run


FLAGS: dict[str, Flag] = {}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


_positive_int.__name__ = "positive integer"


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


_nonnegative_int.__name__ = "non-negative integer"


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError
    return value


_positive_float.__name__ = "positive number"


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError
    return value


_nonnegative_float.__name__ = "non-negative number"


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError
    return value


_fraction.__name__ = "number in [0, 1]"


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError
    return text


_address.__name__ = "HOST:PORT"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see --help)")


def _default_text(flag: Flag) -> str:
    if flag.shown is not None:
        return flag.shown
    if isinstance(flag.default, dict):
        return ", ".join(f"{v} for {k}" for k, v in flag.default.items())
    return str(flag.default)


def _add(
    group, flag: str, *, default: Any, help: str, tasks=TASKS, defines_run=True, shown=None, **kw
):
    name = flag.lstrip("-").replace("-", "_")
    FLAGS[name] = Flag(name, default, tuple(tasks), defines_run, shown)
    suffix = "" if kw.get("action") == "store_true" else f" (default: {_default_text(FLAGS[name])})"
    group.add_argument(flag, default=None, help=help + suffix, **kw)


_DESCRIPTION = """\
Train a Flax NNX model with Optax and a jxent loss, data parallel over all devices
(CPU, GPUs or TPU cores, of one process or of several cooperating ones), with
checkpoints, --resume, a progress bar, a summary table, metrics.json and curves.png
in --out-dir.

tasks:
  digits  (default) an MLP on scikit-learn's bundled 8x8 handwritten digits;
          --loss picks softmax cross-entropy, focal loss or sigmoid BCE
  lm      a byte-level decoder-only transformer on Python's standard-library
          sources, trained with linear_softmax_cross_entropy (z-loss, padding)
  distill a smaller byte-level transformer distilled from a larger one (trained
          first as an lm run in <out-dir>/teacher, or --teacher-checkpoint) with
          linear_distillation_loss on the teacher's top-k log-probabilities"""

_EPILOG = f"""\
examples:
  {PROG}                        # digits, about a minute on a CPU
  {PROG} digits --loss focal --out-dir runs/focal
  {PROG} lm                     # a few minutes on a CPU
  {PROG} lm --d-model 256 --num-layers 4 --steps 2000 --out-dir runs/lm-big
  {PROG} --resume               # continue runs/digits after Ctrl-C
  {PROG} lm --spawn 2 --cpu-devices 2   # 2 processes x 2 CPU devices on this machine
  {PROG} distill                # teacher, then student: under a minute on a CPU
  {PROG} distill --baseline --out-dir runs/distill-vs-baseline
  {PROG} distill --teacher-checkpoint runs/lm --out-dir runs/distill-from-lm

exit codes: 0 done; 1 stopped on a non-finite loss; 2 bad flags or an unusable
output directory; 3 a multi-process run lost a process or could not start; 130
interrupted (Ctrl-C or SIGTERM) after saving a checkpoint."""


def build_parser() -> argparse.ArgumentParser:
    FLAGS.clear()
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [digits|lm|distill] [options]",
        allow_abbrev=False,  # --spawn passes the command line on: flags are spelt out
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    parser.add_argument(
        "task", nargs="?", default="digits", choices=TASKS, help="what to train (default: digits)"
    )

    g = parser.add_argument_group("training")
    _add(
        g,
        "--steps",
        type=_positive_int,
        default={"digits": 300, "lm": 400, "distill": 200},
        help="optimizer steps in total (distill: the student's, and the baseline's)",
    )
    _add(
        g,
        "--batch-size",
        type=_positive_int,
        default={"digits": 128, "lm": 32, "distill": 16},
        help="global batch size (examples for digits, sequences for lm and distill); split "
        "over the devices, so it must be a multiple of their number",
    )
    _add(
        g,
        "--learning-rate",
        type=_positive_float,
        default={"digits": 3e-3, "lm": 2e-3, "distill": 3e-3},
        help="peak learning rate of AdamW (linear warm-up, then cosine decay to 1%%)",
    )
    _add(
        g,
        "--warmup-steps",
        type=_nonnegative_int,
        default=None,
        shown="5%% of --steps",
        help="linear warm-up steps",
    )
    _add(
        g,
        "--weight-decay",
        type=_nonnegative_float,
        default={"digits": 1e-4, "lm": 0.01, "distill": 0.01},
        help="AdamW decoupled weight decay (matrices only, not biases or norms)",
    )
    _add(g, "--grad-clip", type=_positive_float, default=1.0, help="global gradient-norm clip")
    _add(
        g,
        "--seed",
        type=int,
        default=0,
        help="seed of the initialisation, the batch order and the lm samples",
    )

    g = parser.add_argument_group("evaluation, checkpoints and output")
    _add(
        g,
        "--eval-every",
        type=_positive_int,
        default={"digits": 25, "lm": 50, "distill": 50},
        defines_run=False,
        help="evaluate on the held-out data every this many steps (and at the end)",
    )
    _add(
        g,
        "--checkpoint-every",
        type=_positive_int,
        default=100,
        defines_run=False,
        help="save a checkpoint every this many steps (and at the end and on Ctrl-C)",
    )
    _add(
        g,
        "--keep-checkpoints",
        type=_positive_int,
        default=3,
        defines_run=False,
        help="how many recent checkpoints to keep",
    )
    _add(
        g,
        "--out-dir",
        type=Path,
        default=None,
        shown="runs/<task>",
        defines_run=False,
        help="output directory: metrics.json, curves.png, checkpoints/ (lm: samples.txt; "
        "--spawn: logs/)",
    )
    _add(
        g,
        "--resume",
        action="store_true",
        default=False,
        defines_run=False,
        help="continue from the latest checkpoint in --out-dir with the run's saved "
        "settings; flags that would change its result are refused",
    )
    _add(
        g,
        "--overwrite",
        action="store_true",
        default=False,
        defines_run=False,
        help="delete the checkpoints and metrics of an earlier run in --out-dir and start afresh",
    )
    _add(
        g,
        "--num-devices",
        type=_positive_int,
        default=None,
        shown="all",
        defines_run=False,
        help="use only the first N local devices (of each process)",
    )
    _add(
        g,
        "--no-progress",
        action="store_true",
        default=False,
        defines_run=False,
        help="no progress bar (it is also off when stderr is not a terminal)",
    )

    g = parser.add_argument_group(
        "several processes (JAX's distributed runtime; on a TPU slice, SLURM or Open MPI "
        "no flag is needed: JAX detects the processes)"
    )
    _add(
        g,
        "--spawn",
        metavar="N",
        type=_positive_int,
        default=None,
        shown="none",
        defines_run=False,
        help="start N cooperating processes on this machine (on the CPU unless JAX_PLATFORMS "
        "is set), show process 0's output and log the others' to <out-dir>/logs/; the exit "
        "code is the first failure's",
    )
    _add(
        g,
        "--num-processes",
        metavar="N",
        type=_positive_int,
        default=None,
        shown="detected, else 1",
        defines_run=False,
        help="the number of processes of the run (with --process-id and --coordinator)",
    )
    _add(
        g,
        "--process-id",
        metavar="I",
        type=_nonnegative_int,
        default=None,
        shown="none",
        defines_run=False,
        help="this process's index, 0 to N-1; process 0 hosts the coordinator and reports",
    )
    _add(
        g,
        "--coordinator",
        metavar="HOST:PORT",
        type=_address,
        default=None,
        shown="none",
        defines_run=False,
        help="HOST:PORT of process 0, where the processes meet",
    )
    _add(
        g,
        "--cpu-devices",
        metavar="K",
        type=_positive_int,
        default=None,
        shown="JAX's",
        defines_run=False,
        help="CPU devices of each process (to try the multi-device code on a CPU)",
    )
    _add(
        g,
        "--model-parallel",
        metavar="M",
        type=_positive_int,
        default=None,
        shown="the number of processes",
        defines_run=False,
        help="devices on the mesh's model axis, over which the lm output layer's vocabulary "
        "is split (a divisor of the number of devices)",
    )
    _add(
        g,
        "--init-timeout",
        metavar="SECONDS",
        type=_positive_int,
        default=300,
        defines_run=False,
        help="seconds to wait for every process to join",
    )
    _add(
        g,
        "--heartbeat-timeout",
        metavar="SECONDS",
        type=_positive_int,
        default=100,
        defines_run=False,
        help="seconds without a sign of life after which a process is declared dead and "
        "the others stop",
    )

    g = parser.add_argument_group("digits task")
    _add(
        g,
        "--loss",
        choices=("xent", "focal", "bce"),
        default="xent",
        tasks=("digits",),
        help="xent: softmax cross-entropy with integer labels and label smoothing; focal: "
        "sigmoid focal loss, one-vs-rest; bce: multi-label sigmoid binary cross-entropy, "
        "one-vs-rest",
    )
    _add(
        g,
        "--label-smoothing",
        type=_fraction,
        default=0.05,
        tasks=("digits",),
        help="label smoothing of the xent and bce losses",
    )
    _add(
        g,
        "--focal-alpha",
        type=_fraction,
        default=0.25,
        tasks=("digits",),
        help="weight of the positive class in the focal loss",
    )
    _add(
        g,
        "--focal-gamma",
        type=_nonnegative_float,
        default=2.0,
        tasks=("digits",),
        help="focusing exponent of the focal loss",
    )
    _add(
        g,
        "--hidden",
        type=_positive_int,
        default=256,
        tasks=("digits",),
        help="width of the MLP's hidden layers",
    )
    _add(
        g,
        "--depth",
        type=_positive_int,
        default=2,
        tasks=("digits",),
        help="number of hidden layers",
    )

    lm = ("lm", "distill")
    g = parser.add_argument_group("lm and distill tasks (distill: the student's model)")
    _add(
        g,
        "--seq-len",
        type=_positive_int,
        default={"lm": 128, "distill": 64},
        tasks=lm,
        help="bytes per training sequence (and the sampling context)",
    )
    _add(
        g,
        "--d-model",
        type=_positive_int,
        default={"lm": 128, "distill": 32},
        tasks=lm,
        help="transformer width",
    )
    _add(
        g,
        "--num-layers",
        type=_positive_int,
        default={"lm": 2, "distill": 1},
        tasks=lm,
        help="transformer blocks",
    )
    _add(
        g,
        "--num-heads",
        type=_positive_int,
        default={"lm": 4, "distill": 2},
        tasks=lm,
        help="attention heads (must divide --d-model)",
    )
    _add(
        g,
        "--z-loss",
        type=_nonnegative_float,
        default=1e-4,
        tasks=("lm",),
        help="z-loss coefficient of linear_softmax_cross_entropy",
    )
    _add(
        g,
        "--chunk-size",
        type=_positive_int,
        default=None,
        tasks=lm,
        shown="the library's choice",
        help="vocabulary columns per block of the fused losses",
    )
    _add(
        g,
        "--corpus-bytes",
        type=_positive_int,
        default=1_000_000,
        tasks=lm,
        help="bytes of standard-library source to use (files in sorted order)",
    )
    _add(
        g,
        "--sample-bytes",
        type=_nonnegative_int,
        default=200,
        tasks=("lm",),
        defines_run=False,
        help="bytes to sample after each prompt at the end (0: none)",
    )
    _add(
        g,
        "--temperature",
        type=_positive_float,
        default={"lm": 0.8, "distill": 1.0},
        tasks=lm,
        defines_run=("distill",),
        help="lm: the sampling temperature; distill: the distillation temperature T (the "
        "teacher's top-k are those of log_softmax(teacher_logits / T), the student's logits "
        "are divided by T and the divergence is scaled by T^2)",
    )

    g = parser.add_argument_group("distill task (the teacher: an lm run)")
    _add(
        g,
        "--teacher-checkpoint",
        metavar="DIR",
        type=str,
        default=None,
        tasks=("distill",),
        shown="none: train one in <out-dir>/teacher",
        help="the --out-dir of an lm run (or its checkpoints/ folder) whose latest checkpoint "
        "is the teacher; its --seq-len must be at least the student's",
    )
    _add(
        g,
        "--teacher-steps",
        type=_positive_int,
        default=300,
        tasks=("distill",),
        help="steps of the teacher's lm run (with the student's batch size, learning rate, "
        "data and seed)",
    )
    _add(
        g,
        "--teacher-d-model",
        type=_positive_int,
        default=96,
        tasks=("distill",),
        help="the teacher's width",
    )
    _add(
        g,
        "--teacher-num-layers",
        type=_positive_int,
        default=2,
        tasks=("distill",),
        help="the teacher's transformer blocks",
    )
    _add(
        g,
        "--teacher-num-heads",
        type=_positive_int,
        default=4,
        tasks=("distill",),
        help="the teacher's attention heads (must divide --teacher-d-model)",
    )
    _add(
        g,
        "--alpha",
        type=_fraction,
        default=0.5,
        tasks=("distill",),
        help="the share of the hard-label cross-entropy in the student's loss, "
        "alpha CE + (1 - alpha) T^2 KL(teacher || student)",
    )
    _add(
        g,
        "--top-k",
        type=_positive_int,
        default=16,
        tasks=("distill",),
        help="the teacher's most likely bytes per position passed to the student's loss "
        "(at most 256)",
    )
    _add(
        g,
        "--baseline",
        action="store_true",
        default=False,
        tasks=("distill",),
        help="also train the student's model without the teacher (an lm run with no z-loss, "
        "the same steps, in <out-dir>/baseline) and compare",
    )
    return parser


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


# ----------------------------------------------------------------------- output directory


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


# ------------------------------------------------------------------------------ the run


def join_processes(args: argparse.Namespace):
    """Joins the run's other processes (or finds there are none): a ``Runtime``."""
    from jxent.examples import distributed

    try:
        return distributed.initialize(
            num_processes=args.num_processes,
            process_id=args.process_id,
            coordinator=args.coordinator,
            cpu_devices=args.cpu_devices,
            init_timeout=args.init_timeout,
            heartbeat_timeout=args.heartbeat_timeout,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace, runtime=None, *, resume_command: str | None = None) -> int:
    """Trains, evaluates, checkpoints and reports; returns the exit code.

    In a multi-process run every process calls it; process 0 reports. A run that is one
    phase of another (the distill task's) names the command that resumes the whole in
    ``resume_command``.
    """
    try:
        from jax.experimental import multihost_utils

        from jxent.examples import trainer as trainer_lib
        from jxent.examples.checkpointing import Checkpoints
        from jxent.examples.distributed import Runtime
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


def _without_spawn(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--spawn":
            skip = i + 1 < len(argv)
        elif not a.startswith("--spawn="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    runtime = None
    try:
        args = parse_args(argv)
        if args.spawn is not None:
            from jxent.examples import distributed

            # The survivors of a lost process get to notice it themselves (their own message,
            # or JAX's after the heartbeat timeout) before the launcher stops them.
            grace = 2 * args.heartbeat_timeout + 5  # JAX notices within about 2 timeouts
            try:
                return distributed.spawn(
                    _without_spawn(argv),
                    args.spawn,
                    prog=PROG,
                    log_dir=Path(args.out_dir) / "logs",
                    grace_seconds=grace,
                )
            except ValueError as e:
                raise UsageError(str(e)) from None
        runtime = join_processes(args)
        if args.task == "distill":
            from jxent.examples import distill

            code = distill.run(args, runtime)
        else:
            code = run(args, runtime)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as e:
        from jxent.examples import distributed

        if isinstance(e, distributed.DistributedError):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            code = EXIT_PEER
        elif runtime is not None and runtime.multiprocess:
            import jax

            if not isinstance(e, jax.errors.JaxRuntimeError):
                traceback.print_exc()
            print(f"{PROG}: error: {distributed.peer_failure_message(runtime, e)}", file=sys.stderr)
            code = EXIT_PEER
        else:
            raise
    # A failed multi-process run ends here at once (no shutdown barrier with lost peers).
    return runtime.exit(code) if runtime is not None else code


if __name__ == "__main__":
    # Run as jxent.examples.train, not as a second copy of it named __main__: the distill
    # task's module imports this one and must share its flags and exceptions.
    from jxent.examples import train

    sys.exit(train.main())
