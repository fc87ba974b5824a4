"""KL divergences of log-probabilities and the entropy of a softmax.

Every function here reduces over class axes, with the same layout, ``where`` and
``reduction`` rules as the categorical losses (``jxent._layout.rows_and_masks``).

Why it is written this way (the same design as the categorical core):

* Each loss is a ``jax.custom_jvp`` (``jxent._rules.custom_jvp_loss``) whose tangent
  rule is wrapped in ``jax.checkpoint``: reverse mode keeps only the inputs and a few
  per-row scalars (log-sum-exps, the loss) as residuals and recomputes the softmax in
  one fused elementwise pass, and forward mode (``jvp``, ``jacfwd``, ``hessian``)
  works. The rules take symbolic zero tangents, so an input that is not
  differentiated (a ``stop_gradient``-ed teacher) costs nothing.
* ``0 log 0 = 0`` is built in: terms whose weight is exactly 0 contribute 0 to the
  value and the gradient even against a ``-inf`` log-probability.
* The forward sums are written with arithmetic only (``max``/``min`` clamps, no
  selects) and evaluated in one variadic reduction, so XLA:CPU reads bfloat16
  inputs once, converts them inside the fused reduction and accumulates in
  float32 without a float32 copy of the input.

Internal API (``jxent._distillation``, the divergences of two softmaxes, builds on
these): :func:`floating_pair`, :func:`pair_rows`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _backend
from jxent import _validation as v
from jxent._layout import Axis, flatten_classes, rows_and_masks
from jxent._reduction import reduce_loss
from jxent._rules import custom_jvp_loss
from jxent._softmax import (
    dot_last,
    finite_parts,
    half_gap,
    kept_rows,
    log_shifted_sum,
    log_softmax_from_stats,
    row_sums,
    scaled_logits,
    shifted_exp,
    softmax_from_stats,
)

# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def floating_pair(name_a: str, a, name_b: str, b, *, broadcast: bool = False):
    """Both arrays, checked floating and of one shape (or broadcast to one, as optax's
    elementwise KL does, with ``broadcast``)."""
    a = v.as_array(name_a, a)
    b = v.as_array(name_b, b)
    v.check_floating(name_a, a)
    v.check_floating(name_b, b)
    if not broadcast:
        v.check_shape(name_b, b, a.shape, f"the shape of {name_a}")
        return a, b
    shape = v.broadcast_shape(name_a, a, **{name_b: b})
    return a, jnp.broadcast_to(b, shape)


# --------------------------------------------------------------------------------------------
# KL divergence from log-predictions and (log-)targets
# --------------------------------------------------------------------------------------------


class _KLStats(NamedTuple):
    keep: jax.Array


def pair_rows(name_a: str, a, b, axis, where, reduction: str):
    """Two checked same-shape arrays as rows with their class axes last, and the row and
    class masks of ``where`` (``reduction`` and ``axis`` checked too)."""
    v.check_reduction(reduction)
    axes = v.normalize_axes(axis, a.ndim)
    v.check_classes(name_a, a.shape, axes, axis)
    a_rows, _, row_mask, class_mask = rows_and_masks(a, axes, where)
    return a_rows, flatten_classes(b, axes), row_mask, class_mask


def _kl_sums(log_targets_given: bool, lp, t, class_mask, count_inf: bool):
    """Per row: ``sum_k t_k (log t_k - lp_k)`` and the target mass on ``-inf`` log-predictions.

    With ``count_inf=False`` the mass is taken as 0 (the caller knows there is no
    ``-inf``) and the sum is one reduction, which XLA:CPU runs vectorised; two sums
    over the same inputs become one variadic loop that is 5x slower (measured).
    """
    acc = v.accumulation_dtype(lp.dtype, t.dtype)
    zero = jnp.zeros((), acc)

    def parts(lp, t):
        """(term, weight, lp_finite), elementwise."""
        lp = lp.astype(acc)
        t = t.astype(acc)
        if class_mask is not None:
            lp = jnp.where(class_mask, lp, zero)
            t = jnp.where(class_mask, t, -jnp.inf if log_targets_given else zero)
        lp_finite, lp_floor = finite_parts(lp)
        if log_targets_given:
            weight = jnp.exp(t)  # exactly 0 for a -inf log-target
            _, t_floor = finite_parts(t)
            # (log t - log p) / 2: halves so that neither clamp can overflow the difference.
            return 2 * weight * (0.5 * t_floor - 0.5 * lp_floor), weight, lp_finite
        tiny = jnp.finfo(acc).tiny
        # t log t with 0 log 0 = 0: log(max(t, tiny)) is finite, so t = 0 gives 0 exactly;
        # for 0 < t < tiny it changes the term by less than 100 * tiny.
        return t * (jnp.log(jnp.maximum(t, tiny)) - lp_floor), t, lp_finite

    if not count_inf:
        kl = _backend.reduce_rows(jnp.sum, lambda lp, t: parts(lp, t)[0], (lp, t))
        return kl, jnp.zeros_like(kl)
    term, weight, lp_finite = parts(lp, t)
    sums = row_sums({"term": term, "on_inf": weight * (1 - lp_finite)})
    return sums["term"], sums["on_inf"]


def _kl_forward(log_targets_given: bool, lp, t, class_mask, row_mask):
    sums = functools.partial(_kl_sums, log_targets_given, lp, t, class_mask)
    if class_mask is None:
        # The -inf bookkeeping only for a batch that has a -inf log-prediction. Both
        # branches start from the caller's arrays: arrays computed outside a cond
        # would be materialised as its operands.
        if lp.size == 0:  # an empty batch: nothing to check (and no min to take)
            kl, on_inf = sums(False)
        else:
            kl, on_inf = lax.cond(jnp.min(lp) > -jnp.inf, lambda: sums(False), lambda: sums(True))
    else:
        kl, on_inf = sums(True)
    # Target mass on a -inf log-prediction is impossible under the prediction: +inf.
    loss = jnp.where(on_inf > 0, jnp.inf, kl)
    keep = jnp.ones(loss.shape, jnp.bool_) if row_mask is None else row_mask
    return jnp.where(keep, loss, jnp.zeros((), loss.dtype)), _KLStats(keep)


def _kl_tangent(log_targets_given: bool, arrays, stats: _KLStats, dots):
    lp, t, class_mask, _ = arrays
    lp_dot, t_dot = dots[0], dots[1]
    acc = v.accumulation_dtype(lp.dtype, t.dtype)
    zero = jnp.zeros((), acc)
    lp = lp.astype(acc)
    t = t.astype(acc)
    weight = jnp.exp(t) if log_targets_given else t
    log_t = t if log_targets_given else jnp.log(t)
    on = (weight > 0) & (lp > -jnp.inf)
    if class_mask is not None:
        weight = jnp.where(class_mask, weight, zero)
        on = on & class_mask
    out = -dot_last(weight, lp_dot)
    if t_dot is not None:
        # d/dt [t (log t - log p)] = log t - log p + 1; with log-targets, times t.
        # Taken as 0 where t = 0 or log p = -inf (the one-sided derivatives there are
        # infinite), so that a zero tangent can never give 0 * inf = NaN.
        g = jnp.where(on, log_t - jnp.where(on, lp, zero) + 1, zero)
        if log_targets_given:
            g = weight * g
        out = out + dot_last(g, t_dot)
    return jnp.where(stats.keep, out, zero)


_kl = custom_jvp_loss(_kl_forward, _kl_tangent)


def _kl_public(log_targets_given, log_predictions, targets, axis, where, reduction):
    t_name = "log_targets" if log_targets_given else "targets"
    lp, t = floating_pair("log_predictions", log_predictions, t_name, targets, broadcast=True)
    lp_rows, t_rows, row_mask, class_mask = pair_rows(
        "log_predictions", lp, t, axis, where, reduction
    )
    loss = _kl(log_targets_given, lp_rows, t_rows, class_mask, row_mask)
    return reduce_loss(loss, reduction, row_mask)


def kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "none",
) -> jax.Array:
    r"""Kullback-Leibler divergence of predictions from targets, with ``0 log 0 = 0``.

    .. math::
      \mathrm{KL}(t \,\|\, p) = \sum_k t_k \big(\log t_k - \log p_k\big),

    where a term with :math:`t_k = 0` is exactly 0, in value and in gradient, even
    where :math:`\log p_k = -\infty`. A positive target on a :math:`-\infty`
    log-prediction gives :math:`+\infty` (the target is impossible under the
    prediction). The predictions need not be normalised (the formula is applied
    as written, as optax does).

    Drop-in for :func:`optax.losses.kl_divergence`, which returns NaN for zero
    targets on ``-inf`` log-predictions, e.g. ``kl_divergence(log([0, .5, .5]),
    [0, .5, .5])``; this returns 0.

    Gradients: :math:`\partial/\partial \log p_k = -t_k`;
    :math:`\partial/\partial t_k = \log t_k - \log p_k + 1`, taken as 0 where
    :math:`t_k = 0` or :math:`\log p_k = -\infty` (where the true one-sided
    derivative is infinite), so a zero cotangent never makes NaN.

    Args:
      log_predictions: log-probabilities of the prediction, ``[..., num_classes]``
        (e.g. ``jax.nn.log_softmax(logits)``; for logits use
        :func:`softmax_kl_divergence`).
      targets: target probabilities of a shape that broadcasts to the shape of
        ``log_predictions`` (as in optax, but never enlarging it); non-negative
        (not checked: a negative target gives a meaningless value).
      axis: the class axis, a tuple of class axes, or ``None`` for all axes.
      where: a boolean mask of the batch shape (drops rows) or of the inputs'
        shape (drops classes from the sum).
      reduction: ``"none"`` (per-example), ``"sum"`` or ``"mean"`` (over the rows
        that ``where`` keeps; 0 if none).

    Returns:
      The divergence, float32 for float32 or narrower inputs (float64 if either
      input is float64); with ``reduction="none"`` it has the batch shape.

    Raises:
      TypeError: integer inputs, or a non-boolean ``where``.
      ValueError: ``targets`` that do not broadcast to ``log_predictions``' shape,
        no class along ``axis``, an out-of-range ``axis``, a ``where`` of neither
        shape, an unknown ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> t = jnp.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
      >>> log_p = jnp.log(jnp.array([[0.0, 0.5, 0.5], [0.1, 0.6, 0.3]]))
      >>> print(np.round(np.asarray(jxent.kl_divergence(log_p, t)), 4))
      [0.     0.1861]

    References:
      Kullback and Leibler, `On Information and Sufficiency
      <https://www.jstor.org/stable/2236703>`_, 1951.
    """
    return _kl_public(False, log_predictions, targets, axis, where, reduction)


def kl_divergence_with_log_targets(
    log_predictions: jax.typing.ArrayLike,
    log_targets: jax.typing.ArrayLike,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "none",
) -> jax.Array:
    r"""Kullback-Leibler divergence with the targets given as log-probabilities.

    .. math::
      \mathrm{KL}(t \,\|\, p) = \sum_k e^{\log t_k} \big(\log t_k - \log p_k\big),

    with ``0 log 0 = 0``: a :math:`-\infty` log-target contributes exactly 0 to the
    value and the gradient (optax returns NaN there), and a finite log-target on a
    :math:`-\infty` log-prediction gives :math:`+\infty`.

    Gradients: :math:`\partial/\partial \log p_k = -t_k`;
    :math:`\partial/\partial \log t_k = t_k (\log t_k - \log p_k + 1)`, taken as 0
    where :math:`\log p_k = -\infty`.

    Drop-in for :func:`optax.losses.kl_divergence_with_log_targets`.

    Args:
      log_predictions: log-probabilities of the prediction, ``[..., num_classes]``.
      log_targets: log-probabilities of the target, of a shape that broadcasts
        to the shape of ``log_predictions`` (as in optax, but never enlarging it).
      axis: the class axis, a tuple of class axes, or ``None`` for all axes.
      where: a boolean mask of the batch shape (drops rows) or of the inputs'
        shape (drops classes from the sum).
      reduction: ``"none"`` (per-example), ``"sum"`` or ``"mean"``.

    Returns:
      The divergence, float32 for float32 or narrower inputs.

    Raises:
      TypeError: integer inputs, or a non-boolean ``where``.
      ValueError: ``log_targets`` that do not broadcast to ``log_predictions``'
        shape, no class along ``axis``, an
        out-of-range ``axis``, a bad ``where`` or ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> log_t = jnp.log(jnp.array([0.0, 0.5, 0.5]))
      >>> log_p = jnp.log(jnp.array([0.2, 0.4, 0.4]))
      >>> print(f"{jxent.kl_divergence_with_log_targets(log_p, log_t):.4f}")  # log(1.25)
      0.2231
    """
    return _kl_public(True, log_predictions, log_targets, axis, where, reduction)


# --------------------------------------------------------------------------------------------
# Entropy of a softmax
# --------------------------------------------------------------------------------------------


class _EntropyStats(NamedTuple):
    row_max: jax.Array
    log_sum: jax.Array  # log sum exp(x - row_max)
    entropy: jax.Array
    keep: jax.Array


def _entropy_forward(_, x, class_mask, row_mask):
    acc = v.accumulation_dtype(x.dtype)
    zero = jnp.zeros((), acc)
    s = shifted_exp(x, class_mask, 1.0, acc)
    sums = row_sums({"s": s.e, "gap": s.e * half_gap(s)})
    log_s = log_shifted_sum(sums["s"], s.has_class)
    # H = lse - sum_k p_k z_k = log S + sum_k p_k (max - z_k): two non-negative terms.
    h = log_s + 2 * sums["gap"] / jnp.where(s.has_class, sums["s"], 1)
    keep = kept_rows(s.has_class, row_mask)
    h = jnp.where(keep, h, zero)
    return h, _EntropyStats(s.row_max, log_s, h, keep)


def _entropy_tangent(_, arrays, stats: _EntropyStats, dots):
    x, class_mask, _ = arrays
    acc = stats.entropy.dtype
    zero = jnp.zeros((), acc)
    z = scaled_logits(x, class_mask, 1.0, acc)
    p = softmax_from_stats(z, stats.row_max, stats.log_sum)
    neg_log_p = -log_softmax_from_stats(z, stats.row_max, stats.log_sum)
    # dH / dz_k = p_k (-log p_k - H), exactly 0 on -inf and masked classes, and where p_k
    # underflows (-log p_k may then be inf: 0 * inf must not give NaN).
    g = jnp.where(p > 0, p * (neg_log_p - stats.entropy[..., None]), zero)
    return jnp.where(stats.keep, dot_last(g, dots[0]), zero)


_entropy = custom_jvp_loss(_entropy_forward, _entropy_tangent)


def entropy(
    logits: jax.typing.ArrayLike,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    reduction: str = "none",
) -> jax.Array:
    r"""Shannon entropy (in nats) of the softmax distribution of ``logits``.

    .. math::
      H(p) = -\sum_k p_k \log p_k, \qquad p = \operatorname{softmax}(x),

    computed stably from the logits as :math:`\log S + \sum_k p_k (m - x_k)` with
    :math:`m` the row maximum and :math:`S = \sum_k e^{x_k - m}` (two
    non-negative terms, no cancellation). ``-inf`` logits are classes of
    probability 0 and contribute 0 (``0 log 0 = 0``) to the value and gradient.
    Useful for confidence metrics and entropy regularisation; with
    :func:`softmax_kl_divergence` it splits the cross-entropy to soft targets:
    :math:`H(p, q) = H(p) + \mathrm{KL}(p \,\|\, q)`.

    The gradient is :math:`\partial H / \partial x_k = -p_k (\log p_k + H)`.

    Args:
      logits: unnormalised log-probabilities, ``[..., num_classes]``.
      axis: the class axis, a tuple of class axes, or ``None`` for all axes.
      where: a boolean mask of the batch shape (drops rows) or of the logits'
        shape (drops classes from the softmax).
      reduction: ``"none"`` (per-example), ``"sum"`` or ``"mean"`` (over the rows
        that ``where`` keeps).

    Returns:
      The entropy, float32 for float32 or narrower logits. Rows with no finite
      unmasked logit give 0.

    Raises:
      TypeError: integer logits, a non-boolean ``where``.
      ValueError: a bad ``axis``, ``where`` or ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -jnp.inf, -jnp.inf]])
      >>> print(np.round(np.asarray(jxent.entropy(logits)), 4))  # log 4 and log 2
      [1.3863 0.6931]
    """
    x = v.as_array("logits", logits)
    v.check_floating("logits", x)
    v.check_reduction(reduction)
    axes = v.normalize_axes(axis, x.ndim)
    v.check_classes("logits", x.shape, axes, axis)
    rows, _, row_mask, class_mask = rows_and_masks(x, axes, where)
    loss = _entropy(None, rows, class_mask, row_mask)
    return reduce_loss(loss, reduction, row_mask)
