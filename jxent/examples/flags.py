"""The example trainer's command line: its flags, their parser, its exit codes.

Every flag is declared once, in the group of ``--help`` it is listed under, as a
:class:`Flag` in :data:`FLAGS`: its per-task default, the tasks it applies to, and
whether ``--resume`` must refuse a different value. :func:`build_parser` rebuilds
:data:`FLAGS` with the parser, which leaves every flag unset (``None``) so that
:mod:`jxent.examples.settings` can tell the flags given from the defaults.

The exit codes are defined here, beside the ``--help`` text that documents them.

Internal API: :data:`PROG`, :data:`TASKS`, the ``EXIT_*`` codes, :class:`UsageError`,
:class:`Flag`, :data:`FLAGS`, :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "python -m jxent.examples.train"
TASKS = ("digits", "lm", "distill")
EXIT_NONFINITE, EXIT_USAGE, EXIT_PEER, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    """Bad flags or an unusable output directory: reported in one line, exit code 2."""


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
    # This order is --help's and FLAGS's, which is the order of a run's saved settings.
    _training_flags(parser)
    _evaluation_and_output_flags(parser)
    _process_flags(parser)
    _digits_flags(parser)
    _lm_flags(parser)
    _distill_flags(parser)
    return parser


def _training_flags(parser: argparse.ArgumentParser) -> None:
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


def _evaluation_and_output_flags(parser: argparse.ArgumentParser) -> None:
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


def _process_flags(parser: argparse.ArgumentParser) -> None:
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


def _digits_flags(parser: argparse.ArgumentParser) -> None:
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


def _lm_flags(parser: argparse.ArgumentParser) -> None:
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


def _distill_flags(parser: argparse.ArgumentParser) -> None:
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
