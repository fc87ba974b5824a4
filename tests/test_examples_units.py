"""Unit tests of the example trainer's pieces: data, models, metrics, one train step.

These run in the test process (x64 on, strict dtype and rank promotion from
conftest.py), so they also check that the example code is explicit about dtypes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jxent.examples import data, lm_task, metrics, models, task_base, tasks, training
from jxent.examples.settings import parse_args, run_config


def _numpy_ece(confidence, correct, num_bins, where=None):
    """Guo et al.'s ECE, written independently: a loop over explicit bin intervals."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    if where is not None:
        confidence, correct = confidence[where], correct[where]
    n = len(confidence)
    ece = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        members = (confidence > lo) & (confidence <= hi)
        if b == 0:
            members |= confidence == 0.0
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += members.sum() / n * gap
    return ece


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("num_bins", [1, 5, 15])
@pytest.mark.parametrize("masked", [False, True])
def test_ece_matches_numpy_reference(num_bins, masked):
    rng = np.random.default_rng(num_bins)
    confidence = rng.uniform(0.0, 1.0, 200)
    confidence[:3] = [0.0, 1.0, 0.5]
    correct = rng.uniform(size=200) < confidence  # roughly calibrated
    where = rng.uniform(size=200) < 0.7 if masked else None
    got = metrics.expected_calibration_error(
        jnp.asarray(confidence), jnp.asarray(correct), num_bins=num_bins, where=where
    )
    np.testing.assert_allclose(float(got), _numpy_ece(confidence, correct, num_bins, where), 1e-12)


def test_ece_extremes():
    # Always right at confidence 1: perfectly calibrated. Always wrong at 1: ECE 1.
    ones = jnp.ones(8, jnp.float32)
    assert float(metrics.expected_calibration_error(ones, jnp.ones(8, bool))) == 0.0
    assert float(metrics.expected_calibration_error(ones, jnp.zeros(8, bool))) == 1.0
    # No example counted: 0, not NaN.
    none = jnp.zeros(8, bool)
    assert float(metrics.expected_calibration_error(ones, none, where=none)) == 0.0


def test_bits_per_byte():
    assert metrics.bits_per_byte(math.log(256)) == pytest.approx(8.0, rel=1e-15)
    assert metrics.bits_per_byte(math.log(2)) == pytest.approx(1.0, rel=1e-15)
    assert metrics.bits_per_byte(0.0) == 0.0


# --------------------------------------------------------------------------------- data


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    np.testing.assert_array_equal(a.train.inputs, b.train.inputs)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert len(a.train) + len(a.test) == 1797
    assert a.train.inputs.dtype == np.float32 and a.train.labels.dtype == np.int32
    assert a.train.inputs.shape[1] == 64
    assert -0.5 <= a.train.inputs.min() and a.train.inputs.max() <= 0.5
    # every class is held out in (about) the same proportion
    counts = np.bincount(a.test.labels, minlength=10) / np.bincount(
        np.concatenate([a.train.labels, a.test.labels]), minlength=10
    )
    np.testing.assert_allclose(counts, 0.2, atol=0.01)
    # no image is in both sets
    train_rows = {row.tobytes() for row in a.train.inputs}
    test_rows = [row.tobytes() for row in a.test.inputs]
    assert sum(r in train_rows for r in test_rows) < 5  # (a few digits are pixel-identical)


def test_batch_schedule_is_a_pure_function_of_seed_and_step():
    s = data.BatchSchedule(num_examples=103, batch_size=10, seed=7)
    assert s.steps_per_epoch == 10
    first = [s.indices(t) for t in range(25)]
    again = data.BatchSchedule(num_examples=103, batch_size=10, seed=7)
    for t in reversed(range(25)):  # any order: no iterator state
        np.testing.assert_array_equal(again.indices(t), first[t])
    # one epoch visits distinct examples; the next epoch is a different order
    epoch0 = np.concatenate(first[:10])
    assert len(np.unique(epoch0)) == 100
    assert not np.array_equal(epoch0, np.concatenate(first[10:20]))
    other_seed = data.BatchSchedule(num_examples=103, batch_size=10, seed=8)
    assert not np.array_equal(other_seed.indices(0), first[0])
    assert s.locate(23) == (2, 3)
    assert "batch 4 of 10 in epoch 3" in s.describe(23)


