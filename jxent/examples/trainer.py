"""The training loop: data parallel steps, evaluation, checkpoints, progress and reports.

:class:`Trainer` is built and driven by :func:`jxent.examples.runner.run`. The
devices of every process form a 2-D ``("data", "model")`` mesh (:func:`make_mesh`); the
parameters and optimizer state are replicated over it, every batch is split over all
its devices (data parallel: XLA inserts the gradient all-reduce), and the lm task's
output layer runs vocabulary parallel over the ``"model"`` axis
(:func:`jxent.parallel.linear_softmax_cross_entropy` under ``jax.shard_map``). The same
code runs on one CPU, several GPUs, a TPU slice, or several processes joined by
:mod:`jxent.examples.distributed`: each process builds its own rows of a batch, and
``jax.make_array_from_process_local_data`` makes them one global array.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jxent.examples import report, training
from jxent.examples.checkpointing import Checkpoints
from jxent.examples.distributed import Runtime
from jxent.examples.models import count_params
from jxent.examples.tasks import make_task


class SetupError(Exception):
    """Settings that cannot work on this machine or data (reported as a usage error)."""


class NonFiniteLoss(Exception):
    """The loss or the updated parameters of ``step`` are not finite."""

    def __init__(self, step: int, loss: float):
        super().__init__(step, loss)
        self.step, self.loss = step, loss

    def describe(self) -> str:
        if math.isfinite(self.loss):
            return f"the parameters became non-finite (loss {self.loss:.4g}) at step {self.step}"
        return f"the training loss is {self.loss} at step {self.step}"


class StopFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to save and stop after
    the current step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


@dataclass
class History:
    """Per-step training losses and the evaluations, saved with every checkpoint."""

    train_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0

    def to_json(self) -> dict:
        """A snapshot (copies, not the live lists): checkpoints serialise it asynchronously,
        while training goes on appending to the history."""
        return {
            "train": {"step": list(self.train_step), "loss": list(self.train_loss)},
            "eval": [dict(e) for e in self.evals],
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_json(cls, d: dict) -> History:
        return cls(d["train"]["step"], d["train"]["loss"], d["eval"], d["train_seconds"])

    def mean_train_loss(self, after_step: int) -> float:
        """The mean training loss of the steps after ``after_step``."""
        vals = [v for s, v in zip(self.train_step, self.train_loss, strict=True) if s > after_step]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def last_eval_step(self) -> int:
        return self.evals[-1]["step"] if self.evals else 0


DATA, MODEL = "data", "model"
# A batch's leading axis is split over every device of the mesh, "model" major: device
# k of the mesh's flat order (see make_mesh) holds the k-th block of rows, so each
# process holds one contiguous range of rows.
BATCH_AXES = (MODEL, DATA)


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``num_devices`` local devices of every
    process (all by default), with ``model_parallel`` devices on the ``"model"`` axis.

    The devices are listed process by process and cut into ``model_parallel`` groups of
    consecutive devices, one per model index: with one model group per process (the
    multi-process default), the ``"model"`` axis spans the processes and the ``"data"``
    axis each process's own devices.
    """
    per_process: dict[int, list] = {}
    for d in jax.devices():
        per_process.setdefault(d.process_index, []).append(d)
    local = len(jax.local_devices())
    if num_devices is not None and num_devices > local:
        raise SetupError(f"--num-devices {num_devices}: only {local} local device(s) available")
    if len({len(v) for v in per_process.values()}) != 1:
        raise SetupError("every process must have the same number of devices")
    devices = []
    for p in sorted(per_process):
        devices += sorted(per_process[p], key=lambda d: d.id)[:num_devices]
    if len(devices) % model_parallel:
        raise SetupError(
            f"--model-parallel {model_parallel} must divide the number of devices, {len(devices)}"
        )
    grid = np.array(devices).reshape(model_parallel, len(devices) // model_parallel).T
    return Mesh(grid, (DATA, MODEL))


def local_rows(sharding: NamedSharding, num_rows: int) -> slice:
    """The rows of a ``[num_rows, ...]`` array split by ``sharding`` that this process
    holds (one contiguous range, by construction of :func:`make_mesh`)."""
    index = sharding.addressable_devices_indices_map((num_rows,))
    ranges = sorted({s[0].indices(num_rows)[:2] for s in index.values()})
    start, stop = ranges[0][0], ranges[-1][1]
    covered = sum(b - a for a, b in ranges)
    if covered != stop - start:
        raise SetupError("this process's rows of a batch are not contiguous")
    return slice(start, stop)


class Trainer:
    """One run: builds the task, model and optimizer (or restores them) and trains.

    Every process of a multi-process run builds its own ``Trainer`` and calls the same
    methods in the same order (the steps, evaluations and checkpoints are collective);
    only process 0 shows progress and writes the reports.

    Args:
      args: the resolved flags (:func:`jxent.examples.settings.parse_args`).
      config: the run's settings, saved with every checkpoint.
      out: the output directory (already checked).
      checkpoints: the run's checkpoints; with ``resume_step`` the state is restored
        from that step.
      runtime: this process among the cooperating ones (one process by default).
    """

    def __init__(
        self,
        args: Any,
        config: dict[str, Any],
        out: Path,
        checkpoints: Checkpoints,
        resume_step: int | None = None,
        runtime: Runtime | None = None,
    ):
        self.args, self.config, self.out, self.checkpoints = args, config, out, checkpoints
        self.runtime = runtime or Runtime()
        model_parallel = getattr(args, "model_parallel", None) or self.runtime.process_count
        self.mesh = make_mesh(args.num_devices, model_parallel)
        num_devices = self.mesh.devices.size
        if args.batch_size % num_devices:
            raise SetupError(
                f"--batch-size {args.batch_size} must be a multiple of the {num_devices} devices"
            )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
        self._rows: dict[int, slice] = {}
        self._vote_arrays: dict[bool, jax.Array] = {}
        try:
            self.task = make_task(args, num_devices, mesh=self.mesh)
        except ValueError as e:  # e.g. a batch larger than the data set
            raise SetupError(str(e)) from None

        tx = training.make_optimizer(
            learning_rate=args.learning_rate,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
        )
        # Every process builds the same initial state from the seed.
        self.model_def, opt_def, state = training.init_training(self.task, tx, args.seed)
        self.num_params = count_params(training.merge_model(self.model_def, state))
        self.state = jax.device_put(state, self.replicated)
        self.step = 0
        self.history = History()
        if resume_step is not None:
            self.state, meta = checkpoints.restore(resume_step, self.state)
            self.history = History.from_json(meta["history"])
            self.step = resume_step
        self.start_step = self.step
        self._train_step = jax.jit(
            _with_stop_vote(training.make_train_step(self.task, self.model_def, opt_def)),
            out_shardings=(self.replicated, self.replicated),
        )
        self._eval_step = jax.jit(
            training.make_eval_step(self.task, self.model_def), out_shardings=self.replicated
        )
        self.speed = report.Throughput(self.task.items_per_step, self.task.unit)
        self.stopping = False  # agreed by every process: save and stop (Ctrl-C, SIGTERM)
        # Fixed models (the distill task's teacher) are scored once on the held-out data.
        self.task.evaluate_references(self.evaluate_model)

    # -- pieces -------------------------------------------------------------------------

    def rows(self, num_rows: int) -> slice:
        """This process's rows of a global batch of ``num_rows`` rows."""
        if num_rows not in self._rows:
            self._rows[num_rows] = local_rows(self.batch_sharding, num_rows)
        return self._rows[num_rows]

    def shard(self, batch: dict[str, np.ndarray], num_rows: int | None = None) -> dict:
        """Makes one global batch, split over every device along its leading axis, from
        this process's rows of it (``num_rows`` in all; all of them in one process)."""

        if not self.runtime.multiprocess:  # the whole batch: the same, and faster
            return jax.device_put(batch, self.batch_sharding)

        def put(x):
            rows = len(x) if num_rows is None else num_rows
            return jax.make_array_from_process_local_data(
                self.batch_sharding, x, (rows,) + x.shape[1:]
            )

        return jax.tree.map(put, batch)

    def train_batch(self, step: int) -> dict:
        rows = self.rows(self.args.batch_size)
        batch = self.shard(self.task.train_batch(step, rows), self.args.batch_size)
        return self.task.device_batch(batch)

    def _votes(self, stop: StopFlag) -> jax.Array:
        """This process's vote to stop, one per device; the step returns their "or"."""
        vote = bool(stop)
        if vote not in self._vote_arrays:
            n = self.mesh.devices.size
            rows = self.rows(n)
            local = np.full(rows.stop - rows.start, vote)
            self._vote_arrays[vote] = self.shard({"stop": local}, n)["stop"]
        return self._vote_arrays[vote]

    def _held_out(self, eval_step, model_state) -> dict[str, float]:
        outs = [
            jax.device_get(eval_step(model_state, self.shard(b, n)))
            for b, n in self.task.eval_batches(self.rows)
        ]
        merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return self.task.summarize_eval(merged)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current parameters, plus the recent training loss."""
        return (
            {"step": self.step}
            | self._held_out(self._eval_step, self.state["model"])
            | {"train_loss": self.history.mean_train_loss(self.history.last_eval_step)}
        )

    def evaluate_model(self, model_def, model_state) -> dict[str, float]:
        """Held-out metrics of another model of the task's kind (its state replicated
        over the mesh)."""
        eval_step = jax.jit(
            training.make_eval_step(self.task, model_def), out_shardings=self.replicated
        )
        return self._held_out(eval_step, model_state)

    def save(self) -> None:
        meta = {"config": self.config, "history": self.history.to_json()}
        self.checkpoints.save(self.step, self.state, meta)

    def _record(self, step: int, metrics: dict[str, jax.Array], bar: tqdm) -> None:
        """Reads a step's metrics back from the devices (blocking) and logs them."""
        loss, finite, stop = jax.device_get((metrics["loss"], metrics["finite"], metrics["stop"]))
        loss = float(loss)
        self.stopping |= bool(stop)
        if not bool(finite):
            raise NonFiniteLoss(step, loss)
        self.history.train_step.append(step)
        self.history.train_loss.append(loss)
        bar.set_postfix_str(f"loss {loss:.4f}, {self.speed.text()}", refresh=False)

    # -- the loop -----------------------------------------------------------------------

    def fit(self, stop: StopFlag) -> str:
        """Trains up to ``--steps``; returns ``"completed"`` or ``"interrupted"``.

        Evaluates every ``--eval-every`` steps and checkpoints every
        ``--checkpoint-every`` steps, at the end, and when a stop is requested.
        Raises :class:`NonFiniteLoss` before saving anything non-finite.

        A stop (``stop``: Ctrl-C or SIGTERM) is voted: each step takes every process's
        vote and returns whether any voted, so that all processes read the same answer
        after the same step, save the same checkpoint and stop together.
        """
        args = self.args
        bar = tqdm(
            total=args.steps,
            initial=self.step,
            unit="step",
            # None: off when not a terminal; only process 0 shows progress
            disable=True if args.no_progress or not self.runtime.is_main else None,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        # The loss of the previous step is read back only after the next step is
        # dispatched, so the host prepares batches while the devices compute.
        pending = None
        clock = time.perf_counter()
        try:
            while self.step < args.steps:
                step = self.step + 1
                self.state, metrics = self._train_step(
                    self.state, self.train_batch(step), self._votes(stop)
                )
                self.step = step
                if pending is not None:
                    self._record(*pending, bar)
                pending = (step, metrics)
                bar.update(1)
                self.speed.tick()
                eval_now = step % args.eval_every == 0 or step == args.steps
                save_due = step % args.checkpoint_every == 0 or step == args.steps
                if eval_now or save_due or self.stopping:
                    self._record(*pending, bar)
                    pending = None
                    self.history.train_seconds += time.perf_counter() - clock
                    if eval_now:
                        self.history.evals.append(self.evaluate())
                        if self.runtime.is_main:
                            bar.write(self.eval_line(self.history.evals[-1]))
                    if save_due or self.stopping:
                        self.save()
                    self.speed.pause()
                    clock = time.perf_counter()
                if self.stopping and step < args.steps:
                    return "interrupted"
        finally:
            bar.close()
        if self.history.last_eval_step != self.step:
            # Resumed from the final checkpoint of a run that ended before evaluating.
            self.history.evals.append(self.evaluate())
        return "completed"

    def eval_line(self, result: dict[str, float]) -> str:
        return (
            f"step {result['step']:>6} | train loss {result['train_loss']:.4f} | "
            + self.task.eval_line(result)
        )

    # -- the end ------------------------------------------------------------------------

    def finish(self, outcome: str, wall_seconds: float) -> None:
        """Writes metrics.json, curves.png (and lm samples) and prints the summary
        (process 0 only; the others just wait for the last checkpoint)."""
        self.checkpoints.wait()
        if not self.runtime.is_main:
            return
        samples = []
        if outcome == "completed":
            # Sampling runs on this process's own copy of the (replicated) parameters.
            local = jax.tree.map(lambda x: x.addressable_data(0), self.state)
            samples = self.task.extras(training.merge_model(self.model_def, local), self.out)
        metrics = report.metrics_json(
            self.config,
            self.task,
            self.history,
            self.num_params,
            self.mesh,
            self.step,
            outcome,
            wall_seconds=wall_seconds,
            throughput=self.speed.rate(),
        )
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        report.plot_curves(
            self.history,
            self.out / "curves.png",
            title=report.title(self.args, self.task),
            references=self.task.plot_references(),
        )
        print(
            report.summary_table(metrics, self.task, self.out, self.checkpoints.all_steps()),
            flush=True,
        )
        for prompt, text in zip(self.task.prompts if samples else (), samples, strict=True):
            print(f"\n--- sample (prompt {prompt.decode()!r}) ---\n{text}")

    def header(self) -> str:
        return report.header(
            self.args, self.task, self.num_params, self.mesh, self.out, self.start_step
        )


def _with_stop_vote(train_step):
    """``step(state, batch, votes)``: ``train_step`` plus ``metrics["stop"]``, whether any
    process voted to stop (one vote per device, so the "or" is one small all-reduce)."""

    def step(state, batch, votes):
        new_state, metrics = train_step(state, batch)
        return new_state, metrics | {"stop": jnp.any(votes)}

    return step
