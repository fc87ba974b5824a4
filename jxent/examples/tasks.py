"""The example tasks: what each trains, with which jxent loss, and how it is scored.

A task owns its data, builds its model, and supplies pure functions of
``(model, batch)`` that the trainer (:mod:`jxent.examples.trainer`) compiles: the
training loss and a per-example evaluation. Batches are dicts of host NumPy
arrays whose leading axis is the batch axis (the trainer shards it over devices). In a
multi-process run each process asks only for its own rows of a batch (``rows``, a
slice of the global batch), and reads only those examples.

Besides, a task has four hooks, no-ops but for the distill task: ``device_batch``
completes a batch once on the devices (the teacher's top-k), ``evaluate_references``
scores fixed models on the held-out data once (the teacher), ``report_metrics`` adds to
``metrics.json`` and ``plot_references`` to the curves.

The tasks: :class:`jxent.examples.digits_task.DigitsTask`,
:class:`jxent.examples.lm_task.LMTask` and
:class:`jxent.examples.distill_task.DistillTask`, over what they share
(:mod:`jxent.examples.task_base`); the distill task's teacher is loaded by
:mod:`jxent.examples.teacher`.

Internal API: :func:`make_task`.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from jxent.examples.digits_task import DigitsTask
from jxent.examples.distill_task import DistillTask
from jxent.examples.lm_task import LMTask


def make_task(cfg: Any, num_devices: int, mesh: Mesh | None = None) -> DigitsTask | LMTask:
    """The task of ``cfg.task``; batches split over ``num_devices`` devices, and on
    ``mesh`` (the trainer's) the lm task's output layer runs vocabulary parallel."""
    tasks = {"digits": DigitsTask, "lm": LMTask, "distill": DistillTask}
    return tasks[cfg.task](cfg, num_devices, mesh)
