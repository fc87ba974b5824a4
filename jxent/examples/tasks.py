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
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent.examples import data as data_lib
from jxent.examples import metrics as metrics_lib
from jxent.examples import training
from jxent.examples.checkpointing import Checkpoints
from jxent.examples.models import ByteTransformer, MLPClassifier, count_params

Batch = dict[str, np.ndarray]
ALL_ROWS = slice(None)
# The mesh axes a batch is split over, "model" major: the trainer's batch sharding
# (trainer.BATCH_AXES).
BATCH_AXES = ("model", "data")


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


class LMTask(TaskHooks):
    """A byte-level decoder-only transformer on the standard library's Python sources.

    Trained with :func:`jxent.linear_softmax_cross_entropy` on the final hidden
    states and the (tied) unembedding, with ``z_loss`` and ``ignore_index`` for
    the padding at the end of each file; scored in bits per byte.
    """

    name = "lm"
    unit = "byte"  # throughput unit: predicted bytes (tokens)
    prompts = (b"def ", b"import ", b"class ")
    # Periodic evaluations use at most this many held-out rows (evenly spaced).
    max_eval_rows = 512

    def __init__(self, cfg: Any, num_devices: int, mesh: Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh
        self.corpus = data_lib.load_byte_corpus(cfg.seq_len, cfg.corpus_bytes)
        self.schedule = data_lib.BatchSchedule(len(self.corpus.train), cfg.batch_size, cfg.seed)
        self.items_per_step = cfg.batch_size * cfg.seq_len
        val = self.corpus.val
        rows = np.unique(
            np.linspace(0, len(val) - 1, min(len(val), self.max_eval_rows)).astype(int)
        )
        self.num_eval_rows = len(rows)
        per_batch = cfg.batch_size
        # Batches of --batch-size rows (the last one padded), each also a multiple of the
        # number of devices.
        batches = [
            padded_indices(padded_indices(rows[i : i + per_batch], per_batch), num_devices)
            for i in range(0, len(rows), per_batch)
        ]
        self._eval = EvalSet({"tokens": val.inputs, "labels": val.labels}, batches)

    def init_model(self, rngs: nnx.Rngs) -> ByteTransformer:
        cfg = self.cfg
        return ByteTransformer(
            data_lib.NUM_BYTES,
            cfg.seq_len,
            d_model=cfg.d_model,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            rngs=rngs,
        )

    def train_batch(self, step: int, rows: slice = ALL_ROWS) -> Batch:
        tokens, labels = self.corpus.train.take(self.schedule.indices(step - 1)[rows])
        return {"tokens": tokens, "labels": labels}

    def describe_batch(self, step: int) -> str:
        return self.schedule.describe(step - 1).replace("training examples", "sequences")

    def _token_losses(
        self, model: ByteTransformer, tokens, labels, z_loss: float, reduction: str
    ) -> jax.Array:
        hidden = model(tokens)
        return self.output_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            model.unembedding(),
            labels.reshape(-1),
            z_loss=z_loss,
            reduction=reduction,
        )

    def output_loss(self, x, w, labels, *, z_loss: float, reduction: str) -> jax.Array:
        """The fused loss of the output layer: hidden states ``x [tokens, D]``, the
        unembedding ``w [D, V]``. Without a mesh, :func:`jxent.linear_softmax_cross_entropy`;
        on the trainer's mesh, vocabulary parallel: under ``jax.shard_map`` each device
        takes its ``"data"`` shard of the tokens (the batch, split over every device in
        the rest of the model, is gathered over ``"model"``) and its ``"model"`` shard of
        the columns of ``w``, and :func:`jxent.parallel.linear_softmax_cross_entropy`
        combines the shards' per-token numbers across the ``"model"`` axis (across the
        processes, in a multi-process run)."""
        options = dict(
            ignore_index=data_lib.PAD,
            z_loss=z_loss,
            reduction=reduction,
            chunk_size=self.cfg.chunk_size,
        )
        if self.mesh is None:
            return jxent.linear_softmax_cross_entropy(x, w, labels, **options)
        shards, vocab = self.mesh.shape["model"], w.shape[1]
        # jxent.parallel's padding rule: columns up to a multiple of the shards.
        w = jnp.pad(w, ((0, 0), (0, -vocab % shards)))

        def local(x, w, labels):
            return jxent.parallel.linear_softmax_cross_entropy(
                x,
                w,
                labels,
                axis_name="model",
                batch_axis_name="data",
                num_classes=vocab,
                **options,
            )

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(P("data", None), P(None, "model"), P("data")),
            out_specs=P("data") if reduction == "none" else P(),
        )(x, w, labels)

    def loss(self, model: ByteTransformer, batch: Batch) -> jax.Array:
        return self._token_losses(model, batch["tokens"], batch["labels"], self.cfg.z_loss, "mean")

    def eval_batches(self, rows=None) -> list:
        """The held-out batches (padded to split over the devices); with ``rows``, the
        pairs ``(this process's rows of a batch, its global row count)``."""
        return self._eval.full() if rows is None else self._eval.parts(rows)

    def eval_step(self, model: ByteTransformer, batch: Batch) -> dict[str, jax.Array]:
        # Rows that only pad the batch are ignored like the padding inside rows.
        labels = jnp.where(batch["valid"][:, None], batch["labels"], data_lib.PAD)
        # Pure cross-entropy (no z-loss): the model's code length of the held-out bytes.
        nats = self._token_losses(model, batch["tokens"], labels, 0.0, "none")
        return {
            "nats": jnp.sum(nats.reshape(labels.shape), axis=-1),
            "count": jnp.sum(labels != data_lib.PAD, axis=-1),
        }

    def summarize_eval(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        loss = float(np.sum(out["nats"], dtype=np.float64) / max(1, int(np.sum(out["count"]))))
        return {"val_loss": loss, "val_bits_per_byte": metrics_lib.bits_per_byte(loss)}

    def describe(self) -> list[SummaryRow]:
        c = self.corpus
        return [
            SummaryRow(
                "data",
                f"{len(c.files)} stdlib .py files, {c.num_bytes / 1e6:.2f} MB: "
                f"{len(c.train)} train / {len(c.val)} held-out sequences of {self.cfg.seq_len}",
            ),
            SummaryRow(
                "loss",
                f"jxent.linear_softmax_cross_entropy (z_loss={self.cfg.z_loss}, "
                f"ignore_index={data_lib.PAD})",
            ),
        ]

    def final_metric_rows(self, final: dict[str, float]) -> list[SummaryRow]:
        return [
            SummaryRow("held-out loss (nats/byte)", f"{final['val_loss']:.4f}"),
            SummaryRow("held-out bits per byte", f"{final['val_bits_per_byte']:.4f}"),
        ]

    def eval_line(self, final: dict[str, float]) -> str:
        return f"val loss {final['val_loss']:.4f} | {final['val_bits_per_byte']:.3f} bits/byte"

    def extras(self, model: ByteTransformer, out_dir) -> list[str]:
        """Samples a continuation of each prompt; writes them to ``samples.txt``
        (nothing with ``--sample-bytes 0``)."""
        if self.cfg.sample_bytes == 0:
            return []
        texts = sample(
            model,
            self.prompts,
            num_new=self.cfg.sample_bytes,
            max_len=self.cfg.seq_len,
            temperature=self.cfg.temperature,
            seed=self.cfg.seed,
        )
        (out_dir / "samples.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        return texts


def sample(
    model: ByteTransformer,
    prompts: tuple[bytes, ...],
    *,
    num_new: int,
    max_len: int,
    temperature: float,
    seed: int,
) -> list[str]:
    """Samples ``num_new`` bytes after each prompt (a sliding window of ``max_len``)."""
    graphdef, state = nnx.split(model)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = max(int(lengths.max()) + num_new, max_len)
    buf = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = np.frombuffer(p, np.uint8)
    out = _generate(
        graphdef, state, buf, lengths, jax.random.key(seed), num_new, max_len, temperature
    )
    out = np.asarray(out)
    return [
        bytes(out[i, : lengths[i] + num_new].astype(np.uint8)).decode("utf-8", errors="replace")
        for i in range(len(prompts))
    ]


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _generate(graphdef, state, buf, lengths, key, num_new, max_len, temperature):
    model = nnx.merge(graphdef, state)
    width = buf.shape[1]

    def one_row(row, start, key):
        def body(i, row):
            pos = start + i  # the position being generated
            lo = jnp.clip(pos - max_len, 0, width - max_len)
            window = jax.lax.dynamic_slice(row, (lo,), (max_len,))
            logits = model.logits(window[None])[0]
            last = jax.lax.dynamic_index_in_dim(logits, pos - 1 - lo, keepdims=False)
            token = jax.random.categorical(jax.random.fold_in(key, i), last / temperature)
            return row.at[pos].set(token.astype(row.dtype))

        return jax.lax.fori_loop(0, num_new, body, row)

    keys = jax.random.split(key, buf.shape[0])
    return jax.vmap(one_row)(buf, lengths, keys)


# ------------------------------------------------------------------------- distillation


def _layers(n: int) -> str:
    return f"{n} layer{'s' if n > 1 else ''}"


def teacher_directory(cfg: Any) -> Path:
    """Where the distill task's teacher is: ``--teacher-checkpoint``, else the lm run the
    task trains first in ``<out-dir>/teacher``."""
    if cfg.teacher_checkpoint is not None:
        return Path(cfg.teacher_checkpoint)
    return Path(cfg.out_dir) / "teacher"


@dataclass(frozen=True)
class Teacher:
    """A trained byte transformer, frozen: its graph, its parameters (replicated over the
    mesh), its lm run's settings and the step of the checkpoint."""

    model_def: nnx.GraphDef
    state: nnx.State
    config: dict[str, Any]
    step: int
    directory: Path
    num_params: int

    def describe(self) -> str:
        c = self.config
        return (
            f"d_model {c['d_model']}, {_layers(c['num_layers'])}, {self.num_params:,} parameters "
            f"(lm run {self.directory}, step {self.step} of {c['steps']})"
        )


def teacher_checkpoints(directory: Path) -> Path:
    """The checkpoint folder of an lm run given by its ``--out-dir`` (or the folder
    itself); raises ``ValueError`` if it holds no checkpoint."""
    directory = Path(directory)
    folder = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    if not folder.is_dir() or not any(p.name.isdigit() for p in folder.iterdir()):
        raise ValueError(f"the teacher: no checkpoint in {folder}")
    return folder


def load_teacher(directory: Path, mesh: Mesh | None = None, max_len: int | None = None) -> Teacher:
    """The latest checkpoint of an lm run (its ``--out-dir`` or ``checkpoints/`` folder),
    its parameters replicated over ``mesh``; raises ``ValueError`` with the reason if
    there is none, or if it cannot read sequences of ``max_len`` bytes."""
    directory = Path(directory)
    folder = teacher_checkpoints(directory)
    checkpoints = Checkpoints(folder, keep=1 << 20)
    try:
        step = checkpoints.latest_step()
        config = checkpoints.read_meta(step)["config"]
        if config.get("task") != "lm":
            raise ValueError(
                f"the teacher must be an lm run; {directory} holds a {config.get('task')} run"
            )
        if max_len is not None and config["seq_len"] < max_len:
            raise ValueError(
                f"the teacher in {directory} reads at most {config['seq_len']} bytes (its "
                f"--seq-len); --seq-len {max_len} is longer"
            )
        cfg = SimpleNamespace(**config)
        shape = SimpleNamespace(
            init_model=lambda rngs: ByteTransformer(
                data_lib.NUM_BYTES,
                cfg.seq_len,
                d_model=cfg.d_model,
                num_layers=cfg.num_layers,
                num_heads=cfg.num_heads,
                rngs=rngs,
            )
        )
        tx = training.make_optimizer(
            learning_rate=cfg.learning_rate,
            steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip,
        )
        # The state's structure, to restore into (the optimizer's part is dropped): traced,
        # not computed.
        defs = {}

        def build():
            defs["model"], _, state = training.init_training(shape, tx, cfg.seed)
            return state

        abstract = jax.eval_shape(build)
        model_def = defs["model"]
        place = NamedSharding(mesh, P()) if mesh is not None else None
        place = place or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=place), abstract
        )
        state, _ = checkpoints.restore(step, like)
    finally:
        checkpoints.close()
    num_params = count_params(nnx.merge(model_def, state["model"]))
    return Teacher(model_def, state["model"], config, step, directory, num_params)


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
                f"d_model {cfg.d_model}, {_layers(cfg.num_layers)}",
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


def make_task(cfg: Any, num_devices: int, mesh: Mesh | None = None) -> DigitsTask | LMTask:
    """The task of ``cfg.task``; batches split over ``num_devices`` devices, and on
    ``mesh`` (the trainer's) the lm task's output layer runs vocabulary parallel."""
    tasks = {"digits": DigitsTask, "lm": LMTask, "distill": DistillTask}
    return tasks[cfg.task](cfg, num_devices, mesh)
