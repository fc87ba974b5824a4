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

This module is the entry point: it parses the flags (:mod:`jxent.examples.cli`,
:mod:`jxent.examples.flags`, :mod:`jxent.examples.settings`), hands ``--spawn`` over to
the launcher, joins the processes, runs the task (:mod:`jxent.examples.runner`,
:mod:`jxent.examples.distill`) and turns every failure into its exit code.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import jax

from jxent.examples import distill, distributed, runner
from jxent.examples.cli import EXIT_INTERRUPTED, EXIT_PEER, EXIT_USAGE, PROG, UsageError
from jxent.examples.settings import parse_args


def join_processes(args: argparse.Namespace):
    """Joins the run's other processes (or finds there are none): a ``Runtime``."""
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
            code = distill.run(args, runtime)
        else:
            code = runner.run(args, runtime)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as e:
        if isinstance(e, distributed.DistributedError):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            code = EXIT_PEER
        elif runtime is not None and runtime.multiprocess:
            if not isinstance(e, jax.errors.JaxRuntimeError):
                traceback.print_exc()
            print(f"{PROG}: error: {distributed.peer_failure_message(runtime, e)}", file=sys.stderr)
            code = EXIT_PEER
        else:
            raise
    # A failed multi-process run ends here at once (no shutdown barrier with lost peers).
    return runtime.exit(code) if runtime is not None else code


if __name__ == "__main__":
    sys.exit(main())
