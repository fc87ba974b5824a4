"""The lm task: a byte-level transformer trained with the fused cross-entropy.

:func:`sample` continues prompts with a trained model (``samples.txt`` at the end).

Internal API: :class:`LMTask`, :func:`sample`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jxent
from jxent.examples import data as data_lib
from jxent.examples import metrics as metrics_lib
from jxent.examples.models import ByteTransformer
from jxent.examples.task_base import (
    ALL_ROWS,
    Batch,
    EvalSet,
    SummaryRow,
    TaskHooks,
    padded_indices,
)


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
