"""The distill task's student: a byte transformer distilled from a frozen teacher.

Internal API: :class:`DistillTask`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent.examples import data as data_lib
from jxent.examples.lm_task import LMTask
from jxent.examples.models import ByteTransformer
from jxent.examples.task_base import Batch, SummaryRow
from jxent.examples.teacher import describe_layers, load_teacher
from jxent.examples.teacher_dir import teacher_directory

# The mesh axes a batch is split over, "model" major: the trainer's batch sharding
# (trainer.BATCH_AXES).
BATCH_AXES = ("model", "data")


class DistillTask(LMTask):
    """A small byte transformer distilled from a larger one (the teacher, frozen).

    The student's loss is :func:`jxent.linear_distillation_loss`, fused from its hidden
    states: ``alpha`` times the cross-entropy of the data's next bytes plus ``1 - alpha``
    times ``T^2 KL(teacher || student)`` over the teacher's top-k bytes, whose
    log-probabilities ``jax.lax.top_k(jax.nn.log_softmax(teacher_logits / T), k)`` are
    computed from the teacher's logits for each batch once it is on the devices
    (:meth:`device_batch`). Scored like the lm task, in held-out bits per byte, with the
    teacher's (and, with ``--baseline``, a student trained without it) beside it.

    The top-k divergence has no term for the bytes outside the teacher's top k: it pulls
    the student's probability off them (its minimum puts ``p_k / sum_k p_k`` on the top
    k), and more so at a higher ``T``, where the top k hold less of the teacher's mass;
    the cross-entropy term keeps the tail alive. Hence ``T = 1`` by default: on the
    default run ``T = 2`` ends worse than the student trained without the teacher.

    On the trainer's mesh the loss runs data parallel over every device (each takes its
    rows of the batch under ``jax.shard_map``, the sums are added with ``psum``):
    ``jxent.parallel`` has no vocabulary-parallel distillation loss. The evaluation's
    cross-entropy is the lm task's (vocabulary parallel over ``"model"``).
    """

    name = "distill"

    def __init__(self, cfg: Any, num_devices: int, mesh: Mesh | None = None):
        super().__init__(cfg, num_devices, mesh)
        self.teacher = load_teacher(teacher_directory(cfg), mesh, max_len=cfg.seq_len)
        self.teacher_eval: dict[str, float] | None = None
        self.baseline = None  # the final evaluation and history of the --baseline run
        if cfg.baseline:
            path = Path(cfg.out_dir) / "baseline" / "metrics.json"
            try:
                self.baseline = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"--baseline: cannot read the baseline's {path}: {e}") from None
        shard = None if mesh is None else NamedSharding(mesh, P(BATCH_AXES))
        self._top_k = jax.jit(self._teacher_top_k, out_shardings=shard)

    def _teacher_top_k(self, teacher_state: nnx.State, tokens: jax.Array) -> dict:
        """The teacher's top-k next bytes at each position and their log-probabilities at
        the temperature (the teacher's ``[batch, length, 256]`` logits are small)."""
        logits = nnx.merge(self.teacher.model_def, teacher_state).logits(tokens)
        log_p = jax.nn.log_softmax(logits / self.cfg.temperature, axis=-1)
        log_p, index = jax.lax.top_k(jax.lax.stop_gradient(log_p), self.cfg.top_k)
        return {"teacher_index": index.astype(jnp.int32), "teacher_log_probs": log_p}

    def device_batch(self, batch: dict) -> dict:
        return batch | self._top_k(self.teacher.state, batch["tokens"])

    def distillation_loss(self, x, w, labels, index, log_p) -> jax.Array:
        """The mean loss of the tokens with a label: hidden states ``x [tokens, D]``, the
        unembedding ``w [D, V]``, the teacher's ``index``/``log_p`` ``[tokens, k]``."""
        cfg = self.cfg

        def summed(x, w, labels, index, log_p, reduction):
            return jxent.linear_distillation_loss(
                x,
                w,
                labels,
                (index, log_p),
                alpha=cfg.alpha,
                temperature=cfg.temperature,
                where=labels != data_lib.PAD,
                reduction=reduction,
                chunk_size=cfg.chunk_size,
            )

        if self.mesh is None:
            return summed(x, w, labels, index, log_p, "mean")

        def local(x, w, labels, index, log_p):
            total = summed(x, w, labels, index, log_p, "sum")
            count = jnp.sum(labels != data_lib.PAD)
            return jax.lax.psum(total, BATCH_AXES), jax.lax.psum(count, BATCH_AXES)

        rows = P(BATCH_AXES)
        total, count = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(P(BATCH_AXES, None), P(), rows, P(BATCH_AXES, None), P(BATCH_AXES, None)),
            out_specs=(P(), P()),
        )(x, w, labels, index, log_p)
        return total / jnp.maximum(count, 1).astype(total.dtype)

    def loss(self, model: ByteTransformer, batch: Batch) -> jax.Array:
        hidden = model(batch["tokens"])
        k = self.cfg.top_k
        return self.distillation_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            model.unembedding(),
            batch["labels"].reshape(-1),
            batch["teacher_index"].reshape(-1, k),
            batch["teacher_log_probs"].reshape(-1, k),
        )

    def evaluate_references(self, evaluate) -> None:
        self.teacher_eval = evaluate(self.teacher.model_def, self.teacher.state)

    def describe(self) -> list[SummaryRow]:
        cfg = self.cfg
        return [
            super().describe()[0],
            SummaryRow(
                "loss",
                f"jxent.linear_distillation_loss (alpha={cfg.alpha}, temperature={cfg.temperature}"
                f", the teacher's top {cfg.top_k} bytes)",
            ),
            SummaryRow("teacher", self.teacher.describe()),
            SummaryRow(
                "student",
                f"d_model {cfg.d_model}, {describe_layers(cfg.num_layers)}",
            ),
        ]

    def _bits(self) -> dict[str, float]:
        out = {"teacher": self.teacher_eval["val_bits_per_byte"]}
        if self.baseline is not None:
            out["without teacher"] = self.baseline["final"]["val_bits_per_byte"]
        return out

    def final_metric_rows(self, final: dict[str, float]) -> list[SummaryRow]:
        bits = self._bits()
        rows = [
            SummaryRow("held-out cross-entropy (nats/byte)", f"{final['val_loss']:.4f}"),
            SummaryRow("held-out bits per byte: teacher", f"{bits['teacher']:.4f}"),
            SummaryRow("held-out bits per byte: student", f"{final['val_bits_per_byte']:.4f}"),
        ]
        if "without teacher" in bits:
            rows.append(
                SummaryRow(
                    "held-out bits per byte: without teacher",
                    f"{bits['without teacher']:.4f} (the student's model, cross-entropy only, "
                    f"{self.baseline['steps_done']} steps)",
                )
            )
        return rows

    def eval_line(self, final: dict[str, float]) -> str:
        return super().eval_line(final) + f" (teacher {self._bits()['teacher']:.3f})"

    def report_metrics(self, final: dict[str, float]) -> dict[str, Any]:
        t = self.teacher
        report = {
            "teacher": {
                "val_loss": self.teacher_eval["val_loss"],
                "val_bits_per_byte": self.teacher_eval["val_bits_per_byte"],
                "parameters": t.num_params,
                "directory": str(t.directory),
                "step": t.step,
                "config": t.config,
            },
            "student": {k: final[k] for k in ("val_loss", "val_bits_per_byte") if k in final},
            "baseline": None,
            "alpha": self.cfg.alpha,
            "temperature": self.cfg.temperature,
            "top_k": self.cfg.top_k,
        }
        if self.baseline is not None:
            report["baseline"] = {
                "val_loss": self.baseline["final"]["val_loss"],
                "val_bits_per_byte": self.baseline["final"]["val_bits_per_byte"],
                "parameters": self.baseline["parameters"],
                "steps": self.baseline["steps_done"],
            }
        return {"distillation": report}

    def plot_references(self) -> dict[str, list]:
        lines = [("teacher", None, [self.teacher_eval["val_bits_per_byte"]])]
        if self.baseline is not None:
            evals = self.baseline["history"]["eval"]
            lines.append(
                (
                    "without teacher",
                    [e["step"] for e in evals],
                    [e["val_bits_per_byte"] for e in evals],
                )
            )
        return {"val_bits_per_byte": lines}

    def extras(self, model: ByteTransformer, out_dir) -> list[str]:
        return []
