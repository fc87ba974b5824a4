"""Divergences of two softmaxes: knowledge distillation from logits
(``T**2 KL(softmax(t / T) || softmax(z / T))``) and the generalised Jensen-Shannon
divergence, on the same custom-rule pattern as :mod:`jxent._divergence`, whose argument
checks they share.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jxent import _validation as v
from jxent._divergence import floating_pair, pair_rows
from jxent._layout import Axis
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
    xlog_ratio,
)

# --------------------------------------------------------------------------------------------
# Distillation: KL(softmax(teacher / T) || softmax(student / T)) * T**2
# --------------------------------------------------------------------------------------------


class _DistillStats(NamedTuple):
    # log-sum-exp of student / T and of teacher / T, each as its row max and the log of
    # the shifted sum (0 on rows without a finite class), for softmax_from_stats.
    max_s: jax.Array
    log_ss: jax.Array
    max_t: jax.Array
    log_st: jax.Array
    kl: jax.Array  # the unscaled KL (may be +inf)
    keep: jax.Array


def _distill_forward(temperature: float, student, teacher, class_mask, row_mask):
    acc = v.accumulation_dtype(student.dtype, teacher.dtype)
    zero = jnp.zeros((), acc)
    inv_t = 1.0 / temperature
    s = shifted_exp(student, class_mask, inv_t, acc)
    t = shifted_exp(teacher, class_mask, inv_t, acc)
    s_finite, _ = finite_parts(s.z)
    sums = row_sums(
        {
            "t": t.e,
            "s": s.e,
            # sum_k e_t (a'_k - b'_k) / 2, with a', b' the shifted teacher/student logits.
            "gap": t.e * (half_gap(s) - half_gap(t)),
            "on_inf": t.e * (1 - s_finite),
        }
    )
    log_st = log_shifted_sum(sums["t"], t.has_class)
    log_ss = log_shifted_sum(sums["s"], s.has_class)
    # KL = sum_k p_k (log p_k - log q_k) = sum_k p_k (a'_k - b'_k) - log S_t + log S_s.
    kl = 2 * sums["gap"] / jnp.where(t.has_class, sums["t"], 1) + (log_ss - log_st)
    # KL >= 0; rounding can leave a value a few ulps below 0.
    kl = jnp.maximum(kl, zero)
    kl = jnp.where(sums["on_inf"] > 0, jnp.inf, kl)
    keep = kept_rows(t.has_class, row_mask)
    loss = jnp.where(keep, (temperature * temperature) * kl, zero)
    stats = _DistillStats(s.row_max, log_ss, t.row_max, log_st, kl, keep)
    return loss, stats


def _distill_tangent(temperature: float, arrays, stats: _DistillStats, dots):
    student, teacher, class_mask, _ = arrays
    s_dot, t_dot = dots[0], dots[1]
    acc = stats.kl.dtype
    zero = jnp.zeros((), acc)
    inv_t = 1.0 / temperature
    zs = scaled_logits(student, class_mask, inv_t, acc)
    zt = scaled_logits(teacher, class_mask, inv_t, acc)
    p = softmax_from_stats(zt, stats.max_t, stats.log_st)
    out = 0
    if s_dot is not None:
        q = softmax_from_stats(zs, stats.max_s, stats.log_ss)
        # d (T^2 KL) / d student_k = T (q_k - p_k).
        out = out + dot_last(temperature * (q - p), s_dot)
    if t_dot is not None:
        # d (T^2 KL) / d teacher_k = T p_k (log p_k - log q_k - KL): 0 where p_k = 0, and
        # 0 on rows whose KL is +inf (teacher mass on a class the student rules out).
        log_p = log_softmax_from_stats(zt, stats.max_t, stats.log_st)
        log_q = log_softmax_from_stats(zs, stats.max_s, stats.log_ss)
        ok = (p > 0) & jnp.isfinite(stats.kl)[..., None]
        g = jnp.where(ok, log_p - jnp.where(ok, log_q, zero) - stats.kl[..., None], zero)
        out = out + dot_last(temperature * p * g, t_dot)
    return jnp.where(stats.keep, out, zero)


_distill = custom_jvp_loss(_distill_forward, _distill_tangent)


def softmax_kl_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Knowledge-distillation loss straight from logits (Hinton et al., 2015).

    With :math:`p = \operatorname{softmax}(t / T)` (teacher) and
    :math:`q = \operatorname{softmax}(s / T)` (student),

    .. math::
      \ell = T^2\, \mathrm{KL}(p \,\|\, q)
           = T^2 \sum_k p_k \big(\log p_k - \log q_k\big),

    computed in one fused, stable pass over both logit arrays (no softmax or
    log-softmax array is formed). The :math:`T^2` factor keeps the gradient
    scale independent of the temperature, as in the paper. Because
    :math:`H(p, q) = H(p) + \mathrm{KL}(p \,\|\, q)`, at :math:`T = 1` this is
    ``softmax_cross_entropy(s, softmax(t)) - entropy(t)``: the cross-entropy to
    the teacher's soft labels minus a term that does not depend on the student.

    Gradients flow to both inputs:
    :math:`\partial \ell / \partial s_k = T (q_k - p_k)` and
    :math:`\partial \ell / \partial t_k = T p_k (\log p_k - \log q_k -
    \mathrm{KL})`. Wrap the teacher in ``jax.lax.stop_gradient`` (or do not
    differentiate with respect to it) to train the student only; the rule then
    does no work for the teacher.

    Masking: a class that is ``-inf`` in both inputs (or dropped by a
    logits-shaped ``where``) takes no part. A class the teacher rules out
    (``-inf``) contributes 0. A class the student rules out but the teacher does
    not makes the row's loss :math:`+\infty`; its student gradient stays
    :math:`T (q - p)` and its teacher gradient is 0. A row whose teacher logits are
    all ``-inf`` (or all masked) gives loss 0 and gradient 0.

    Args:
      student_logits: ``[..., num_classes]`` logits of the student.
      teacher_logits: logits of the teacher, same shape (any floating dtype).
      temperature: :math:`T > 0`, a static Python number.
      axis: the class axis, a tuple of class axes, or ``None`` for all axes.
      where: a boolean mask of the batch shape (drops rows) or of the logits'
        shape (drops classes from both softmaxes).
      reduction: ``"none"`` (per-example), ``"sum"`` or ``"mean"`` (over the rows
        that ``where`` keeps).

    Returns:
      The loss, float32 for float32 or narrower logits (float64 if either input is
      float64); gradients come back in each input's dtype.

    Raises:
      TypeError: integer logits, a non-static temperature.
      ValueError: mismatched shapes, ``temperature <= 0``, a bad ``axis``,
        ``where`` or ``reduction``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> student = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
      >>> teacher = jnp.array([[2.0, 0.0, -2.0], [0.5, 0.5, 0.0]])
      >>> loss = jxent.softmax_kl_divergence(student, teacher, temperature=2.0)
      >>> print(np.round(np.asarray(loss), 4))
      [0.2411 0.    ]
      >>> # train the student only:
      >>> grad = jax.grad(lambda s: jxent.softmax_kl_divergence(
      ...     s, jax.lax.stop_gradient(teacher), temperature=2.0, reduction="mean"))
      >>> print(np.round(np.asarray(grad(student)), 4))
      [[-0.1588  0.0625  0.0963]
       [ 0.      0.      0.    ]]
      >>> # H(p, q) = H(p) + KL(p || q):
      >>> ce = jxent.softmax_cross_entropy(student, jax.nn.softmax(teacher))
      >>> kl = jxent.softmax_kl_divergence(student, teacher)
      >>> bool(jnp.allclose(ce, jxent.entropy(teacher) + kl))
      True

    References:
      Hinton, Vinyals & Dean, `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015.
    """
    student, teacher = floating_pair(
        "student_logits", student_logits, "teacher_logits", teacher_logits
    )
    temperature = v.static_number("temperature", temperature, lo=0.0, lo_open=True)
    s_rows, t_rows, row_mask, class_mask = pair_rows(
        "student_logits", student, teacher, axis, where, reduction
    )
    loss = _distill(temperature, s_rows, t_rows, class_mask, row_mask)
    return reduce_loss(loss, reduction, row_mask)


