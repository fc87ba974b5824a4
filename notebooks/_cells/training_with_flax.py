# %% [markdown]
# # Training with Flax and jxent
#
# jxent ships an example trainer, `python -m jxent.examples.train [digits|lm]`: a
# Flax NNX model, an Optax optimizer, and jxent's losses, with checkpoints, resumption,
# multi-device data parallelism and a summary at the end. This notebook uses its pieces
# interactively instead:
#
# | module | what it holds |
# |---|---|
# | `jxent.examples.train` | the command line (`parse_args` gives a run's settings) and the loop |
# | `jxent.examples.tasks` | `make_task`, over one module per task (`digits_task`, `lm_task`, `distill_task`): its data, model, **loss** and evaluation |
# | `jxent.examples.training` | the optimizer and the pure, jit-able train and eval steps |
# | `jxent.examples.data`, `models`, `metrics` | data pipelines, Flax models, accuracy / ECE / bits per byte |
#
# Two short runs: an MLP on scikit-learn's 8x8 digits trained with label-smoothed
# cross-entropy, and a tiny byte-level transformer trained with the fused
# `linear_softmax_cross_entropy`. Both run on a laptop CPU in seconds.

# %%
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import jxent
from jxent.examples import tasks, train, training

plt.rcParams.update({"figure.dpi": 80, "axes.grid": True})
print("jax", jax.__version__, "| jxent", jxent.__version__, "| devices", jax.devices())

# %% [markdown]
# ## A run's settings, its task and its data
#
# `train.parse_args` takes the same flags as the command line and fills in each
# task's defaults; `tasks.make_task` builds the task (here it loads the digits and
# holds out a stratified 20%).

# %%
cfg = train.parse_args(["digits", "--steps", "200"])
print({k: getattr(cfg, k) for k in ("loss", "label_smoothing", "steps", "batch_size",
                                    "learning_rate", "hidden", "depth")})
task = tasks.make_task(cfg, num_devices=1)
digits = task.data
print(f"{len(digits.train)} training and {len(digits.test)} held-out images, "
      f"{digits.train.inputs.shape[1]} pixels, {digits.num_classes} classes")

fig, axes = plt.subplots(1, 10, figsize=(8, 1.1))
for ax, image, label in zip(axes, digits.train.inputs[:10], digits.train.labels[:10]):
    ax.imshow(image.reshape(8, 8), cmap="gray_r")
    ax.set_title(str(label), fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Model, optimizer and the loss
#
# `training.init_training` builds the Flax NNX model and its optimizer (AdamW with
# warm-up, cosine decay and gradient clipping) and splits them into static graph
# definitions and a plain dict of arrays, the training state, which `jax.jit`
# compiles over and orbax checkpoints as it is.
#
# The loss is the task's: for `--loss xent`, jxent's
# `softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=...)`,
# averaged over the batch. Check it against the label-smoothed cross-entropy written
# in NumPy, $(1 - \alpha)(\mathrm{lse} - z_y) + \frac{\alpha}{K}\sum_k (\mathrm{lse} - z_k)$.

# %%
def make_optimizer(cfg):
    return training.make_optimizer(
        learning_rate=cfg.learning_rate, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
    )


model_def, opt_def, state = training.init_training(task, make_optimizer(cfg), cfg.seed)
model = training.merge_model(model_def, state)
n_params = sum(x.size for x in jax.tree.leaves(state["model"]))
print(type(model).__name__, f"with {n_params:,} parameters")

batch = task.train_batch(1)
logits = np.asarray(model(batch["x"]), np.float64)
alpha, K = cfg.label_smoothing, logits.shape[1]
m = logits.max(1, keepdims=True)
lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
nll = lse - logits[np.arange(len(logits)), batch["y"]]
reference = np.mean((1 - alpha) * nll + alpha / K * (K * lse - logits.sum(1)))
loss = task.loss(model, batch)
print(f"initial loss: jxent {float(loss):.6f}   NumPy {reference:.6f}   (log 10 = {np.log(10):.4f})")
np.testing.assert_allclose(loss, reference, rtol=1e-5)

# %% [markdown]
# ## The training loop
#
# `make_train_step` returns a pure `train_step(state, batch) -> (state, metrics)`
# (the loss, and whether it and the parameters are still finite) and `make_eval_step` a
# per-example evaluation. The loop below is the trainer's (`jxent.examples.trainer`)
# without its devices, checkpoints, stop handling and progress bar.

# %%
def fit(argv):
    """Trains the run that `argv` (command-line flags) describes; returns its history."""
    cfg = train.parse_args(argv)
    task = tasks.make_task(cfg, num_devices=1)
    model_def, opt_def, state = training.init_training(task, make_optimizer(cfg), cfg.seed)
    train_step = jax.jit(training.make_train_step(task, model_def, opt_def))
    eval_step = jax.jit(training.make_eval_step(task, model_def))

    def evaluate(state):
        outs = [jax.device_get(eval_step(state["model"], b)) for b in task.eval_batches()]
        return task.summarize_eval({k: np.concatenate([o[k] for o in outs]) for k in outs[0]})

    start = time.perf_counter()
    history = {"step": [], "loss": [], "evals": [{"step": 0, **evaluate(state)}]}
    for step in range(1, cfg.steps + 1):
        state, metrics = train_step(state, task.train_batch(step))
        history["step"].append(step)
        history["loss"].append(float(metrics["loss"]))
        assert metrics["finite"]
        if step % cfg.eval_every == 0 or step == cfg.steps:
            history["evals"].append({"step": step, **evaluate(state)})
    history["seconds"] = time.perf_counter() - start
    return task, training.merge_model(model_def, state), history


runs = {}
for smoothing in ("0.0", "0.1"):
    _, _, runs[smoothing] = fit(["digits", "--steps", "200", "--label-smoothing", smoothing])
    final = runs[smoothing]["evals"][-1]
    print(f"label smoothing {smoothing}: {runs[smoothing]['seconds']:.1f} s, held-out accuracy "
          f"{100 * final['val_accuracy']:.1f}%, loss {final['val_loss']:.3f}, "
          f"ECE {final['val_ece']:.3f}")
    assert final["val_accuracy"] > 0.9
    assert np.mean(runs[smoothing]["loss"][-20:]) < 0.5 * runs[smoothing]["loss"][0]

# %%
fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(11, 3.2))
for smoothing, h in runs.items():
    ev = {k: [e[k] for e in h["evals"]] for k in h["evals"][0]}
    line, = ax1.plot(h["step"], h["loss"], alpha=0.35)
    ax1.plot(ev["step"], ev["val_loss"], "o-", ms=3, color=line.get_color(),
             label=f"alpha = {smoothing}")
    ax2.plot(ev["step"], 100 * np.array(ev["val_accuracy"]), "o-", ms=3, label=f"alpha = {smoothing}")
    ax3.plot(ev["step"], ev["val_ece"], "o-", ms=3, label=f"alpha = {smoothing}")
