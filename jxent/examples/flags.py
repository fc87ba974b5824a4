"""The example trainer's flags, one function per group of ``--help``, and their parser.

Each group's function declares its flags with :func:`jxent.examples.cli.add_flag`;
:func:`build_parser` rebuilds :data:`jxent.examples.cli.FLAGS` with the parser.

Internal API: :func:`build_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jxent.examples.cli import (
    FLAGS,
    add_flag,
    address,
    command_parser,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser with every flag, declared afresh in :data:`FLAGS`."""
    FLAGS.clear()
    parser = command_parser()
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
    add_flag(
        g,
        "--steps",
        type=positive_int,
        default={"digits": 300, "lm": 400, "distill": 200},
        help="optimizer steps in total (distill: the student's, and the baseline's)",
    )
    add_flag(
        g,
        "--batch-size",
        type=positive_int,
        default={"digits": 128, "lm": 32, "distill": 16},
        help="global batch size (examples for digits, sequences for lm and distill); split "
        "over the devices, so it must be a multiple of their number",
    )
    add_flag(
        g,
        "--learning-rate",
        type=positive_float,
        default={"digits": 3e-3, "lm": 2e-3, "distill": 3e-3},
        help="peak learning rate of AdamW (linear warm-up, then cosine decay to 1%%)",
    )
    add_flag(
        g,
        "--warmup-steps",
        type=nonnegative_int,
        default=None,
        shown="5%% of --steps",
        help="linear warm-up steps",
    )
    add_flag(
        g,
        "--weight-decay",
        type=nonnegative_float,
        default={"digits": 1e-4, "lm": 0.01, "distill": 0.01},
        help="AdamW decoupled weight decay (matrices only, not biases or norms)",
    )
    add_flag(g, "--grad-clip", type=positive_float, default=1.0, help="global gradient-norm clip")
    add_flag(
        g,
        "--seed",
        type=int,
        default=0,
        help="seed of the initialisation, the batch order and the lm samples",
    )


