"""The training loop: data parallel steps, evaluation, checkpoints, progress and reports.

:class:`Trainer` is driven by the command line in :mod:`jxent.examples.train`. The
parameters and optimizer state are replicated over a 1-D device mesh and every
batch is split over its ``"data"`` axis (``NamedSharding``), so the same code runs
on one CPU, several GPUs or a TPU slice; XLA inserts the gradient all-reduce.
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
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jxent.examples import report, training
from jxent.examples.checkpointing import Checkpoints
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


def make_mesh(num_devices: int | None) -> Mesh:
    """A 1-D ``"data"`` mesh over the first ``num_devices`` local devices (all by default)."""
    devices = jax.local_devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise SetupError(
                f"--num-devices {num_devices}: only {len(devices)} local device(s) available"
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), ("data",))


class Trainer:
    """One run: builds the task, model and optimizer (or restores them) and trains.

    Args:
      args: the resolved flags (see :mod:`jxent.examples.train`).
      config: the run's settings, saved with every checkpoint.
      out: the output directory (already checked).
      checkpoints: the run's checkpoints; with ``resume_step`` the state is restored
        from that step.
    """

    def __init__(
        self,
        args: Any,
        config: dict[str, Any],
        out: Path,
        checkpoints: Checkpoints,
        resume_step: int | None = None,
    ):
        self.args, self.config, self.out, self.checkpoints = args, config, out, checkpoints
        self.mesh = make_mesh(args.num_devices)
        num_devices = self.mesh.devices.size
        if args.batch_size % num_devices:
            raise SetupError(
                f"--batch-size {args.batch_size} must be a multiple of the {num_devices} devices"
            )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        try:
            self.task = make_task(args, num_devices)
        except ValueError as e:  # e.g. a batch larger than the data set
            raise SetupError(str(e)) from None

        tx = training.make_optimizer(
            learning_rate=args.learning_rate,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
        )
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
            training.make_train_step(self.task, self.model_def, opt_def),
            out_shardings=(self.replicated, self.replicated),
        )
        self._eval_step = jax.jit(training.make_eval_step(self.task, self.model_def))
        self.speed = report.Throughput(self.task.items_per_step, self.task.unit)

    # -- pieces -------------------------------------------------------------------------

    def shard(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Places a host batch on the devices, split along its leading (batch) axis."""
        return jax.device_put(batch, self.batch_sharding)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current parameters, plus the recent training loss."""
        outs = [
            jax.device_get(self._eval_step(self.state["model"], self.shard(b)))
            for b in self.task.eval_batches()
        ]
        merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return (
            {"step": self.step}
            | self.task.summarize_eval(merged)
            | {"train_loss": self.history.mean_train_loss(self.history.last_eval_step)}
        )

    def save(self) -> None:
        meta = {"config": self.config, "history": self.history.to_json()}
        self.checkpoints.save(self.step, self.state, meta)

    def _record(self, step: int, metrics: dict[str, jax.Array], bar: tqdm) -> None:
        """Reads a step's metrics back from the devices (blocking) and logs them."""
        loss, finite = float(metrics["loss"]), bool(metrics["finite"])
        if not finite:
            raise NonFiniteLoss(step, loss)
        self.history.train_step.append(step)
        self.history.train_loss.append(loss)
        bar.set_postfix_str(f"loss {loss:.4f}, {self.speed.text()}", refresh=False)

    # -- the loop -----------------------------------------------------------------------

    def fit(self, stop: StopFlag) -> str:
        """Trains up to ``--steps``; returns ``"completed"`` or ``"interrupted"``.

        Evaluates every ``--eval-every`` steps and checkpoints every
        ``--checkpoint-every`` steps, at the end, and when ``stop`` is raised.
        Raises :class:`NonFiniteLoss` before saving anything non-finite.
        """
        args = self.args
        bar = tqdm(
            total=args.steps,
            initial=self.step,
            unit="step",
            disable=True if args.no_progress else None,  # None: off when not a terminal
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
                    self.state, self.shard(self.task.train_batch(step))
                )
                self.step = step
                if pending is not None:
                    self._record(*pending, bar)
                pending = (step, metrics)
                bar.update(1)
                self.speed.tick()
                eval_now = step % args.eval_every == 0 or step == args.steps
                save_now = step % args.checkpoint_every == 0 or step == args.steps or stop
                if eval_now or save_now:
                    self._record(*pending, bar)
                    pending = None
                    self.history.train_seconds += time.perf_counter() - clock
                    if eval_now:
                        self.history.evals.append(self.evaluate())
                        bar.write(self.eval_line(self.history.evals[-1]))
                    if save_now:
                        self.save()
                    self.speed.pause()
                    clock = time.perf_counter()
                if stop and step < args.steps:
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
        """Writes metrics.json, curves.png (and lm samples) and prints the summary."""
        self.checkpoints.wait()
        samples = []
        if outcome == "completed":
            samples = self.task.extras(training.merge_model(self.model_def, self.state), self.out)
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
            self.history, self.out / "curves.png", title=report.title(self.args, self.task)
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
