"""The digits task: scikit-learn's 8x8 handwritten digits, classified by an MLP.

Internal API: :class:`DigitsTask`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import jxent
from jxent.examples import data as data_lib
from jxent.examples import metrics as metrics_lib
from jxent.examples.models import MLPClassifier
from jxent.examples.task_base import (
    ALL_ROWS,
    Batch,
    EvalSet,
    SummaryRow,
    TaskHooks,
    padded_indices,
)


class DigitsTask(TaskHooks):
    """Classify scikit-learn's 8x8 digits with an MLP.

    ``loss`` picks the jxent loss family:

    - ``"xent"``: softmax cross-entropy with integer labels and label smoothing;
    - ``"focal"``: sigmoid focal loss on one-hot targets (one-vs-rest);
    - ``"bce"``: multi-label sigmoid binary cross-entropy on one-hot targets
      (ten independent yes/no outputs), with label smoothing.

    Every loss is summed over classes per example and averaged over the batch.
    """

    name = "digits"
    unit = "ex"  # throughput unit: examples

    def __init__(self, cfg: Any, num_devices: int, mesh: Mesh | None = None):
        self.cfg = cfg
        self.data = data_lib.load_digits()
        self.num_classes = self.data.num_classes
        self.schedule = data_lib.BatchSchedule(len(self.data.train), cfg.batch_size, cfg.seed)
        self.items_per_step = cfg.batch_size
        test = {"x": self.data.test.inputs, "y": self.data.test.labels}
        self._eval = EvalSet(test, [padded_indices(np.arange(len(self.data.test)), num_devices)])

    def init_model(self, rngs: nnx.Rngs) -> MLPClassifier:
        return MLPClassifier(
            self.data.train.inputs.shape[1],
            self.num_classes,
            hidden=self.cfg.hidden,
            depth=self.cfg.depth,
            rngs=rngs,
        )

    def train_batch(self, step: int, rows: slice = ALL_ROWS) -> Batch:
        x, y = self.data.train.take(self.schedule.indices(step - 1)[rows])
        return {"x": x, "y": y}

    def describe_batch(self, step: int) -> str:
        return self.schedule.describe(step - 1)

    def per_example_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.loss == "xent":
            return jxent.softmax_cross_entropy_with_integer_labels(
                logits, labels, label_smoothing=cfg.label_smoothing
            )
        one_hot = jax.nn.one_hot(labels, self.num_classes, dtype=logits.dtype)
        if cfg.loss == "focal":
            per_class = jxent.sigmoid_focal_loss(
                logits, one_hot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma
            )
        else:
            per_class = jxent.sigmoid_binary_cross_entropy(
                logits, one_hot, label_smoothing=cfg.label_smoothing
            )
        return per_class.sum(axis=-1)

    def loss(self, model: MLPClassifier, batch: Batch) -> jax.Array:
        return jnp.mean(self.per_example_loss(model(batch["x"]), batch["y"]))

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """The model's probability of each class: softmax for cross-entropy, and the
        independent per-class sigmoids for the one-vs-rest losses."""
        if self.cfg.loss == "xent":
            return jax.nn.softmax(logits, axis=-1)
        return jax.nn.sigmoid(logits)

    def eval_batches(self, rows=None) -> list:
        """The held-out batches (padded to split over the devices); with ``rows``, the
        pairs ``(this process's rows of a batch, its global row count)``."""
        return self._eval.full() if rows is None else self._eval.parts(rows)

    def eval_step(self, model: MLPClassifier, batch: Batch) -> dict[str, jax.Array]:
        logits = model(batch["x"])
        probs = self.probabilities(logits)
        pred = jnp.argmax(logits, axis=-1).astype(batch["y"].dtype)
        return {
            "loss": self.per_example_loss(logits, batch["y"]),
            "confidence": jnp.max(probs, axis=-1),
            "correct": pred == batch["y"],
            "valid": batch["valid"],
        }

    def summarize_eval(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        valid = out["valid"]
        ece = metrics_lib.expected_calibration_error(
            out["confidence"][valid], out["correct"][valid]
        )
        return {
            "val_loss": float(np.mean(out["loss"][valid])),
            "val_accuracy": float(np.mean(out["correct"][valid])),
            "val_ece": float(ece),
        }

    def describe(self) -> list[SummaryRow]:
        loss = {
            "xent": f"softmax_cross_entropy_with_integer_labels "
            f"(label_smoothing={self.cfg.label_smoothing})",
            "focal": f"sigmoid_focal_loss (alpha={self.cfg.focal_alpha}, "
            f"gamma={self.cfg.focal_gamma})",
            "bce": f"sigmoid_binary_cross_entropy, multi-label "
            f"(label_smoothing={self.cfg.label_smoothing})",
        }[self.cfg.loss]
        return [
            SummaryRow(
                "data",
                f"sklearn digits: {len(self.data.train)} train / {len(self.data.test)} held out",
            ),
            SummaryRow("loss", f"jxent.{loss}"),
        ]

    def final_metric_rows(self, final: dict[str, float]) -> list[SummaryRow]:
        return [
            SummaryRow("held-out accuracy", f"{100 * final['val_accuracy']:.2f}%"),
            SummaryRow("held-out loss", f"{final['val_loss']:.4f}"),
            SummaryRow("held-out calibration error (ECE)", f"{final['val_ece']:.4f}"),
        ]

    def eval_line(self, final: dict[str, float]) -> str:
        return (
            f"val loss {final['val_loss']:.4f} | accuracy {100 * final['val_accuracy']:.2f}% "
            f"| ECE {final['val_ece']:.4f}"
        )

    def extras(self, model: MLPClassifier, out_dir) -> list[str]:
        return []
