"""What the trainer shows and writes: the header, throughput, summary table, JSON, plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax


def title(args, task) -> str:
    what = {
        "digits": f"digits, loss {getattr(args, 'loss', '')}",
        "lm": "byte-level LM",
        "distill": "byte-level LM distillation",
    }
    return f"jxent example: {what[args.task]}"


def _devices_text(mesh) -> str:
    if num_processes(mesh) > 1:
        return layout(mesh)
    kinds = ", ".join(sorted({d.device_kind for d in mesh.devices.flat}))
    backend = jax.default_backend()
    return f"{mesh.devices.size} x {kinds}" + ("" if kinds == backend else f" ({backend})")


def num_processes(mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def layout(mesh) -> str:
    """The processes and devices of a run, e.g. ``"2 processes x 2 cpu devices"``."""
    processes = num_processes(mesh)
    per_process = mesh.devices.size // processes
    kinds = ", ".join(sorted({d.device_kind for d in mesh.devices.flat}))
    return (
        f"{processes} process{'es' if processes > 1 else ''} x {per_process} {kinds} "
        f"device{'s' if per_process > 1 else ''}"
    )


def header(args, task, n_params: int, mesh, out: Path, start_step: int) -> str:
    rows = "examples" if task.unit == "ex" else "sequences"
    parallel = f"data parallel over {_devices_text(mesh)}"
    if task.name in ("lm", "distill") and mesh.shape["model"] > 1:
        parallel += f", output layer vocabulary parallel over {mesh.shape['model']} of them"
        if task.name == "distill":
            parallel += " in evaluation (the distillation loss is data parallel)"
    lines = [
        f"{title(args, task)}: {n_params:,} parameters, {parallel}",
        f"  {args.steps} steps of {args.batch_size} {rows}; output in {out}",
    ]
    if start_step:
        lines.append(f"  resuming from the checkpoint at step {start_step}")
    return "\n".join(lines)


class Throughput:
    """Items per second over the training steps, excluding compilation, evaluation and
    checkpointing (the first step after a pause only restarts the clock)."""

    def __init__(self, items_per_step: int, unit: str):
        self.items_per_step, self.unit = items_per_step, unit
        self._last: float | None = None
        self._steps = 0
        self._seconds = 0.0
        self._window: list[float] = []  # times of the recent steps

    def tick(self) -> None:
        """Marks the end of a step."""
        now = time.perf_counter()
        if self._last is not None:
            self._steps += 1
            self._seconds += now - self._last
        self._last = now
        self._window = (self._window + [now])[-20:]

    def pause(self) -> None:
        self._last = None
        self._window = []

    def rate(self) -> float:
        """Mean items per second so far."""
        return self._steps * self.items_per_step / self._seconds if self._seconds else 0.0

    def text(self) -> str:
        """The recent rate, e.g. ``"41.2k ex/s"``."""
        if len(self._window) < 2:
            rate = self.rate()
        else:
            span = max(self._window[-1] - self._window[0], 1e-9)
            rate = (len(self._window) - 1) * self.items_per_step / span
        return f"{_si(rate)} {self.unit}/s"


def _si(x: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= factor:
            return f"{x / factor:.1f}{suffix}"
    return f"{x:.0f}"


def metrics_json(
    config, task, history, n_params, mesh, step, outcome, *, wall_seconds, throughput
) -> dict[str, Any]:
    final = dict(history.evals[-1]) if history.evals else {}
    return {
        "task": config["task"],
        "outcome": outcome,
        "steps_done": step,
        "config": config,
        "parameters": n_params,
        "devices": int(mesh.devices.size),
        "processes": num_processes(mesh),
        "layout": layout(mesh),
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "backend": jax.default_backend(),
        "final": final,
        "wall_seconds": wall_seconds,
        "train_seconds": history.train_seconds,
        "throughput_per_second": throughput,
        "throughput_unit": task.unit,
        "history": history.to_json(),
    } | task.report_metrics(final)


def summary_table(metrics: dict[str, Any], task, out: Path, checkpoint_steps: list[int]) -> str:
    """The end-of-run table: what was trained, how, the final metrics, where they are."""
    final = metrics["final"]
    cfg = metrics["config"]
    rows = [("task", f"{metrics['task']} ({metrics['outcome']} at step {metrics['steps_done']})")]
    rows += [(r.name, r.value) for r in task.describe()]
    rows += [
        ("parameters", f"{metrics['parameters']:,}"),
        (
            "devices",
            f"{metrics['layout']}; mesh data {metrics['mesh']['data']} x model "
            f"{metrics['mesh']['model']}, batch split over all",
        ),
        (
            "optimizer",
            f"adamw, lr {cfg['learning_rate']:g} (warm-up {cfg['warmup_steps']}, cosine), "
            f"weight decay {cfg['weight_decay']:g}, clip {cfg['grad_clip']:g}",
        ),
    ]
    if final:
        evals = metrics["history"]["eval"]
        first = evals[-2]["step"] + 1 if len(evals) > 1 else 1
        rows.append((f"train loss (steps {first}-{final['step']})", f"{final['train_loss']:.4f}"))
        rows += [(r.name, r.value) for r in task.final_metric_rows(final)]
    unit = {"ex": "examples", "byte": "bytes"}[metrics["throughput_unit"]]
    rows += [
        (
            "wall time",
            f"{metrics['wall_seconds']:.1f} s ({metrics['train_seconds']:.1f} s in training steps)",
        ),
        (
            "throughput",
            f"{metrics['throughput_per_second']:,.0f} {unit}/s"
            if metrics["throughput_per_second"]
            else "- (no training steps in this invocation)",
        ),
        ("outputs", f"{out / 'metrics.json'}, {out / 'curves.png'}"),
        ("checkpoints", f"{out / 'checkpoints'} (steps {', '.join(map(str, checkpoint_steps))})"),
    ]
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = f"+-{'-' * width}-+-{'-' * value_width}-+"
    lines = [rule] + [f"| {n:<{width}} | {v:<{value_width}} |" for n, v in rows] + [rule]
    return "\n".join(lines)


_METRIC_NAMES = {
    "val_accuracy": "accuracy",
    "val_ece": "expected calibration error",
    "val_bits_per_byte": "bits per byte",
}


def plot_curves(history, path: Path, *, title: str, references: dict | None = None) -> None:
    """Training loss per step, held-out loss and the other held-out metrics per evaluation;
    ``references`` adds other models' lines to a metric's panel: ``{metric: [(label,
    steps, values)]}``, ``steps`` None for a constant (a horizontal line)."""
    references = references or {}
    # Here: pyplot must load after the file-only backend is chosen, and only to plot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = [k for k in (history.evals[0] if history.evals else {}) if k.startswith("val_")]
    extra = [k for k in extra if k != "val_loss"]
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(5 * (1 + len(extra)), 4))
    axes = list(axes) if extra else [axes]
    ax = axes[0]
    ax.plot(history.train_step, history.train_loss, lw=0.8, alpha=0.5, label="train (per step)")
    if history.evals:
        steps = [e["step"] for e in history.evals]
        ax.plot(steps, [e["train_loss"] for e in history.evals], "o-", label="train (mean)")
        ax.plot(steps, [e["val_loss"] for e in history.evals], "s-", label="held out")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    for ax, key in zip(axes[1:], extra, strict=True):
        steps = [e["step"] for e in history.evals]
        ax.plot(steps, [e[key] for e in history.evals], "s-", label="this run")
        ax.set(xlabel="step", title=f"{_METRIC_NAMES.get(key, key)} (held out)")
        for label, ref_steps, values in references.get(key, []):
            if ref_steps is None:
                ax.axhline(values[0], ls="--", color="gray", label=label)
            else:
                ax.plot(ref_steps, values, "^:", label=label)
        if references.get(key):
            ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