ax1.set(xlabel="step", ylabel="loss", yscale="log",
        title="training (faint) and held-out loss")
ax2.set(xlabel="step", ylabel="%", ylim=(80, 100), title="held-out accuracy")
ax3.set(xlabel="step", ylabel="ECE", title="held-out calibration error")
ax2.legend(loc="lower right")
fig.tight_layout()
plt.show()

# %% [markdown]
# Both reach about 99% held-out accuracy. Note what smoothing does to the numbers: its
# loss has a floor above zero (the entropy of the smoothed target), and on this easy,
# well-fitted problem the unsmoothed model is already well calibrated, so smoothing
# makes it *under*-confident and its calibration error rises. Smoothing helps
# calibration where a model overfits and becomes overconfident (see
# [cross_entropy_from_scratch.ipynb](cross_entropy_from_scratch.ipynb)); it is a
# regulariser to tune, not a free win.
#
# ## A byte-level language model with the fused loss
#
# The `lm` task trains a decoder-only transformer on bytes of Python's standard-library
# sources. Its loss is `jxent.linear_softmax_cross_entropy(hidden, unembedding, labels,
# ignore_index=PAD, z_loss=...)`: the output projection and the cross-entropy in one
# function that never materialises the `[tokens, 256]` logits (with 256 classes this
# saves little; the code is the same for a 256,000-word vocabulary, see
# [large_vocab_memory.ipynb](large_vocab_memory.ipynb)). A deliberately tiny model and
# a short run:

# %%
lm_task, lm_model, lm = fit([
    "lm", "--steps", "100", "--corpus-bytes", "300000", "--seq-len", "64",
    "--d-model", "64", "--batch-size", "16", "--eval-every", "25",
])
ev = {k: [e[k] for e in lm["evals"]] for k in lm["evals"][0]}
print(f"{lm['seconds']:.1f} s; held-out bits per byte:",
      ", ".join(f"step {s}: {b:.2f}" for s, b in zip(ev["step"], ev["val_bits_per_byte"])))
assert ev["val_bits_per_byte"][-1] < 0.75 * ev["val_bits_per_byte"][0]

fig, ax = plt.subplots(figsize=(5.5, 3))
ax.plot(lm["step"], np.array(lm["loss"]) / np.log(2), alpha=0.4, label="training (incl. z-loss)")
ax.plot(ev["step"], ev["val_bits_per_byte"], "o-", label="held-out")
ax.axhline(8, color="gray", ls=":", label="uniform over 256 bytes")
ax.set(xlabel="step", ylabel="bits per byte", title="byte-level transformer")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# From 8 bits per byte (uniform guessing) to under 5 in a hundred steps: the model has
# learned the byte statistics of Python source. Its samples are not yet Python; train
# for longer with the command line,
#
# ```bash
# python -m jxent.examples.train lm --steps 2000
# ```
#
# which also evaluates, checkpoints (and resumes with `--resume`), spreads the batch
# over all local devices, plots the curves and samples continuations of a few prompts.
# `python -m jxent.examples.train --help` lists every flag.