def test_batch_schedule_rejects_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="batch size"):
        data.BatchSchedule(num_examples=5, batch_size=6, seed=0)


@pytest.mark.parametrize("text", [b"hello, world", b"hello, wor", b"h"])
def test_chunk_bytes_shifts_labels_and_pads_the_tail(text):
    inputs, labels = data.chunk_bytes(text, 4)
    n = len(text)
    assert inputs.shape == labels.shape == (max(1, -(-(n - 1) // 4)), 4)
    tokens = np.frombuffer(text, np.uint8)
    flat_in, flat_lab = inputs.reshape(-1), labels.reshape(-1)
    np.testing.assert_array_equal(flat_in[:n], tokens)
    np.testing.assert_array_equal(flat_lab[: n - 1], tokens[1:])
    assert (flat_in[n:] == 0).all()
    assert (flat_lab[n - 1 :] == data.PAD).all()


def test_byte_corpus_is_deterministic_and_split_by_file():
    a = data.load_byte_corpus(seq_len=32, max_bytes=60_000)
    b = data.load_byte_corpus(seq_len=32, max_bytes=60_000)
    np.testing.assert_array_equal(a.train.inputs, b.train.inputs)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    assert a.files == b.files and list(a.files) == sorted(a.files)
    assert a.num_bytes == 60_000
    assert a.train.inputs.dtype == np.int32 and a.train.inputs.shape[1] == 32
    assert 0 <= a.train.inputs.min() and a.train.inputs.max() < data.NUM_BYTES
    assert (a.train.labels == data.PAD).any()  # padding at the end of files
    assert len(a.val) > 0


# ------------------------------------------------------------------------------- models


def test_mlp_shapes():
    model = models.MLPClassifier(64, 10, hidden=32, depth=3, rngs=nnx.Rngs(0))
    out = model(jnp.zeros((5, 64), jnp.float32))
    assert out.shape == (5, 10) and out.dtype == jnp.float32
    assert models.count_params(model) == (64 * 32 + 32 * 32 * 2 + 3 * 32) + 3 * 64 + 32 * 10 + 10


def test_transformer_shapes_and_causality():
    model = models.ByteTransformer(256, 16, d_model=32, num_layers=2, num_heads=4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # jit once for both [2, 16] calls (eager op-by-op dispatch is slow)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    hidden = forward(state, tokens)
    assert hidden.shape == (2, 16, 32) and hidden.dtype == jnp.float32
    assert model.unembedding().shape == (32, 256)
    logits = jax.eval_shape(lambda t: model.logits(t), tokens)
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
    # shorter inputs use the first positions
    assert jax.eval_shape(model, tokens[:, :5]).shape == (2, 5, 32)
    # changing byte 10 leaves the states of positions 0..9 unchanged
    changed = forward(state, tokens.at[:, 10].set((tokens[:, 10] + 1) % 256))
    np.testing.assert_array_equal(changed[:, :10], hidden[:, :10])
    assert not np.allclose(changed[:, 10:], hidden[:, 10:])


# ---------------------------------------------------------------------- training steps


def _one_step_lowers_loss(argv):
    # optax's bias correction mixes a Python float with an int32 count, which strict
    # promotion refuses; the examples run with JAX's standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        return _one_step_lowers_loss_standard(argv)


def _one_step_lowers_loss_standard(argv):
    cfg = parse_args(argv)
    task = tasks.make_task(cfg, num_devices=1)
    tx = training.make_optimizer(
        learning_rate=1e-2, steps=10, warmup_steps=0, weight_decay=0.0, grad_clip=1.0
    )
    model_def, opt_def, state = training.init_training(task, tx, seed=0)
    step = jax.jit(training.make_train_step(task, model_def, opt_def))
    batch = task.train_batch(1)
    new_state, metrics0 = step(state, batch)
    _, metrics1 = step(new_state, batch)  # the updated parameters' loss on the same batch
    loss0, loss1 = float(metrics0["loss"]), float(metrics1["loss"])
    assert bool(metrics0["finite"]) and np.isfinite(loss0) and loss1 < loss0
    # the step is pure: the same inputs give the same outputs (bit for bit on CPU; GPU
    # reductions may reorder sums unless XLA is asked for deterministic ops)
    again, metrics0_again = step(state, batch)
    np.testing.assert_allclose(float(metrics0_again["loss"]), loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    return task, model_def, new_state


@pytest.mark.parametrize("loss", ["xent", "focal", "bce"])
def test_digits_train_step_lowers_loss(loss):
    task, model_def, state = _one_step_lowers_loss(["digits", "--loss", loss, "--hidden", "32"])
    # the evaluation returns per-example arrays over the padded held-out set
    out = jax.device_get(
        jax.jit(training.make_eval_step(task, model_def))(state["model"], task.eval_batches()[0])
    )
    summary = task.summarize_eval(out)
    assert set(summary) == {"val_loss", "val_accuracy", "val_ece"}
    assert 0 <= summary["val_accuracy"] <= 1 and 0 <= summary["val_ece"] <= 1


LM_FLAGS = [
    "lm",
    "--seq-len",
    "32",
    "--d-model",
    "32",
    "--num-heads",
    "2",
    "--num-layers",
    "1",
    "--batch-size",
    "8",
    "--corpus-bytes",
    "40000",
]


def test_lm_train_step_lowers_loss():
    _one_step_lowers_loss(LM_FLAGS)


def test_lm_eval_of_a_uniform_model_is_8_bits_per_byte():
    cfg = parse_args([*LM_FLAGS, "--batch-size", "7"])
    task = tasks.make_task(cfg, num_devices=1)
    assert not task.eval_batches()[-1]["valid"].all()  # the last batch is padded
    model = task.init_model(nnx.Rngs(0))
    # zero embeddings tie to a zero unembedding: every byte gets logit 0
    model.embed.embedding[...] = jnp.zeros_like(model.embed.embedding[...])
    model_def, model_state = nnx.split(model)
    eval_step = jax.jit(training.make_eval_step(task, model_def))
    outs = [jax.device_get(eval_step(model_state, b)) for b in task.eval_batches()]
    merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    # padding rows and padded positions are not counted
    assert (
        merged["count"].sum()
        == (task.corpus.val.labels != data.PAD)[
            np.unique(np.linspace(0, len(task.corpus.val) - 1, task.num_eval_rows).astype(int))
        ].sum()
    )
    summary = task.summarize_eval(merged)
    assert summary["val_loss"] == pytest.approx(math.log(256), rel=1e-5)
    assert summary["val_bits_per_byte"] == pytest.approx(8.0, rel=1e-5)


def test_lm_samples_continue_the_prompts():
    cfg = parse_args(LM_FLAGS)
    task = tasks.make_task(cfg, num_devices=1)
    model = task.init_model(nnx.Rngs(0))
    texts = lm_task.sample(
        model, (b"def ", b"import "), num_new=40, max_len=32, temperature=1.0, seed=0
    )
    assert texts[0].startswith("def ") and texts[1].startswith("import ")
    again = lm_task.sample(
        model, (b"def ", b"import "), num_new=40, max_len=32, temperature=1.0, seed=0
    )
    assert texts == again


def test_pad_rows():
    batch = {"x": np.ones((5, 2), np.float32), "y": np.arange(5, dtype=np.int32)}
    padded = task_base.pad_rows(batch, 4)
    assert padded["x"].shape == (8, 2) and padded["y"].shape == (8,)
    np.testing.assert_array_equal(padded["valid"], [1, 1, 1, 1, 1, 0, 0, 0])
    assert (padded["x"][5:] == 0).all()


# ------------------------------------------------------------- several processes' pieces


def test_process_rows_of_a_batch_are_rows_of_the_global_batch():
    """A process reads only its rows of a batch: the same examples as the global batch's."""
    cfg = parse_args(LM_FLAGS)
    task = tasks.make_task(cfg, num_devices=1)
    whole = task.train_batch(3)
    for part in (slice(0, 4), slice(4, 8)):
        got = task.train_batch(3, part)
        for k in whole:
            np.testing.assert_array_equal(got[k], whole[k][part])


def test_eval_parts_split_the_padded_eval_batches():
    cfg = parse_args([*LM_FLAGS, "--batch-size", "6"])
    task = tasks.make_task(cfg, num_devices=4)  # batches of 6 rows, padded to 8
    full = task.eval_batches()
    assert all(len(b["tokens"]) == 8 for b in full) and not full[-1]["valid"].all()
    halves = [task.eval_batches(lambda n, i=i: slice(i * n // 2, (i + 1) * n // 2)) for i in (0, 1)]
    for b, (lo, n_lo), (hi, n_hi) in zip(full, *halves, strict=True):
        assert n_lo == n_hi == len(b["tokens"])
        for k in b:
            np.testing.assert_array_equal(np.concatenate([lo[k], hi[k]]), b[k])


def test_gather_rows_pads_like_pad_rows():
    arrays = {"x": np.arange(10, dtype=np.float32).reshape(5, 2), "y": np.arange(5, dtype=np.int32)}
    idx = task_base.padded_indices(np.array([4, 0, 2]), 4)
    np.testing.assert_array_equal(idx, [4, 0, 2, -1])
    got = task_base.gather_rows(arrays, idx)
    want = task_base.pad_rows({k: v[[4, 0, 2]] for k, v in arrays.items()}, 4)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == want[k].dtype


def test_one_process_mesh_and_rows():
    from jxent.examples import trainer

    mesh = trainer.make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(trainer.BATCH_AXES))
    assert trainer.local_rows(sharding, 8) == slice(0, 8)
    with pytest.raises(trainer.SetupError, match="--model-parallel 2 must divide"):
        trainer.make_mesh(None, 2)


def test_spawn_passes_the_command_line_on_without_spawn():
    from jxent.examples.train import _without_spawn

    argv = ["lm", "--spawn", "2", "--steps", "5", "--spawn=3", "--out-dir", "x"]
    assert _without_spawn(argv) == ["lm", "--steps", "5", "--out-dir", "x"]


# -------------------------------------------------------------------------- distillation

DISTILL_FLAGS = [
    "distill",
    "--seq-len", "32",
    "--d-model", "16",
    "--num-heads", "2",
    "--num-layers", "1",
    "--batch-size", "8",
    "--corpus-bytes", "40000",
    "--top-k", "4",
    "--temperature", "2",
    "--alpha", "0.3",
]  # fmt: skip


def _init_jitted(task, tx, seed: int):
    """``training.init_training`` under ``jax.jit`` (op by op, it takes seconds)."""
    defs = {}

    def init():
        defs["model"], defs["opt"], state = training.init_training(task, tx, seed)
        return state

    state = jax.jit(init)()
    return defs["model"], defs["opt"], state


def _save_run(out, argv, edit=None):
    """An lm (or digits) run's checkpoint at step 1 holding its initial state, without
    training (``edit`` may change the state first)."""
    from jxent.examples.checkpointing import Checkpoints

    cfg = parse_args([*argv, "--out-dir", str(out)])
    task = tasks.make_task(cfg, num_devices=1)
    with jax.numpy_dtype_promotion("standard"):
        tx = training.make_optimizer(
            learning_rate=cfg.learning_rate,
            steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip,
        )
        _, _, state = _init_jitted(task, tx, cfg.seed)
    if edit is not None:
        state = edit(state)
    checkpoints = Checkpoints(out / "checkpoints", keep=1)
    checkpoints.save(1, state, {"config": run_config(cfg), "history": {}})
    checkpoints.close()
    return state


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher lm run (untrained, with embeddings scaled so that its next-byte
    distributions are far from uniform); returns its directory and saved state."""
    out = tmp_path_factory.mktemp("teacher")

    def sharpen(state):
        return jax.tree_util.tree_map_with_path(
            lambda path, a: a * 60.0 if "embedding" in jax.tree_util.keystr(path) else a, state
        )

    return out, _save_run(out, LM_FLAGS, sharpen)


def _distill_task(teacher_dir, out, *extra, mesh=None):
    cfg = parse_args(
        [*DISTILL_FLAGS, "--teacher-checkpoint", str(teacher_dir), "--out-dir", str(out), *extra]
    )
    return cfg, tasks.make_task(cfg, num_devices=1, mesh=mesh)


def test_distill_task_loss_is_the_unfused_composition(teacher_run, tmp_path):
    """The teacher's top-k per batch, and the fused loss on them (on the trainer's mesh,
    as it trains), against float64 NumPy:
    alpha CE + (1 - alpha) T^2 sum_k p_k (log p_k - log softmax(z / T)_k)."""
    from jxent.examples import trainer

    teacher_dir, teacher_state = teacher_run
    cfg, task = _distill_task(teacher_dir, tmp_path, mesh=trainer.make_mesh())
    assert task.teacher.step == 1 and task.teacher.config["d_model"] == 32
    host = task.train_batch(1)
    host["labels"][-1, 20:] = data.PAD  # the end of a file: padding, which the loss skips
    batch = task.device_batch(host)
    index, log_p = np.asarray(batch["teacher_index"]), np.asarray(batch["teacher_log_probs"])
    assert index.shape == log_p.shape == (8, 32, 4) and index.dtype == np.int32
    # the teacher's own top-k at temperature 2, from its parameters as saved
    teacher = nnx.merge(task.teacher.model_def, teacher_state["model"])
    logits = np.asarray(jax.jit(lambda m, t: m.logits(t))(teacher, batch["tokens"]), np.float64)
    assert logits.std() > 1.0  # not a uniform teacher
    z_t = logits / 2.0
    lp_t = z_t - np.log(np.exp(z_t - z_t.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lp_t -= z_t.max(-1, keepdims=True)
    np.testing.assert_allclose(log_p, np.take_along_axis(lp_t, index, -1), rtol=1e-5, atol=1e-5)
    assert (np.diff(log_p, axis=-1) <= 0).all()
    np.testing.assert_array_equal(np.sort(index, -1), np.sort(np.argsort(-lp_t, -1)[..., :4], -1))

    with jax.numpy_dtype_promotion("standard"):
        model_def, _, state = _init_jitted(task, optax.sgd(0.1), cfg.seed)
    model = nnx.merge(model_def, state["model"])
    loss = float(jax.jit(task.loss)(model, batch))
    # float64 reference of the same loss from the student's logits
    hidden, w = jax.jit(lambda m, t: (m(t), m.unembedding()))(model, batch["tokens"])
    z = np.asarray(hidden, np.float64).reshape(-1, 16) @ np.asarray(w, np.float64)
    labels = np.asarray(batch["labels"]).reshape(-1)
    keep = labels != data.PAD
    lse = np.log(np.exp(z).sum(-1))
    ce = lse - z[np.arange(len(z)), np.where(keep, labels, 0)]
    log_q = z / 2.0 - np.log(np.exp(z / 2.0).sum(-1, keepdims=True))
    lp, idx = log_p.reshape(-1, 4).astype(np.float64), index.reshape(-1, 4)
    kl = 4.0 * np.sum(np.exp(lp) * (lp - np.take_along_axis(log_q, idx, -1)), -1)
    want = np.mean((0.3 * ce + 0.7 * kl)[keep])
    np.testing.assert_allclose(loss, want, rtol=2e-5)


def test_distill_reports_teacher_student_and_baseline(teacher_run, tmp_path):
    teacher_dir, _ = teacher_run
    final = {"step": 5, "val_loss": 2.0, "val_bits_per_byte": 2.0 / math.log(2)}
    baseline = {
        "final": {"val_loss": 2.5, "val_bits_per_byte": 2.5 / math.log(2)},
        "parameters": 123,
        "steps_done": 5,
        "history": {"eval": [{"step": 5, "val_bits_per_byte": 2.5 / math.log(2)}]},
    }
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "metrics.json").write_text(json.dumps(baseline))
    _, task = _distill_task(teacher_dir, tmp_path, "--baseline")
    task.evaluate_references(lambda d, s: {"val_loss": 1.5, "val_bits_per_byte": 1.5 / math.log(2)})
    rows = {r.name: r.value for r in task.final_metric_rows(final)}
    assert rows["held-out bits per byte: teacher"] == f"{1.5 / math.log(2):.4f}"
    assert rows["held-out bits per byte: student"] == f"{2.0 / math.log(2):.4f}"
    assert rows["held-out bits per byte: without teacher"].startswith(f"{2.5 / math.log(2):.4f}")
    report = task.report_metrics(final)["distillation"]
    assert report["teacher"]["val_loss"] == 1.5 and report["student"]["val_loss"] == 2.0
    assert report["baseline"]["val_loss"] == 2.5 and report["baseline"]["parameters"] == 123
    assert (report["alpha"], report["temperature"], report["top_k"]) == (0.3, 2.0, 4)
    json.dumps(report)  # metrics.json can hold it
    lines = task.plot_references()["val_bits_per_byte"]
    assert [label for label, _, _ in lines] == ["teacher", "without teacher"]


def test_distill_teacher_errors(teacher_run, tmp_path):
    teacher_dir, _ = teacher_run
    with pytest.raises(ValueError, match="reads at most 32 bytes"):
        _distill_task(teacher_dir, tmp_path, "--seq-len", "64")
    with pytest.raises(ValueError, match="no checkpoint in"):
        _distill_task(tmp_path / "nothing", tmp_path)
    digits_run = tmp_path / "digits"
    _save_run(digits_run, ["digits", "--hidden", "8"])
    with pytest.raises(ValueError, match="must be an lm run; .* holds a digits run"):
        _distill_task(digits_run, tmp_path)


@pytest.mark.parametrize("task", ["lm", "distill"])
def test_a_missing_examples_extra_is_a_one_line_error(task, tmp_path):
    """Without Flax (the examples extra), a run reports the missing extra in one line,
    also a distill run from a --teacher-checkpoint, which is checked before the run."""
    teacher = tmp_path / "teacher"
    (teacher / "checkpoints" / "1").mkdir(parents=True)
    argv = [task, "--out-dir", str(tmp_path / "out")]
    if task == "distill":
        argv += ["--teacher-checkpoint", str(teacher)]
    code = (
        "import sys; sys.modules['flax'] = None; "  # import flax fails, as when not installed
        f"from jxent.examples import train; sys.exit(train.main({argv!r}))"
    )
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m jxent.examples.train: error: the example trainer needs the 'examples' "
        'extra (flax is missing): pip install -e ".[examples]"'
    ), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_distill_phases_command_lines():
    """The teacher's and the baseline's lm runs share the student's data and optimizer;
    the baseline has the student's model and schedule and no z-loss."""
    from jxent.examples.distill import _lm_argv

    cfg = parse_args([*DISTILL_FLAGS, "--learning-rate", "0.0007", "--teacher-steps", "12"])
    teacher = parse_args(_lm_argv(cfg, teacher=True))
    baseline = parse_args(_lm_argv(cfg, teacher=False))
    for run in (teacher, baseline):
        assert run.task == "lm" and run.sample_bytes == 0
        for name in ("batch_size", "learning_rate", "seq_len", "corpus_bytes", "seed"):
            assert getattr(run, name) == getattr(cfg, name), name
    assert (teacher.steps, teacher.d_model, teacher.num_layers) == (12, 96, 2)
    assert (baseline.steps, baseline.warmup_steps) == (cfg.steps, cfg.warmup_steps)
    assert (baseline.d_model, baseline.num_layers, baseline.z_loss) == (16, 1, 0.0)


def test_no_tpu_errors_without_a_tpu():
    """With libtpu installed (the test extra) and no TPU chip, the trainer's processes
    start JAX without libtpu's start-up errors; where libtpu is absent nothing changes.
    A process that does not call quiet_absent_tpu shows what it prevents."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
    start = "import jax; print(jax.devices()[0].platform)"
    quiet = "from jxent.examples import distributed; distributed.quiet_absent_tpu(); " + start

    def stderr(code):
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    noise = ("TPU_WORKER_HOSTNAMES", "host bounds", "TPU_ACCELERATOR_TYPE")
    got = stderr(quiet)
    assert not any(n in got for n in noise), got
    vendors = Path("/sys/bus/pci/devices").glob("*/vendor")
    has_tpu_chip = any(p.read_text().strip() == "0x1ae0" for p in vendors)
    if importlib.util.find_spec("libtpu") is not None and not has_tpu_chip:
        assert any(n in stderr(start) for n in noise)  # the errors it removes


def test_spawn_reports_the_process_killed_by_a_signal_first():
    # Process 1 killed by SIGKILL and process 0 exiting with 3 on its broken connection
    # can both be seen at one poll: the signal is the failure to report, whatever the order.
    from jxent.examples.distributed import _first_failure

    assert _first_failure([3, -9]) == (1, -9)
    assert _first_failure([-15, -9]) == (0, -15)
    assert _first_failure([None, 3, 2]) == (1, 3)
    assert _first_failure([0, None]) is None
    assert _first_failure([0, 0]) is None
