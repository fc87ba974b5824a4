"""PolyLoss: the softmax cross-entropy plus a weighted first polynomial term.

:func:`poly_loss_cross_entropy` is the cross-entropy of the categorical dense path
(``jxent._categorical.dense_loss``) plus ``epsilon * sum_k t_k (1 - p_k)``, the latter a
loss of its own with a custom rule (``jxent._rules.custom_jvp_loss``): one fused pass
forward, and a tangent that recomputes the softmax from two per-row scalars.

Internal API: :func:`poly1_term` (the per-row term over validated rows).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jxent import _backend
from jxent import _validation as v
from jxent._categorical import dense_inputs, dense_loss
from jxent._layout import Axis, flatten_classes, rows_and_masks, xent_config
from jxent._reduction import reduce_loss
from jxent._rules import custom_jvp_loss
from jxent._softmax import (
    dot_last,
    fill_masked,
    kept_rows,
    log_shifted_sum,
    row_sums,
    scaled_logits,
    shifted_exp,
    softmax_from_stats,
)

# --------------------------------------------------------------------------------------------
# The PolyLoss term sum_k t_k (1 - p_k)
# --------------------------------------------------------------------------------------------


class _PolyStats(NamedTuple):
    row_max: jax.Array
    log_sum: jax.Array  # log sum exp(x - row_max)
    pt: jax.Array  # sum_k t_k p_k
    keep: jax.Array


def _poly_forward(_, x, t, class_mask, row_mask):
    acc = v.accumulation_dtype(x.dtype, t.dtype)
    zero = jnp.zeros((), acc)
    # This pass runs next to the cross-entropy core's over the same logits: without the
    # barrier XLA:CPU merges the two identical exp(x - max) and materialises the result.
    x = _backend.cpu_barrier(x)
    s = shifted_exp(x, class_mask, 1.0, acc)
    t = fill_masked(t.astype(acc), class_mask, 0)
    sums = row_sums({"s": s.e, "te": t * s.e, "t": t})
    log_s = log_shifted_sum(sums["s"], s.has_class)
    pt = sums["te"] / jnp.where(s.has_class, sums["s"], 1)
    keep = kept_rows(s.has_class, row_mask)
    term = jnp.where(keep, sums["t"] - pt, zero)
    return term, _PolyStats(s.row_max, log_s, pt, keep)


def _poly_tangent(_, arrays, stats: _PolyStats, dots):
    x, t, class_mask, _ = arrays
    x_dot, t_dot = dots[0], dots[1]
    acc = stats.pt.dtype
    zero = jnp.zeros((), acc)
    p = softmax_from_stats(scaled_logits(x, class_mask, 1.0, acc), stats.row_max, stats.log_sum)
    out = 0
    if x_dot is not None:
        # d/dx_j sum_k t_k (1 - p_k) = p_j (sum_k t_k p_k - t_j).
        tm = fill_masked(t.astype(acc), class_mask, 0)
        out = out + dot_last(p * (stats.pt[..., None] - tm), x_dot)
    if t_dot is not None:
        out = out + dot_last(fill_masked(1 - p, class_mask, 0), t_dot)
    return jnp.where(stats.keep, out, zero)


_poly = custom_jvp_loss(_poly_forward, _poly_tangent)


def poly1_term(x: jax.Array, t: jax.Array, class_mask, row_mask) -> jax.Array:
    """Per-row ``sum_k t_k (1 - softmax(x)_k)`` over the last axis (validated rows).

    Rows dropped by ``row_mask`` or without a finite unmasked logit give 0.
    """
    return _poly(None, x, t, class_mask, row_mask)


# --------------------------------------------------------------------------------------------
# The public loss
# --------------------------------------------------------------------------------------------


def poly_loss_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    epsilon: jax.typing.ArrayLike = 2.0,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "none",
) -> jax.Array:
    r"""Poly-1 loss: softmax cross-entropy plus :math:`\epsilon (1 - p_t)` (Leng et al., 2022).

    .. math::
      \ell = -\sum_k t_k \log p_k + \epsilon \sum_k t_k (1 - p_k),
      \qquad p = \operatorname{softmax}(x),

    i.e. the cross-entropy with the coefficient of its first polynomial term
    :math:`(1 - p_t)` raised by :math:`\epsilon`. The cross-entropy is
    :func:`softmax_cross_entropy` (the stable core: ``-inf`` logits and zero
    targets are safe); the second term is one fused pass with its own stable
    derivative rule, :math:`\partial/\partial x_j = p_j (\sum_k t_k p_k - t_j)`.
    Masked classes (``-inf`` logits or a logits-shaped ``where``) have
    :math:`p_k = 0`.

    Drop-in for :func:`optax.losses.poly_loss_cross_entropy` (``epsilon``,
    ``axis`` and ``where`` may also be passed by position here); unlike optax it
    accepts a ``where`` of the batch shape.

    Args:
      logits: unnormalised log-probabilities, ``[..., num_classes]``.
      labels: floating target distributions (e.g. one-hot) of a shape that
        broadcasts to the logits' shape (as in optax, but never enlarging it); a
        float64 ``labels`` makes the loss float64.
      epsilon: the extra weight of the first polynomial term (the paper
        recommends 2.0 for ImageNet classification and -1.0 for detection); a
        scalar, may be traced.
      axis: the class axis, a tuple of class axes, or ``None`` for all axes.
      where: a boolean mask of the batch shape (drops rows) or of the logits'
        shape (drops classes).
      reduction: ``"none"`` (per-example), ``"sum"`` or ``"mean"`` (over the rows
        that ``where`` keeps).

    Returns:
      The loss, float32 for float32 or narrower logits (float64 if either input
      is float64); an empty batch gives an empty loss.

    Raises:
      TypeError: integer logits or labels, a non-real ``epsilon``.
      ValueError: labels that do not broadcast to the logits' shape, no class along
        ``axis``, a non-scalar ``epsilon``, a bad ``axis``, ``where`` or
        ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> import numpy as np
      >>> loss = jxent.poly_loss_cross_entropy(logits, labels, epsilon=2.0)
      >>> print(np.round(np.asarray(loss), 4))
      [0.7587 4.8473]

    References:
      Leng et al., `PolyLoss: A Polynomial Expansion Perspective of Classification
      Loss Functions <https://arxiv.org/abs/2204.12511>`_, 2022.
    """
    logits, labels, axes = dense_inputs(logits, labels, axis, one_hot_ints=False)
    eps = v.as_array("epsilon", epsilon)
    if eps.ndim != 0 or not (
        jnp.issubdtype(eps.dtype, jnp.floating) or jnp.issubdtype(eps.dtype, jnp.integer)
    ):
        raise (ValueError if eps.ndim != 0 else TypeError)(
            f"epsilon must be a real scalar, got dtype {eps.dtype} with shape {eps.shape}."
        )
    v.check_reduction(reduction)
    ce, row_mask = dense_loss(logits, labels, axes, where, xent_config(0.0, 0.0, class_axes=axes))
    x, _, _, class_mask = rows_and_masks(logits, axes, where)
    poly = poly1_term(x, flatten_classes(labels, axes), class_mask, row_mask)
    loss = ce + eps.astype(ce.dtype) * poly.astype(ce.dtype)
    return reduce_loss(loss, reduction, row_mask)
