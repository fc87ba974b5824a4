"""One device's run of a fused loss: plans, the schedule, and the reduction.

Every public fused loss validates its arguments, builds its loss object and per-token
inputs, and calls :func:`run`; :func:`reduce` turns what ``run`` returned into the
``reduction`` the caller asked for.

Internal API: :func:`run`, :func:`reduce`, :func:`token_weights`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jxent import _validation as v
from jxent._fused import engine, plan
from jxent._reduction import safe_divide


def run(
    loss: engine.FusedLoss,
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    rows,
    columns,
    *,
    num_classes: int,
    reduction: str,
    chunk_size,
    soft_cap: float | None = None,
    temperature: float | None = None,
    per_token: bool = False,
    w_layout: str = "dv",
    teacher=None,
):
    """``(result, summed)`` for ``x [N, D] @ w [D, V]``: the loss's per-token output(s)
    ``[N]`` (``w`` is ``[D, V]``, or ``[V, D]`` with ``w_layout="vd"``) from the streaming
    schedule, or, when the plan takes the single pass (a
    summed or averaged loss with a small ``[D, V]``; never with ``per_token``), their
    sum over the tokens with ``summed=True``. Padding columns (``num_classes < V``) are
    marked for the engine here. ``teacher``: ``(x_t [N, D_t], w_t, bias_t)`` with ``w_t``
    in ``w``'s layout over the same columns, a second logits stream for losses that
    compare the student with a teacher's full distribution (a constant), or None."""
    n, d = x.shape
    cols = w.shape[1 if w_layout == "dv" else 0]
    cdt = engine.compute_dtype(x, w, bias)
    acc = v.accumulation_dtype(cdt)
    plans, single_pass = plan.plans(
        n,
        d,
        cols,
        "none" if per_token else reduction,
        chunk_size,
        jnp.dtype(acc).itemsize,
        float32=cdt == jnp.float32,
        # A teacher's logits block sits beside the student's: smaller panels, as for a
        # loss that scatters into its block.
        scatters=getattr(loss, "scatters", False) or teacher is not None,
    )
    spec = engine.Spec(
        loss,
        plans,
        soft_cap,
        None if num_classes == cols else num_classes,
        temperature=temperature,
        w_layout=w_layout,
    )
    real = jnp.arange(cols) < num_classes if num_classes < cols else None
    args = (x, w, bias, rows, columns, real, teacher)
    if single_pass:
        return engine.summed_loss(spec, *args), True
    return engine.per_token_loss(spec, *args), False


def reduce(result, summed: bool, batch_shape, reduction: str, weight, normalizer=None):
    """The loss of ``run``'s ``(result, summed)`` under ``reduction``: per token (of
    ``batch_shape``), the sum, or the mean over ``normalizer`` if given, else over the
    sum of the per-token ``weight`` (None: every token counts once; 0 if none counts)."""
    if not summed:
        per_token = result.reshape(batch_shape)
        if reduction == "none":
            return per_token
        result = jnp.sum(per_token)
    if reduction == "sum":
        return result
    if normalizer is not None:
        return result / normalizer.astype(result.dtype)
    if weight is None:
        return result / max(math.prod(batch_shape), 1)
    return safe_divide(result, jnp.sum(weight.astype(result.dtype)))


def token_weights(weights, batch_shape, acc, *, name: str = "token_weights"):
    """Checked per-token float weights in ``acc`` (``[N]``), or None."""
    if weights is None:
        return None
    weights = v.as_array(name, weights)
    v.check_floating(name, weights)
    v.check_shape(name, weights, batch_shape, "x.shape[:-1]: one weight per token")
    return jax.lax.stop_gradient(weights.astype(acc).reshape(-1))
