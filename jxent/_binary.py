"""Binary (sigmoid) cross-entropy from logits and from probabilities, and the focal loss.

These losses are element-wise: every element of ``logits`` is an independent binary
prediction (one output for binary classification, one per label for multi-label
classification), and ``reduction`` sums or averages over all included elements.

Why it is written this way:

* Each loss is a ``jax.custom_jvp`` (see ``jxent._divergence.custom_jvp_loss``)
  whose tangent rule is checkpointed: reverse mode keeps only the inputs, the
  gradient is computed from sigmoids in closed form (never by differentiating
  ``max``/``abs``, whose derivative at 0 is wrong for the softplus form), and
  forward mode keeps working.
* The value is a sum of non-negative terms,
  ``pos_weight * t * softplus(-x) + (1 - t) * softplus(x)``, with
  ``softplus(±x) = max(±x, 0) + log1p(exp(-|x|))``: no overflow and no
  cancellation for logits of any magnitude.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _validation as v
from jxent._divergence import custom_jvp_loss
from jxent._reduction import reduce_loss

# --------------------------------------------------------------------------------------------
# Validation shared by the element-wise losses
# --------------------------------------------------------------------------------------------


def _check_labels(labels, x: jax.Array, x_name: str) -> jax.Array:
    """Labels of exactly ``x``'s shape; integer/bool labels come back in ``x``'s dtype
    (exact for 0 and 1; a wider copy would be stored for the backward pass)."""
    labels = v.as_array("labels", labels)
    if not (
        jnp.issubdtype(labels.dtype, jnp.floating)
        or jnp.issubdtype(labels.dtype, jnp.integer)
        or labels.dtype == jnp.bool_
    ):
        raise TypeError(
            f"labels must be real numbers in [0, 1] (float, int or bool), got dtype "
            f"{labels.dtype} with shape {labels.shape}."
        )
    if labels.shape != x.shape:
        raise ValueError(
            f"labels must have exactly the shape of {x_name} {x.shape} (one label per "
            f"prediction; no implicit broadcasting), got shape {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(x.dtype)
    return labels


def _check_where(where, x: jax.Array, x_name: str) -> jax.Array | None:
    if where is None:
        return None
    where = v.as_array("where", where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
    try:
        if where.ndim != x.ndim:
            raise ValueError
        return jnp.broadcast_to(where, x.shape)
    except ValueError:
        raise ValueError(
            f"where must have the shape of {x_name} {x.shape}, or that number of dimensions "
            f"with some of size 1 (e.g. to mask whole examples), got shape {where.shape}."
        ) from None


def _sanitise(x: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """Replaces excluded elements by a harmless value, so that even NaN there cannot
    leak into the gradient (the select's transpose routes a zero cotangent to them)."""
    if mask is None:
        return x
    return jnp.where(mask, x, jnp.asarray(fill, x.dtype))


def _finish(loss: jax.Array, mask: jax.Array | None, reduction: str) -> jax.Array:
    if mask is not None:
        loss = jnp.where(mask, loss, jnp.zeros((), loss.dtype))
    return reduce_loss(loss, reduction, mask)


class _Consts(NamedTuple):
    zero: jax.Array
    one: jax.Array
    big: jax.Array  # the largest finite float


def _consts(acc, forward: bool) -> _Consts:
    """The scalar constants of an element-wise loss, in the accumulation dtype.

    In a forward pass they go through an optimisation barrier. XLA's CSE would
    otherwise merge a broadcast constant of the forward pass (the 1 of ``1 - t``)
    with the same constant in the backward pass or in the cotangent of a sum, and
    XLA:CPU materialises a broadcast with several users as a full float32 operand of
    the fused reduction; with the barrier a ``"sum"``/``"mean"`` loss needs no
    temporary buffer at all.
    """
    values = (jnp.zeros((), acc), jnp.ones((), acc), jnp.asarray(jnp.finfo(acc).max, acc))
    return _Consts(*(lax.optimization_barrier(values) if forward else values))


def _finite_logits(x: jax.Array, c: _Consts) -> jax.Array:
    """``x`` in the accumulation dtype, with ``±inf`` replaced by the largest finite float."""
    return jnp.minimum(jnp.maximum(x.astype(c.big.dtype), -c.big), c.big)


def _neg_log_sigmoids(x: jax.Array, c: _Consts) -> tuple[jax.Array, jax.Array]:
    """``(-log sigmoid(x), -log sigmoid(-x)) = (softplus(-x), softplus(x))``, both exact."""
    tail = jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.maximum(-x, c.zero) + tail, jnp.maximum(x, c.zero) + tail


# --------------------------------------------------------------------------------------------
# Sigmoid binary cross-entropy
# --------------------------------------------------------------------------------------------


def _smooth(t: jax.Array, a: float, forward: bool) -> jax.Array:
    """Keras' label smoothing ``t (1 - a) + a / 2``, inside the loss so that the smoothed
    labels are recomputed in the backward pass instead of stored."""
    if a == 0:
        return t
    keep, add = jnp.asarray(1 - a, t.dtype), jnp.asarray(0.5 * a, t.dtype)
    if forward:
        keep, add = lax.optimization_barrier((keep, add))
    return t * keep + add


def _sbce_forward(label_smoothing, x, t, pos_weight):
    c = _consts(v.accumulation_dtype(x.dtype), forward=True)
    x = _finite_logits(x, c)
    t = _smooth(t.astype(x.dtype), label_smoothing, forward=True)
    neg_log_p, neg_log_q = _neg_log_sigmoids(x, c)
    pos = t if pos_weight is None else jnp.broadcast_to(pos_weight, x.shape) * t
    return pos * neg_log_p + (c.one - t) * neg_log_q, None


def _sbce_tangent(label_smoothing, arrays, stats, dots):
    x, t, pos_weight = arrays
    x_dot, t_dot, _ = dots
    acc = v.accumulation_dtype(x.dtype)
    c = _consts(acc, forward=False)
    x = _finite_logits(x, c)
    t = _smooth(t.astype(acc), label_smoothing, forward=False)
    out = jnp.zeros(x.shape, acc)
    pw = None if pos_weight is None else jnp.broadcast_to(pos_weight, x.shape)
    if x_dot is not None:
        # d/dx = (1 - t) sigmoid(x) - pw t sigmoid(-x)  (= sigmoid(x) - t without pw),
        # written with both sigmoids so that it keeps full relative precision when
        # either is tiny.
        pos = t if pw is None else pw * t
        g = (1 - t) * jax.nn.sigmoid(x) - pos * jax.nn.sigmoid(-x)
        out = out + g * x_dot.astype(acc)
    if t_dot is not None:
        # d/dt = pw softplus(-x) - softplus(x)  (= -x without pw).
        if pw is None:
            g = -x
        else:
            neg_log_p, neg_log_q = _neg_log_sigmoids(x, c)
            g = pw * neg_log_p - neg_log_q
        if label_smoothing:
            g = (1 - label_smoothing) * g
        out = out + g * t_dot.astype(acc)
    return out


_sbce = custom_jvp_loss(_sbce_forward, _sbce_tangent)


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_weight: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Element-wise sigmoid (binary) cross-entropy from logits.

    For a logit :math:`x`, a label :math:`t \in [0, 1]` (hard or soft) and
    :math:`\sigma` the logistic sigmoid,

    .. math::
      \ell = -w_+\, t \log \sigma(x) - (1 - t) \log\big(1 - \sigma(x)\big)
           = w_+\, t\, \mathrm{softplus}(-x) + (1 - t)\, \mathrm{softplus}(x),

    with :math:`w_+` = ``pos_weight`` (1 if not given), exactly PyTorch's
    ``BCEWithLogitsLoss(pos_weight=...)``. With ``label_smoothing`` :math:`a`
    the labels are first replaced by :math:`t (1 - a) + a / 2` (Keras).

    Exact for logits of any magnitude: the value is computed as a sum of
    non-negative terms with :math:`\mathrm{softplus}(\pm x) = \max(\pm x, 0) +
    \log(1 + e^{-|x|})`, and the gradient in closed form,

    .. math::
      \frac{\partial \ell}{\partial x} = (1 - t)\, \sigma(x) - w_+\, t\, \sigma(-x)
      \;\; (= \sigma(x) - t \text{ for } w_+ = 1),
      \qquad
      \frac{\partial \ell}{\partial t} = w_+ \mathrm{softplus}(-x) - \mathrm{softplus}(x),

    so logits of ``±1e4`` or the float32 maximum give exact finite losses and
    gradients. Infinite logits are treated as the largest finite float.
    ``pos_weight`` is a constant: no gradient flows to it.

    Drop-in for :func:`optax.losses.sigmoid_binary_cross_entropy` (same result,
    one value per element).

    Multi-label classification (several independent yes/no outputs per example)
    is this function over a ``[batch, num_labels]`` array; reduce over the label
    axis yourself for a per-example loss, or use ``reduction="mean"`` for the
    mean over every element (PyTorch's and Keras' default):

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import jxent
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])  # 2 examples, 3 tags
    >>> tags = jnp.array([[1, 0, 1], [0, 1, 0]])
    >>> per_tag = jxent.sigmoid_binary_cross_entropy(logits, tags)  # shape [2, 3]
    >>> print(np.round(np.asarray(per_tag.sum(axis=-1)), 4))  # one loss per example
    [0.9143 0.8827]
    >>> mean = jxent.sigmoid_binary_cross_entropy(logits, tags, reduction="mean")
    >>> print(np.round(np.asarray(mean), 4))  # over all 6 outputs
    0.2995
    >>> # rare positive tags weighted up, per tag (PyTorch's pos_weight):
    >>> weighted = jxent.sigmoid_binary_cross_entropy(
    ...     logits, tags, pos_weight=jnp.array([1.0, 3.0, 2.0]))
    >>> print(np.round(np.asarray(weighted.sum(axis=-1)), 4))
    [1.3883 1.2855]

    Probabilities passed where logits are expected cannot be detected (any real
    number is a valid logit): the result is then silently wrong. For a model that
    already applies a sigmoid, use :func:`binary_cross_entropy`.

    Args:
      logits: real-valued logits, any shape; each element is one binary
        prediction (the log-odds of its label being 1).
      labels: targets in ``[0, 1]`` (float, int or bool) of exactly the logits'
        shape. Values outside ``[0, 1]`` are not checked.
      pos_weight: weight :math:`w_+ \ge 0` of the positive term: a scalar, or one
        weight per class of shape ``[logits.shape[-1]]`` (the last axis is the
        class axis; it broadcasts over the leading axes only).
      label_smoothing: :math:`a \in [0, 1]`, a static Python number.
      where: a boolean mask of the logits' shape (or that many dimensions, some
        of size 1): excluded elements give loss 0 and gradient 0, even if their
        logits are NaN.
      reduction: ``"none"`` (element-wise, the logits' shape), ``"sum"``, or
        ``"mean"`` (over the included elements; 0 if none).

    Returns:
      The loss, float32 for float32 or narrower logits (the gradient has the
      logits' dtype).

    Raises:
      TypeError: integer logits, complex labels, a non-boolean ``where``.
      ValueError: labels not of the logits' shape, ``pos_weight`` of another
        shape than ``()`` or ``[num_classes]``, an option out of range.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> logits = jnp.array([1.5, -0.5, 1e4, -1e4], jnp.float32)
      >>> labels = jnp.array([1.0, 0.0, 1.0, 1.0], jnp.float32)
      >>> loss = jxent.sigmoid_binary_cross_entropy(logits, labels)
      >>> print(np.round(np.asarray(loss), 4))
      [2.014e-01 4.741e-01 0.000e+00 1.000e+04]
      >>> grad = jax.grad(lambda x: jxent.sigmoid_binary_cross_entropy(x, labels).sum())
      >>> print(np.round(np.asarray(grad(logits)), 4))  # sigmoid(x) - t
      [-0.1824  0.3775  0.     -1.    ]
      >>> jxent.sigmoid_binary_cross_entropy(logits.astype(jnp.bfloat16), labels).dtype
      dtype('float32')

    References:
      PyTorch, `BCEWithLogitsLoss
      <https://pytorch.org/docs/stable/generated/torch.nn.BCEWithLogitsLoss.html>`_.
      Keras, `BinaryCrossentropy
      <https://keras.io/api/losses/probabilistic_losses/#binarycrossentropy-class>`_
      (label smoothing).
    """
    x = v.as_array("logits", logits)
    v.check_floating("logits", x)
    t = _check_labels(labels, x, "logits")
    a = v.static_number("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    v.check_reduction(reduction)
    mask = _check_where(where, x, "logits")
    acc = v.accumulation_dtype(x.dtype)
    pw = None
    if pos_weight is not None:
        pw = _check_pos_weight(pos_weight, x, acc)
    x = _sanitise(x, mask, 0.0)
    t = _sanitise(t, mask, 0)
    return _finish(_sbce(a, x, t, pw), mask, reduction)


def _check_pos_weight(pos_weight, x: jax.Array, acc) -> jax.Array:
    pw = v.as_array("pos_weight", pos_weight)
    if not (jnp.issubdtype(pw.dtype, jnp.floating) or jnp.issubdtype(pw.dtype, jnp.integer)):
        raise TypeError(f"pos_weight must be a real number or array, got dtype {pw.dtype}.")
    allowed = {()} if x.ndim == 0 else {(), (x.shape[-1],)}
    if pw.shape not in allowed:
        want = "()" if x.ndim == 0 else f"() or ({x.shape[-1]},) (one weight per class)"
        raise ValueError(
            f"pos_weight must have shape {want}: it broadcasts along the class (last) axis "
            f"of logits {x.shape} only, got shape {pw.shape}."
        )
    return lax.stop_gradient(pw.astype(acc))


# --------------------------------------------------------------------------------------------
# Binary cross-entropy from probabilities (PyTorch's convention)
# --------------------------------------------------------------------------------------------

_LOG_FLOOR = -100.0  # PyTorch's clamp of the logs in F.binary_cross_entropy
_GRAD_EPS = 1e-12  # PyTorch's floor of p (1 - p) in its backward


def _grad_eps(dtype) -> float:
    """PyTorch's 1e-12, raised to 1 / 65504 for float16 so that the bound on the gradient,
    1 / eps, is representable in the gradient's dtype."""
    return max(_GRAD_EPS, 1.0 / float(jnp.finfo(dtype).max))


def _clamped_logs(p: jax.Array, floor) -> tuple[jax.Array, jax.Array]:
    return jnp.maximum(jnp.log(p), floor), jnp.maximum(jnp.log1p(-p), floor)


def _bce_forward(_, p, t):
    acc = v.accumulation_dtype(p.dtype)
    zero, one, floor = lax.optimization_barrier(
        (jnp.zeros((), acc), jnp.ones((), acc), jnp.asarray(_LOG_FLOOR, acc))
    )
    p = p.astype(acc)
    t = t.astype(acc)
    log_p, log_q = _clamped_logs(p, floor)
    # zero - (...) rather than -(...): a loss of exactly 0 is +0, not -0.
    return zero - (t * log_p + (one - t) * log_q), None


def _bce_tangent(_, arrays, stats, dots):
    p, t = arrays
    p_dot, t_dot = dots
    acc = v.accumulation_dtype(p.dtype)
    p = p.astype(acc)
    t = t.astype(acc)
    out = jnp.zeros(p.shape, acc)
    if p_dot is not None:
        eps = _grad_eps(p_dot.dtype)
        out = out + (p - t) / jnp.maximum(p * (1 - p), eps) * p_dot.astype(acc)
    if t_dot is not None:
        log_p, log_q = _clamped_logs(p, _LOG_FLOOR)
        out = out + (log_q - log_p) * t_dot.astype(acc)
    return out


_bce = custom_jvp_loss(_bce_forward, _bce_tangent)


def binary_cross_entropy(
    probs: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Element-wise binary cross-entropy from probabilities (PyTorch's convention).

    For a model that already applies a sigmoid; from logits prefer
    :func:`sigmoid_binary_cross_entropy`, which is exact where probabilities
    saturate. With :math:`p` = ``probs`` and :math:`t` = ``labels``,

    .. math::
      \ell = -\big(t \max(\log p, -100) + (1 - t) \max(\log(1 - p), -100)\big),

    which is PyTorch's ``F.binary_cross_entropy`` / ``BCELoss``: the logs are
    clamped at -100, so :math:`p = 0` or :math:`1` gives a finite loss (at most
    100 per element; 0 when the label agrees). :math:`\log(1 - p)` is computed as
    ``log1p(-p)``, as current PyTorch does.

    The gradient also follows PyTorch's backward exactly, bounded and finite:

    .. math::
      \frac{\partial \ell}{\partial p} = \frac{p - t}{\max\big(p (1 - p), 10^{-12}\big)},
      \qquad
      \frac{\partial \ell}{\partial t} = \max(\log(1 - p), -100) - \max(\log p, -100)

    (the label gradient is that of the clamped expression; PyTorch's is
    :math:`-\operatorname{logit}(p)`, infinite at 0 and 1). For float16
    ``probs`` the floor :math:`10^{-12}` is raised to :math:`1/65504`, so that the
    gradient, at most :math:`1/\text{floor}` in magnitude, stays finite in
    float16.

    Probabilities outside ``[0, 1]`` (for example logits passed by mistake)
    cannot be detected under ``jit``: ``p < 0`` or ``p > 1`` gives a NaN loss.

    Args:
      probs: predicted probabilities in ``[0, 1]``, any shape.
      labels: targets in ``[0, 1]`` (float, int or bool), exactly the shape of
        ``probs``.
      where: a boolean mask of the shape of ``probs`` (or that many dimensions,
        some of size 1): excluded elements give loss 0 and gradient 0.
      reduction: ``"none"`` (element-wise), ``"sum"`` or ``"mean"`` (over the
        included elements; PyTorch's default).

    Returns:
      The loss, float32 for float32 or narrower ``probs``.

    Raises:
      TypeError: integer ``probs``, complex labels, a non-boolean ``where``.
      ValueError: labels not of the shape of ``probs``, a bad ``where`` or
        ``reduction``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> probs = jnp.array([0.9, 0.2, 0.0, 1.0])
      >>> labels = jnp.array([1.0, 0.0, 1.0, 1.0])
      >>> print(np.round(np.asarray(jxent.binary_cross_entropy(probs, labels)), 4))
      [  0.1054   0.2231 100.       0.    ]
      >>> grad = jax.grad(lambda p: jxent.binary_cross_entropy(p, labels, reduction="sum"))
      >>> print(np.asarray(grad(probs)).round(4))  # PyTorch's bound at p = 0: 1e12
      [-1.1111e+00  1.2500e+00 -1.0000e+12  0.0000e+00]

    References:
      PyTorch, `BCELoss
      <https://pytorch.org/docs/stable/generated/torch.nn.BCELoss.html>`_.
    """
    p = v.as_array("probs", probs)
    v.check_floating("probs", p)
    t = _check_labels(labels, p, "probs")
    v.check_reduction(reduction)
    mask = _check_where(where, p, "probs")
    p = _sanitise(p, mask, 0.5)
    t = _sanitise(t, mask, 0)
    return _finish(_bce(None, p, t), mask, reduction)


# --------------------------------------------------------------------------------------------
# Sigmoid focal loss
# --------------------------------------------------------------------------------------------


class _FocalConfig(NamedTuple):
    alpha: float | None
    gamma: float


class _FocalParts(NamedTuple):
    x: jax.Array  # finite logits
    t: jax.Array
    ce: jax.Array  # binary cross-entropy
    log_1m_pt: jax.Array  # log(1 - p_t), finite for finite logits
    weight: jax.Array  # (1 - p_t) ** gamma
    alpha_t: jax.Array | None


def _focal_parts(cfg: _FocalConfig, x, t, forward: bool) -> _FocalParts:
    acc = v.accumulation_dtype(x.dtype)
    c = _consts(acc, forward)
    x = _finite_logits(x, c)
    t = t.astype(acc)
    neg_log_p, neg_log_q = _neg_log_sigmoids(x, c)
    ce = t * neg_log_p + (c.one - t) * neg_log_q
    # 1 - p_t = (1 - t) sigmoid(x) + t sigmoid(-x), in log space: finite for every finite
    # logit, so (1 - p_t) ** gamma never meets 0 ** gamma with gamma < 1. The log-add-exp
    # is spelled out with arithmetic only (one side is -inf for hard labels, never both).
    a = jnp.log1p(-t) - neg_log_p
    b = jnp.log(t) - neg_log_q
    log_1m_pt = jnp.maximum(a, b) + jnp.log1p(jnp.exp(-jnp.abs(a - b)))
    alpha = 0.5 if cfg.alpha is None else cfg.alpha
    scalars = (jnp.asarray(cfg.gamma, acc), jnp.asarray(alpha, acc), jnp.asarray(1 - alpha, acc))
    gamma, alpha, beta = lax.optimization_barrier(scalars) if forward else scalars  # see _consts
    weight = jnp.ones_like(x) if cfg.gamma == 0 else jnp.exp(gamma * log_1m_pt)
    alpha_t = None
    if cfg.alpha is not None:
        alpha_t = alpha * t + beta * (c.one - t)
    return _FocalParts(x, t, ce, log_1m_pt, weight, alpha_t)


def _focal_forward(cfg: _FocalConfig, x, t):
    f = _focal_parts(cfg, x, t, forward=True)
    loss = f.weight * f.ce
    if f.alpha_t is not None:
        loss = f.alpha_t * loss
    return loss, None


def _focal_tangent(cfg: _FocalConfig, arrays, stats, dots):
    f = _focal_parts(cfg, *arrays, forward=False)
    x_dot, t_dot = dots
    x, t = f.x, f.t
    neg_log_p, neg_log_q = _neg_log_sigmoids(x, _consts(x.dtype, forward=False))
    alpha_t = 1 if f.alpha_t is None else f.alpha_t
    out = jnp.zeros(x.shape, x.dtype)
    if x_dot is not None:
        # d/dx [w ce] = w (gamma ce d log(1 - p_t)/dx + sigmoid(x) - t), where
        # d log(1 - p_t)/dx = (1 - 2t) sigmoid(x) sigmoid(-x) / (1 - p_t), evaluated in
        # log space. Finite everywhere; at p_t -> 1 it tends to 0 with the weight.
        g = (1 - t) * jax.nn.sigmoid(x) - t * jax.nn.sigmoid(-x)
        if cfg.gamma != 0:
            dlog = (1 - 2 * t) * jnp.exp(-neg_log_p - neg_log_q - f.log_1m_pt)
            g = g + cfg.gamma * dlog * f.ce
        out = out + alpha_t * f.weight * g * x_dot.astype(x.dtype)
    if t_dot is not None:
        # d/dt [alpha_t w ce] = (2 alpha - 1) w ce
        #   + alpha_t (gamma (sigmoid(-x) - sigmoid(x)) (1 - p_t)**(gamma - 1) ce - w x),
        # with (1 - p_t)**(gamma - 1) ce = exp((gamma - 1) log(1 - p_t) + log ce) finite.
        g = -f.weight * x
        if cfg.gamma != 0:
            ratio = jnp.exp((cfg.gamma - 1) * f.log_1m_pt + jnp.log(f.ce))
            g = g + cfg.gamma * (jax.nn.sigmoid(-x) - jax.nn.sigmoid(x)) * ratio
        g = alpha_t * g
        if cfg.alpha is not None:
            g = g + (2 * cfg.alpha - 1) * f.weight * f.ce
        out = out + g * t_dot.astype(x.dtype)
    return out


_focal = custom_jvp_loss(_focal_forward, _focal_tangent)


def sigmoid_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    alpha: float | None = None,
    gamma: float = 2.0,
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
    finite float) it is 0. ``alpha`` and ``gamma`` are constants; labels get
    their exact gradient.

    Drop-in for :func:`optax.losses.sigmoid_focal_loss` (``alpha`` and ``gamma``
    may also be passed by position here).

    Args:
      logits: real-valued logits, any shape (one binary prediction per element).
      labels: targets in ``[0, 1]`` (float, int or bool), exactly the logits'
        shape.
      alpha: weight of the positive class in ``[0, 1]`` (Lin et al. use 0.25), or
        ``None`` for no weighting; a static Python number.
      gamma: focusing exponent :math:`\gamma \ge 0` (0 gives the plain binary
        cross-entropy); a static Python number.
      where: a boolean mask of the logits' shape (or that many dimensions, some of
        size 1): excluded elements give loss 0 and gradient 0.
      reduction: ``"none"`` (element-wise), ``"sum"`` or ``"mean"`` (over the
        included elements). The paper normalises the sum by the number of
        positive anchors: ``reduction="sum"`` divided by that count.

    Returns:
      The loss, float32 for float32 or narrower logits.

    Raises:
      TypeError: integer logits, complex labels, a traced ``alpha``/``gamma``.
      ValueError: labels not of the logits' shape, ``alpha`` outside ``[0, 1]``,
        ``gamma < 0``, a bad ``where`` or ``reduction``.

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
    t = _check_labels(labels, x, "logits")
    if alpha is not None:
        alpha = v.static_number("alpha", alpha, lo=0.0, hi=1.0)
    gamma = v.static_number("gamma", gamma, lo=0.0)
    v.check_reduction(reduction)
    mask = _check_where(where, x, "logits")
    x = _sanitise(x, mask, 0.0)
    t = _sanitise(t, mask, 0)
    return _finish(_focal(_FocalConfig(alpha, gamma), x, t), mask, reduction)
