"""The focal loss (Lin et al., 2017): sigmoid binary cross-entropy down-weighted on
easy examples, on the element-wise core of ``jxent._sigmoid`` (see ``jxent._binary`` for
the design shared by the binary losses).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jxent import _backend
from jxent import _validation as v
from jxent._rules import custom_jvp_loss
from jxent._sigmoid import (
    broadcast_inputs,
    check_labels,
    check_where,
    consts,
    finish_elementwise,
    finite_logits,
    neg_log_sigmoids,
    sigmoid,
)

# --------------------------------------------------------------------------------------------
# Sigmoid focal loss
# --------------------------------------------------------------------------------------------


class _FocalConfig(NamedTuple):
    alpha: float | None  # a static alpha; None with an alpha array, or for no weighting
    gamma: float | None  # a static gamma; None with a gamma array


class _FocalParts(NamedTuple):
    x: jax.Array  # finite logits
    t: jax.Array  # labels, broadcast to the logits' shape
    ce: jax.Array  # binary cross-entropy
    log_1m_pt: jax.Array  # log(1 - p_t), finite for finite logits
    gamma: jax.Array  # a scalar, or broadcast to the logits' shape
    weight: jax.Array  # (1 - p_t) ** gamma
    alpha: jax.Array | None  # alpha, a scalar or broadcast; None without weighting
    alpha_t: jax.Array | None


def _focal_parts(cfg: _FocalConfig, x, t, alpha_arr, gamma_arr, forward: bool) -> _FocalParts:
    acc = v.accumulation_dtype(x.dtype)
    c = consts(acc, forward)
    x = finite_logits(x, c)
    t = jnp.broadcast_to(t.astype(acc), x.shape)
    neg_log_p, neg_log_q = neg_log_sigmoids(x, c)
    ce = t * neg_log_p + (c.one - t) * neg_log_q
    # 1 - p_t = (1 - t) sigmoid(x) + t sigmoid(-x), in log space: finite for every finite
    # logit, so (1 - p_t) ** gamma never meets 0 ** gamma with gamma < 1. The log-add-exp
    # is spelled out with arithmetic only (one side is -inf for hard labels, never both).
    a = jnp.log1p(-t) - neg_log_p
    b = jnp.log(t) - neg_log_q
    log_1m_pt = jnp.maximum(a, b) + jnp.log1p(jnp.exp(-jnp.abs(a - b)))
    alpha = 0.5 if cfg.alpha is None else cfg.alpha
    gamma = 0.0 if cfg.gamma is None else cfg.gamma
    scalars = (jnp.asarray(gamma, acc), jnp.asarray(alpha, acc), jnp.asarray(1 - alpha, acc))
    gamma, alpha, beta = _backend.cpu_barrier(scalars) if forward else scalars  # see consts
    if gamma_arr is not None:
        gamma = jnp.broadcast_to(gamma_arr.astype(acc), x.shape)
    if alpha_arr is not None:
        alpha = jnp.broadcast_to(alpha_arr.astype(acc), x.shape)
        beta = c.one - alpha
    weight = jnp.ones_like(x) if cfg.gamma == 0 else jnp.exp(gamma * log_1m_pt)
    alpha_t = None
    if cfg.alpha is not None or alpha_arr is not None:
        alpha_t = alpha * t + beta * (c.one - t)
    else:
        alpha = None
    return _FocalParts(x, t, ce, log_1m_pt, gamma, weight, alpha, alpha_t)


def _focal_forward(cfg: _FocalConfig, x, t, alpha_arr, gamma_arr):
    f = _focal_parts(cfg, x, t, alpha_arr, gamma_arr, forward=True)
    loss = f.weight * f.ce
    if f.alpha_t is not None:
        loss = f.alpha_t * loss
    return loss, None


def _focal_tangent(cfg: _FocalConfig, arrays, stats, dots):
    f = _focal_parts(cfg, *arrays, forward=False)
    x_dot, t_dot, alpha_dot, gamma_dot = dots
    x, t, gamma = f.x, f.t, f.gamma
    acc = x.dtype
    neg_log_p, neg_log_q = neg_log_sigmoids(x, consts(acc, forward=False))
    alpha_t = 1 if f.alpha_t is None else f.alpha_t
    focusing = cfg.gamma != 0  # a gamma array may hold zeros: its terms then vanish
    out = jnp.zeros(x.shape, acc)

    def tangent(d):
        return jnp.broadcast_to(d.astype(acc), x.shape)

    if x_dot is not None:
        # d/dx [w ce] = w (gamma ce d log(1 - p_t)/dx + sigmoid(x) - t), where
        # d log(1 - p_t)/dx = (1 - 2t) sigmoid(x) sigmoid(-x) / (1 - p_t), evaluated in
        # log space. Finite everywhere; at p_t -> 1 it tends to 0 with the weight.
        g = (1 - t) * sigmoid(x) - t * sigmoid(-x)
        if focusing:
            dlog = (1 - 2 * t) * jnp.exp(-neg_log_p - neg_log_q - f.log_1m_pt)
            g = g + gamma * dlog * f.ce
        out = out + alpha_t * f.weight * g * tangent(x_dot)
    if t_dot is not None:
        # d/dt [alpha_t w ce] = (2 alpha - 1) w ce
        #   + alpha_t (gamma (sigmoid(-x) - sigmoid(x)) (1 - p_t)**(gamma - 1) ce - w x),
        # with (1 - p_t)**(gamma - 1) ce = exp((gamma - 1) log(1 - p_t) + log ce) finite.
        g = -f.weight * x
        if focusing:
            ratio = jnp.exp((gamma - 1) * f.log_1m_pt + jnp.log(f.ce))
            g = g + gamma * (sigmoid(-x) - sigmoid(x)) * ratio
        g = alpha_t * g
        if f.alpha is not None:
            g = g + (2 * f.alpha - 1) * f.weight * f.ce
        out = out + g * tangent(t_dot)
    if alpha_dot is not None:
        # d/d alpha [alpha_t w ce] = (2t - 1) w ce
        out = out + (2 * t - 1) * f.weight * f.ce * tangent(alpha_dot)
    if gamma_dot is not None:
        # d/d gamma [alpha_t w ce] = alpha_t w log(1 - p_t) ce
        out = out + alpha_t * f.weight * f.log_1m_pt * f.ce * tangent(gamma_dot)
    return out


_focal = custom_jvp_loss(_focal_forward, _focal_tangent)


def _focal_option(name: str, value, *, lo: float, hi: float):
    """A static Python number (and 0-d concrete arrays, as such), or a real array that
    broadcasts against the loss (optax takes arrays, traced or not).

    Returns ``(number, None)`` or ``(None, array)``. A concrete array is range-checked
    here; a traced one cannot be.
    """
    if not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return v.static_number(name, value, lo=lo, hi=hi), None
    arr = v.as_array(name, value)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number or array, got dtype {arr.dtype}.")
    try:
        concrete = np.asarray(arr, np.float64)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None, arr
    if arr.ndim == 0:
        return v.static_number(name, float(concrete), lo=lo, hi=hi), None
    bad = ~((concrete >= lo) & (concrete <= hi))
    if bad.any():
        hi_s = "inf)" if hi == float("inf") else f"{hi}]"
        raise ValueError(
            f"{name} must be in [{lo}, {hi_s} everywhere, got {concrete[bad].ravel()[0]} in an "
            f"array of shape {arr.shape}."
        )
    return None, arr


def sigmoid_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    alpha: float | jax.typing.ArrayLike | None = None,
    gamma: float | jax.typing.ArrayLike = 2.0,
    *,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Element-wise sigmoid focal loss (Lin et al., 2017), stable for any logit.

    .. math::
      \ell = \alpha_t\, (1 - p_t)^\gamma\, \mathrm{BCE}(x, t),
      \qquad 1 - p_t = (1 - t)\, \sigma(x) + t\, \sigma(-x),
      \qquad \alpha_t = \alpha t + (1 - \alpha)(1 - t),

    with :math:`\mathrm{BCE}` the sigmoid binary cross-entropy
    (:func:`sigmoid_binary_cross_entropy`); :math:`\alpha_t = 1` when ``alpha`` is
    ``None``. Labels may be soft (in ``[0, 1]``), as in optax.

    :math:`\log(1 - p_t)` is computed in log space from log-sigmoids, so it is
    finite for every finite logit and :math:`(1 - p_t)^\gamma` never meets
    :math:`0^\gamma`; the gradient is written in closed form,

    .. math::
      \frac{\partial \ell}{\partial x} = \alpha_t (1 - p_t)^\gamma
      \Big(\sigma(x) - t + \gamma\, \mathrm{BCE}\,
      \frac{(1 - 2t)\, \sigma(x) \sigma(-x)}{1 - p_t}\Big),

    evaluated in log space, so it is finite for every logit and every
    :math:`\gamma \ge 0`, including :math:`\gamma < 1`, where
    :math:`(1 - p_t)^\gamma` has an infinite derivative at :math:`p_t = 1`: as the
    prediction saturates towards its label (:math:`p_t \to 1`) the gradient tends
    to 0, and at :math:`p_t = 1` exactly (an infinite logit, treated as the largest
    finite float) it is 0. Its own derivative (``jax.hessian``) is exact as well:
    the rule is written with sigmoids and softpluses whose derivatives keep full
    relative precision in the tails. Labels get their exact gradient, and so do
    ``alpha`` and ``gamma`` when they are arrays (:math:`(2t - 1)(1 - p_t)^\gamma
    \mathrm{BCE}` and :math:`\alpha_t (1 - p_t)^\gamma \log(1 - p_t)\, \mathrm{BCE}`).

    Drop-in for :func:`optax.losses.sigmoid_focal_loss` (``alpha`` and ``gamma``
    may also be passed by position here; labels, ``alpha`` and ``gamma`` broadcast
    to the logits' shape, traced or not, as in optax, but never enlarge it).

    Args:
      logits: real-valued logits, any shape (one binary prediction per element).
      labels: targets in ``[0, 1]`` (float, int or bool), of the logits' shape or
        broadcasting to it (NumPy rules, as optax); one that would enlarge it
        (logits ``[N, 1]``, labels ``[N]``) raises.
      alpha: weight of the positive class in ``[0, 1]`` (Lin et al. use 0.25), or
        ``None`` for no weighting: a Python number, or an array broadcasting
        to the logits' shape (e.g. one weight per class), which may be traced.
      gamma: focusing exponent :math:`\gamma \ge 0` (0 gives the plain binary
        cross-entropy): a Python number, or an array broadcasting to the
        logits' shape, which may be traced. A Python 0 skips the focusing terms entirely.
      where: a boolean mask of the loss' shape (or that many dimensions, some of
        size 1): excluded elements give loss 0 and gradient 0.
      reduction: ``"none"`` (element-wise, the logits' shape), ``"sum"`` or
        ``"mean"`` (over the included elements). The paper normalises the sum by
        the number of positive anchors: ``reduction="sum"`` divided by that count.

    Returns:
      The loss, float32 for float32 or narrower logits.

    Raises:
      TypeError: integer logits, complex labels, a non-real ``alpha``/``gamma``.
      ValueError: labels, ``alpha`` or ``gamma`` that do not broadcast to the
        logits' shape; ``alpha`` outside ``[0, 1]`` or ``gamma < 0`` (checked unless
        traced), a bad ``where`` or ``reduction``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> logits = jnp.array([2.0, -1.0, 30.0, -30.0], jnp.float32)
      >>> labels = jnp.array([1.0, 1.0, 1.0, 1.0], jnp.float32)
      >>> loss = jxent.sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=2.0)
      >>> print(np.round(np.asarray(loss), 4))
      [5.000e-04 1.755e-01 0.000e+00 7.500e+00]
      >>> grad = jax.grad(lambda x: jxent.sigmoid_focal_loss(x, labels, gamma=0.5).sum())
      >>> print(np.asarray(grad(logits)))  # gamma < 1: finite, tends to 0 at saturation
      [-6.0455263e-02 -7.7606183e-01 -4.2937779e-20 -1.0000000e+00]

    References:
      Lin, Goyal, Girshick, He & Dollár, `Focal Loss for Dense Object Detection
      <https://arxiv.org/abs/1708.02002>`_, 2017.
    """
    x = v.as_array("logits", logits)
    v.check_floating("logits", x)
    t = check_labels(labels, x, "logits")
    alpha_arr = None
    if alpha is not None:
        alpha, alpha_arr = _focal_option("alpha", alpha, lo=0.0, hi=1.0)
    gamma, gamma_arr = _focal_option("gamma", gamma, lo=0.0, hi=float("inf"))
    v.check_reduction(reduction)
    shape = v.broadcast_shape("logits", x, labels=t, alpha=alpha_arr, gamma=gamma_arr)
    mask = check_where(where, shape, "logits")
    x, t = broadcast_inputs(x, t, shape, mask)
    cfg = _FocalConfig(alpha, gamma)
    return finish_elementwise(_focal(cfg, x, t, alpha_arr, gamma_arr), mask, reduction)
