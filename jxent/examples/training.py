"""The optimizer and the pure train/eval step functions that the trainer compiles.

The training state is a plain dict ``{"model": nnx.State, "optimizer": nnx.State}``
of arrays (Flax NNX's functional split/merge style): ``jax.jit`` compiles the steps
once, the state can be sharded with ``jax.device_put``, and orbax saves it as it is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

State = dict[str, nnx.State]


def make_optimizer(
    *,
    learning_rate: float,
    steps: int,
    warmup_steps: int,
    weight_decay: float,
    grad_clip: float,
) -> optax.GradientTransformation:
    """AdamW with gradient clipping, linear warm-up and cosine decay to 1% of the peak.

    Weight decay applies to matrices only (not to biases and norm scales).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=steps,
        end_value=learning_rate / 100,
    )
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(
            schedule,
            weight_decay=weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
        ),
    )


def init_training(task: Any, tx: optax.GradientTransformation, seed: int):
    """Builds the task's model and its optimizer from ``seed``.

    Returns ``(model_def, opt_def, state)``: the static graph definitions and the
    arrays of the training state.
    """
    model = task.init_model(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    return model_def, opt_def, {"model": model_state, "optimizer": opt_state}


def make_train_step(task: Any, model_def: nnx.GraphDef, opt_def: nnx.GraphDef):
    """``train_step(state, batch) -> (new_state, metrics)``: one optimizer step on
    ``task.loss``, a pure function to ``jax.jit``.

    ``metrics["loss"]`` is the batch's loss before the update and ``metrics["finite"]``
    says whether it and every updated parameter are finite. Both are checked because
    a loss can stay finite while NaN reaches the parameters through the gradient
    (e.g. a loss that treats NaN logits as masked).
    """

    def train_step(state: State, batch) -> tuple[State, dict[str, jax.Array]]:
        model = nnx.merge(model_def, state["model"])
        optimizer = nnx.merge(opt_def, state["optimizer"])
        loss, grads = nnx.value_and_grad(task.loss)(model, batch)
        optimizer.update(model, grads)
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        finite = jnp.isfinite(loss)
        for p in params:
            finite = finite & jnp.all(jnp.isfinite(p))
        new_state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        return new_state, {"loss": loss, "finite": finite}

    return train_step


def make_eval_step(task: Any, model_def: nnx.GraphDef):
    """``eval_step(model_state, batch) -> dict of per-example arrays`` (pure)."""

    def eval_step(model_state: nnx.State, batch) -> dict[str, jax.Array]:
        return task.eval_step(nnx.merge(model_def, model_state), batch)

    return eval_step


def merge_model(model_def: nnx.GraphDef, state: State) -> nnx.Module:
    """The model object of a training state (for sampling or inspection)."""
    return nnx.merge(model_def, state["model"])