def _evaluation_and_output_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluation, checkpoints and output")
    add_flag(
        g,
        "--eval-every",
        type=positive_int,
        default={"digits": 25, "lm": 50, "distill": 50},
        defines_run=False,
        help="evaluate on the held-out data every this many steps (and at the end)",
    )
    add_flag(
        g,
        "--checkpoint-every",
        type=positive_int,
        default=100,
        defines_run=False,
        help="save a checkpoint every this many steps (and at the end and on Ctrl-C)",
    )
    add_flag(
        g,
        "--keep-checkpoints",
        type=positive_int,
        default=3,
        defines_run=False,
        help="how many recent checkpoints to keep",
    )
    add_flag(
        g,
        "--out-dir",
        type=Path,
        default=None,
        shown="runs/<task>",
        defines_run=False,
        help="output directory: metrics.json, curves.png, checkpoints/ (lm: samples.txt; "
        "--spawn: logs/)",
    )
    add_flag(
        g,
        "--resume",
        action="store_true",
        default=False,
        defines_run=False,
        help="continue from the latest checkpoint in --out-dir with the run's saved "
        "settings; flags that would change its result are refused",
    )
    add_flag(
        g,
        "--overwrite",
        action="store_true",
        default=False,
        defines_run=False,
        help="delete the checkpoints and metrics of an earlier run in --out-dir and start afresh",
    )
    add_flag(
        g,
        "--num-devices",
        type=positive_int,
        default=None,
        shown="all",
        defines_run=False,
        help="use only the first N local devices (of each process)",
    )
    add_flag(
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
    add_flag(
        g,
        "--spawn",
        metavar="N",
        type=positive_int,
        default=None,
        shown="none",
        defines_run=False,
        help="start N cooperating processes on this machine (on the CPU unless JAX_PLATFORMS "
        "is set), show process 0's output and log the others' to <out-dir>/logs/; the exit "
        "code is the first failure's",
    )
    add_flag(
        g,
        "--num-processes",
        metavar="N",
        type=positive_int,
        default=None,
        shown="detected, else 1",
        defines_run=False,
        help="the number of processes of the run (with --process-id and --coordinator)",
    )
    add_flag(
        g,
        "--process-id",
        metavar="I",
        type=nonnegative_int,
        default=None,
        shown="none",
        defines_run=False,
        help="this process's index, 0 to N-1; process 0 hosts the coordinator and reports",
    )
    add_flag(
        g,
        "--coordinator",
        metavar="HOST:PORT",
        type=address,
        default=None,
        shown="none",
        defines_run=False,
        help="HOST:PORT of process 0, where the processes meet",
    )
    add_flag(
        g,
        "--cpu-devices",
        metavar="K",
        type=positive_int,
        default=None,
        shown="JAX's",
        defines_run=False,
        help="CPU devices of each process (to try the multi-device code on a CPU)",
    )
    add_flag(
        g,
        "--model-parallel",
        metavar="M",
        type=positive_int,
        default=None,
        shown="the number of processes",
        defines_run=False,
        help="devices on the mesh's model axis, over which the lm output layer's vocabulary "
        "is split (a divisor of the number of devices)",
    )
    add_flag(
        g,
        "--init-timeout",
        metavar="SECONDS",
        type=positive_int,
        default=300,
        defines_run=False,
        help="seconds to wait for every process to join",
    )
    add_flag(
        g,
        "--heartbeat-timeout",
        metavar="SECONDS",
        type=positive_int,
        default=100,
        defines_run=False,
        help="seconds without a sign of life after which a process is declared dead and "
        "the others stop",
    )


def _digits_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("digits task")
    add_flag(
        g,
        "--loss",
        choices=("xent", "focal", "bce"),
        default="xent",
        tasks=("digits",),
        help="xent: softmax cross-entropy with integer labels and label smoothing; focal: "
        "sigmoid focal loss, one-vs-rest; bce: multi-label sigmoid binary cross-entropy, "
        "one-vs-rest",
    )
    add_flag(
        g,
        "--label-smoothing",
        type=fraction,
        default=0.05,
        tasks=("digits",),
        help="label smoothing of the xent and bce losses",
    )
    add_flag(
        g,
        "--focal-alpha",
        type=fraction,
        default=0.25,
        tasks=("digits",),
        help="weight of the positive class in the focal loss",
    )
    add_flag(
        g,
        "--focal-gamma",
        type=nonnegative_float,
        default=2.0,
        tasks=("digits",),
        help="focusing exponent of the focal loss",
    )
    add_flag(
        g,
        "--hidden",
        type=positive_int,
        default=256,
        tasks=("digits",),
        help="width of the MLP's hidden layers",
    )
    add_flag(
        g,
        "--depth",
        type=positive_int,
        default=2,
        tasks=("digits",),
        help="number of hidden layers",
    )


def _lm_flags(parser: argparse.ArgumentParser) -> None:
    lm = ("lm", "distill")
    g = parser.add_argument_group("lm and distill tasks (distill: the student's model)")
    add_flag(
        g,
        "--seq-len",
        type=positive_int,
        default={"lm": 128, "distill": 64},
        tasks=lm,
        help="bytes per training sequence (and the sampling context)",
    )
    add_flag(
        g,
        "--d-model",
        type=positive_int,
        default={"lm": 128, "distill": 32},
        tasks=lm,
        help="transformer width",
    )
    add_flag(
        g,
        "--num-layers",
        type=positive_int,
        default={"lm": 2, "distill": 1},
        tasks=lm,
        help="transformer blocks",
    )
    add_flag(
        g,
        "--num-heads",
        type=positive_int,
        default={"lm": 4, "distill": 2},
        tasks=lm,
        help="attention heads (must divide --d-model)",
    )
    add_flag(
        g,
        "--z-loss",
        type=nonnegative_float,
        default=1e-4,
        tasks=("lm",),
        help="z-loss coefficient of linear_softmax_cross_entropy",
    )
    add_flag(
        g,
        "--chunk-size",
        type=positive_int,
        default=None,
        tasks=lm,
        shown="the library's choice",
        help="vocabulary columns per block of the fused losses",
    )
    add_flag(
        g,
        "--corpus-bytes",
        type=positive_int,
        default=1_000_000,
        tasks=lm,
        help="bytes of standard-library source to use (files in sorted order)",
    )
    add_flag(
        g,
        "--sample-bytes",
        type=nonnegative_int,
        default=200,
        tasks=("lm",),
        defines_run=False,
        help="bytes to sample after each prompt at the end (0: none)",
    )
    add_flag(
        g,
        "--temperature",
        type=positive_float,
        default={"lm": 0.8, "distill": 1.0},
        tasks=lm,
        defines_run=("distill",),
        help="lm: the sampling temperature; distill: the distillation temperature T (the "
        "teacher's top-k are those of log_softmax(teacher_logits / T), the student's logits "
        "are divided by T and the divergence is scaled by T^2)",
    )


def _distill_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distill task (the teacher: an lm run)")
    add_flag(
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
    add_flag(
        g,
        "--teacher-steps",
        type=positive_int,
        default=300,
        tasks=("distill",),
        help="steps of the teacher's lm run (with the student's batch size, learning rate, "
        "data and seed)",
    )
    add_flag(
        g,
        "--teacher-d-model",
        type=positive_int,
        default=96,
        tasks=("distill",),
        help="the teacher's width",
    )
    add_flag(
        g,
        "--teacher-num-layers",
        type=positive_int,
        default=2,
        tasks=("distill",),
        help="the teacher's transformer blocks",
    )
    add_flag(
        g,
        "--teacher-num-heads",
        type=positive_int,
        default=4,
        tasks=("distill",),
        help="the teacher's attention heads (must divide --teacher-d-model)",
    )
    add_flag(
        g,
        "--alpha",
        type=fraction,
        default=0.5,
        tasks=("distill",),
        help="the share of the hard-label cross-entropy in the student's loss, "
        "alpha CE + (1 - alpha) T^2 KL(teacher || student)",
    )
    add_flag(
        g,
        "--top-k",
        type=positive_int,
        default=16,
        tasks=("distill",),
        help="the teacher's most likely bytes per position passed to the student's loss "
        "(at most 256)",
    )
    add_flag(
        g,
        "--baseline",
        action="store_true",
        default=False,
        tasks=("distill",),
        help="also train the student's model without the teacher (an lm run with no z-loss, "
        "the same steps, in <out-dir>/baseline) and compare",
    )