# --------------------------------------------------------------------------------------------
# Generalised Jensen-Shannon divergence between two softmaxes
# --------------------------------------------------------------------------------------------


class _JSDStats(NamedTuple):
    max_s: jax.Array
    log_ss: jax.Array
    max_t: jax.Array
    log_st: jax.Array
    kl_p: jax.Array  # sum_k p_k (log p_k - log m_k) (beta = 1: unused)
    kl_q: jax.Array  # sum_k q_k (log q_k - log m_k) (beta = 0: unused)
    keep: jax.Array


def _jsd_logs(beta: float, zs, zt, stats):
    """``(log q, log p, log m)`` of the student's and teacher's softmaxes and their mixture
    ``m = beta p + (1 - beta) q`` (``log m`` None at the ends, where it is one of them)."""
    log_q = log_softmax_from_stats(zs, stats[0], stats[1])
    log_p = log_softmax_from_stats(zt, stats[2], stats[3])
    log_m = None
    if 0 < beta < 1:
        log_m = jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return log_q, log_p, log_m


def _jsd_forward(beta_t, student, teacher, class_mask, row_mask):
    beta, temperature = beta_t
    acc = v.accumulation_dtype(student.dtype, teacher.dtype)
    zero = jnp.zeros((), acc)
    inv_t = 1.0 / temperature
    s = shifted_exp(student, class_mask, inv_t, acc)
    t = shifted_exp(teacher, class_mask, inv_t, acc)
    sums = row_sums({"t": t.e, "s": s.e})
    log_st = log_shifted_sum(sums["t"], t.has_class)
    log_ss = log_shifted_sum(sums["s"], s.has_class)
    log_q, log_p, log_m = _jsd_logs(beta, s.z, t.z, (s.row_max, log_ss, t.row_max, log_st))
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    if beta == 0:  # forward KL(p || q)
        kl_p, kl_q = jnp.sum(xlog_ratio(p, log_p, log_q), -1), jnp.zeros_like(log_st)
        loss = kl_p
    elif beta == 1:  # reverse KL(q || p)
        kl_p, kl_q = jnp.zeros_like(log_st), jnp.sum(xlog_ratio(q, log_q, log_p), -1)
        loss = kl_q
    else:
        kl_p = jnp.sum(xlog_ratio(p, log_p, log_m), -1)
        kl_q = jnp.sum(xlog_ratio(q, log_q, log_m), -1)
        loss = beta * kl_p + (1 - beta) * kl_q
    # A divergence is >= 0; rounding can leave a value a few ulps below 0.
    loss = jnp.maximum(loss, zero)
    keep = kept_rows(t.has_class & s.has_class, row_mask)
    stats = _JSDStats(s.row_max, log_ss, t.row_max, log_st, kl_p, kl_q, keep)
    return jnp.where(keep, loss, zero), stats


