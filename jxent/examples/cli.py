"""The example trainer's command: its name, tasks, ``--help`` text and exit codes, and
how a flag is declared.

:func:`command_parser` is the command's parser before its flags: its errors are
:class:`UsageError`, one line. Every flag is declared once, with :func:`add_flag` in the
group of ``--help`` it is listed under (:mod:`jxent.examples.flags`), as a :class:`Flag`
in :data:`FLAGS`: its per-task default, the tasks it applies to, and whether ``--resume``
must refuse a different value. The parser leaves every flag unset (``None``) so that
:mod:`jxent.examples.settings` can tell the flags given from the defaults.

The exit codes are defined here, beside the ``--help`` text that documents them.

Internal API: :data:`PROG`, :data:`TASKS`, the ``EXIT_*`` codes, :class:`UsageError`,
:class:`Flag`, :data:`FLAGS`, :func:`command_parser`, :func:`add_flag`, the value types
:func:`positive_int`, :func:`nonnegative_int`, :func:`positive_float`,
:func:`nonnegative_float`, :func:`fraction`, :func:`address`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

PROG = "python -m jxent.examples.train"
TASKS = ("digits", "lm", "distill")
EXIT_NONFINITE, EXIT_USAGE, EXIT_PEER, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    """Bad flags or an unusable output directory: reported in one line, exit code 2."""


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see --help)")


def command_parser() -> argparse.ArgumentParser:
    """The command's parser, with ``--help``'s text and the task argument but no flag yet;
    its errors are :class:`UsageError`."""
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
    return parser


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

# The value types: each raises ValueError on a bad value, and argparse's message names
# the type by its __name__ ("invalid positive integer value: '0'").


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


positive_int.__name__ = "positive integer"


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


nonnegative_int.__name__ = "non-negative integer"


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError
    return value


positive_float.__name__ = "positive number"


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError
    return value


nonnegative_float.__name__ = "non-negative number"


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError
    return value


fraction.__name__ = "number in [0, 1]"


def address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError
    return text


address.__name__ = "HOST:PORT"


def _default_text(flag: Flag) -> str:
    if flag.shown is not None:
        return flag.shown
    if isinstance(flag.default, dict):
        return ", ".join(f"{v} for {k}" for k, v in flag.default.items())
    return str(flag.default)


def add_flag(
    group, flag: str, *, default: Any, help: str, tasks=TASKS, defines_run=True, shown=None, **kw
):
    """Declares ``flag`` in ``group`` (of :func:`command_parser`'s parser) and in
    :data:`FLAGS`; the parser leaves it ``None``, and ``--help`` shows its default."""
    name = flag.lstrip("-").replace("-", "_")
    FLAGS[name] = Flag(name, default, tuple(tasks), defines_run, shown)
    suffix = "" if kw.get("action") == "store_true" else f" (default: {_default_text(FLAGS[name])})"
    group.add_argument(flag, default=None, help=help + suffix, **kw)
