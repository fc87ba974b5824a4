"""What every example task shares: its batches, its summary rows and its hooks.

Batches are dicts of host NumPy arrays whose leading axis is the batch axis. Held-out
batches are padded to split evenly over the devices, with a ``"valid"`` mask
(:func:`pad_rows`, :func:`padded_indices`); an :class:`EvalSet` keeps them as index
arrays, so that each process of a multi-process run gathers only its own rows
(:func:`gather_rows`). :class:`TaskHooks` holds the hooks' defaults, which do nothing:
only the distill task has a teacher to run, score, report and plot.

Internal API: :data:`Batch`, :data:`ALL_ROWS`, :func:`pad_rows`, :func:`padded_indices`,
:func:`gather_rows`, :class:`EvalSet`, :class:`SummaryRow`, :class:`TaskHooks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]
ALL_ROWS = slice(None)


def pad_rows(batch: Batch, multiple: int) -> Batch:
    """Pads every array's leading axis to a multiple of ``multiple`` with zeros, adding a
    boolean ``"valid"`` mask, so that evaluation batches split evenly over devices."""
    n = len(next(iter(batch.values())))
    extra = -n % multiple
    out = {
        k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in batch.items()
    }
    out["valid"] = np.arange(n + extra) < n
    return out


def padded_indices(indices: np.ndarray, multiple: int) -> np.ndarray:
    """``indices`` padded with ``-1`` (no example) to a multiple of ``multiple``."""
    return np.concatenate([indices, np.full(-len(indices) % multiple, -1, indices.dtype)])


def gather_rows(arrays: dict[str, np.ndarray], indices: np.ndarray) -> Batch:
    """The rows ``indices`` of ``arrays`` (``-1``: a zero row), with the ``"valid"`` mask
    of :func:`pad_rows`."""
    valid = indices >= 0
    out = {}
    for k, v in arrays.items():
        rows = v[np.where(valid, indices, 0)]
        out[k] = np.where(valid.reshape((-1,) + (1,) * (v.ndim - 1)), rows, np.zeros((), v.dtype))
    out["valid"] = valid
    return out


class EvalSet:
    """Held-out batches as padded index arrays: a process gathers only its own rows."""

    def __init__(self, arrays: dict[str, np.ndarray], batches: list[np.ndarray]):
        self.arrays, self.batches = arrays, batches

    def full(self) -> list[Batch]:
        return [gather_rows(self.arrays, idx) for idx in self.batches]

    def parts(self, rows) -> list[tuple[Batch, int]]:
        """``(this process's rows of each batch, the batch's global row count)``;
        ``rows(n)`` is the slice of a batch of ``n`` rows that the process holds."""
        return [(gather_rows(self.arrays, idx[rows(len(idx))]), len(idx)) for idx in self.batches]


@dataclass(frozen=True)
class SummaryRow:
    name: str
    value: str


class TaskHooks:
    """The hooks of a task that has no teacher: each does nothing."""

    def device_batch(self, batch: dict) -> dict:
        """The batch, once placed on the devices, completed with what the loss needs."""
        return batch

    def evaluate_references(self, evaluate) -> None:
        """Scores fixed models once: ``evaluate(model_def, model_state)`` is the held-out
        evaluation (the :meth:`summarize_eval` dict) of any model of the task's kind."""

    def report_metrics(self, final: dict[str, float]) -> dict[str, Any]:
        """Entries to add to ``metrics.json``, given the final evaluation."""
        return {}

    def plot_references(self) -> dict[str, list]:
        """Lines to add to the curves: ``{metric: [(label, steps or None, values)]}``
        (``None``: a constant, a horizontal line)."""
        return {}