def _jsd_tangent(beta_t, arrays, stats: _JSDStats, dots):
    beta, temperature = beta_t
    student, teacher, class_mask, _ = arrays
    s_dot, t_dot = dots[0], dots[1]
    acc = stats.kl_p.dtype
    zero = jnp.zeros((), acc)
    inv_t = 1.0 / temperature
    zs = scaled_logits(student, class_mask, inv_t, acc)
    zt = scaled_logits(teacher, class_mask, inv_t, acc)
    log_q, log_p, log_m = _jsd_logs(
        beta, zs, zt, (stats.max_s, stats.log_ss, stats.max_t, stats.log_st)
    )
    p, q = jnp.exp(log_p), jnp.exp(log_q)

    def softmax_grad(prob, g, g_mean):
        # d/dz_k of a function of softmax(z) with d/dprob_k = g_k: prob_k (g_k - g_mean).
        ok = prob > 0
        return jnp.where(ok, prob * (jnp.where(ok, g, zero) - g_mean[..., None]), zero)

    out = 0
    if s_dot is not None:
        if beta == 0:
            d_s = q - p
        elif beta == 1:
            d_s = softmax_grad(q, log_q - log_p, stats.kl_q)
        else:
            # d JSD / d q_k = (1 - beta) (log q_k - log m_k), whose q-mean is (1 - beta) kl_q.
            d_s = (1 - beta) * softmax_grad(q, log_q - log_m, stats.kl_q)
        out = out + dot_last(inv_t * d_s, s_dot)
    if t_dot is not None:
        if beta == 0:
            d_t = softmax_grad(p, log_p - log_q, stats.kl_p)
        elif beta == 1:
            d_t = p - q
        else:
            d_t = beta * softmax_grad(p, log_p - log_m, stats.kl_p)
        out = out + dot_last(inv_t * d_t, t_dot)
    return jnp.where(stats.keep, out, zero)


_jsd = custom_jvp_loss(_jsd_forward, _jsd_tangent)


def softmax_jensen_shannon_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Generalised Jensen-Shannon divergence between a teacher's and a student's softmax.

    With :math:`p = \operatorname{softmax}(t / T)` (teacher),
    :math:`q = \operatorname{softmax}(s / T)` (student) and the mixture
    :math:`m = \beta p + (1 - \beta) q`,

    .. math::
      \mathrm{JSD}_\beta(p \,\|\, q) = \beta\, \mathrm{KL}(p \,\|\, m)
        + (1 - \beta)\, \mathrm{KL}(q \,\|\, m),

    and at the ends the two KL divergences it interpolates: :math:`\beta = 0` is the
    forward :math:`\mathrm{KL}(p \,\|\, q)`, :math:`\beta = 1` the reverse
    :math:`\mathrm{KL}(q \,\|\, p)` (Liger Kernel's ``jsd`` convention);
    :math:`\beta = 1/2` is the symmetric Jensen-Shannon divergence, bounded by
    :math:`\log 2`. ``log m`` is formed as a ``logaddexp`` of the two
    log-probabilities (no ``log`` of a rounded sum of small probabilities), and
    classes where a distribution is 0 contribute exactly 0 to its term (no NaN from
    ``-inf`` logits). Not scaled by :math:`T^2` (unlike
    :func:`softmax_kl_divergence`).

    Gradients flow to both inputs (wrap the teacher in ``jax.lax.stop_gradient`` to
    train the student only): :math:`\partial / \partial s_k = q_k (g_k - \sum_j q_j
    g_j) / T` with :math:`g_k = (1 - \beta)(\log q_k - \log m_k)`, and symmetrically
    for the teacher. Forward-mode differentiation works too.

    Args:
      student_logits: ``[..., num_classes]`` logits of the student.
      teacher_logits: logits of the teacher, same shape.
      beta: :math:`\beta \in [0, 1]`, a static Python number.
      temperature: :math:`T > 0`, a static Python number (both softmaxes).
      axis: the class axis, a tuple of class axes, or ``None`` for all axes.
      where: a boolean mask of the batch shape (drops rows) or of the logits' shape
        (drops classes from both softmaxes).
      reduction: ``"none"`` (per-example), ``"sum"`` or ``"mean"``.

    Returns:
      The divergence, float32 for float32 or narrower logits (float64 if either input
      is float64). A row without a class (all masked or ``-inf``) gives 0.

    Raises:
      TypeError: integer logits, non-static ``beta`` or ``temperature``.
      ValueError: mismatched shapes, ``beta`` outside ``[0, 1]``, ``temperature <= 0``,
        a bad ``axis``, ``where`` or ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> student = jnp.array([[1.0, 0.0, -1.0]])
      >>> teacher = jnp.array([[2.0, 0.0, -2.0]])
      >>> bool(jxent.softmax_jensen_shannon_divergence(student, teacher)[0] < np.log(2))
      True
      >>> fwd = jxent.softmax_jensen_shannon_divergence(student, teacher, beta=0.0)
      >>> bool(jnp.allclose(fwd, jxent.softmax_kl_divergence(student, teacher)))
      True

    References:
      Lin, `Divergence measures based on the Shannon entropy
      <https://doi.org/10.1109/18.61115>`_, 1991.
      Agarwal et al., `On-Policy Distillation of Language Models (GKD)
      <https://arxiv.org/abs/2306.13649>`_, 2024.
    """
    student, teacher = floating_pair(
        "student_logits", student_logits, "teacher_logits", teacher_logits
    )
    beta = v.static_number("beta", beta, lo=0.0, hi=1.0)
    temperature = v.static_number("temperature", temperature, lo=0.0, lo_open=True)
    s_rows, t_rows, row_mask, class_mask = pair_rows(
        "student_logits", student, teacher, axis, where, reduction
    )
    loss = _jsd((beta, temperature), s_rows, t_rows, class_mask, row_mask)
    return reduce_loss(loss, reduction, row_mask)
