"""Binary (sigmoid) cross-entropy from logits and from probabilities.

These losses are element-wise: every element of ``logits`` is an independent binary
prediction (one output for binary classification, one per label for multi-label
classification), and ``reduction`` sums or averages over all included elements.

Why it is written this way:

* Each loss is a ``jax.custom_jvp`` (see ``jxent._rules.custom_jvp_loss``)
  whose tangent rule is checkpointed: reverse mode keeps only the inputs, the
  gradient is computed from sigmoids in closed form (never by differentiating
  ``max``/``abs``, whose derivative at 0 is wrong for the softplus form), and
  forward mode keeps working.
* Second and higher derivatives differentiate the tangent rule, so every function in
  it has its own derivative rule: the sigmoid and softplus of ``jxent._sigmoid`` (the
  element-wise core this module and ``jxent._focal`` share), and the gradient of the
  loss from probabilities, differentiated as ``(1 - t) / (1 - p)**2 + t / p**2``.
* The value is a sum of non-negative terms,
  ``pos_weight * t * softplus(-x) + (1 - t) * softplus(x)``, with
  ``softplus(±x) = max(±x, 0) + log1p(exp(-|x|))``: no overflow and no
  cancellation for logits of any magnitude.
* Labels (and the focal loss' ``alpha`` and ``gamma`` arrays) broadcast against the
  logits as in optax; they enter the rules at their own shape and are broadcast
  inside, so that reverse mode stores no broadcast copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

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
    same_shape,
    sanitise,
    sigmoid,
)

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
        keep, add = _backend.cpu_barrier((keep, add))  # see consts
    return t * keep + add


def _sbce_forward(label_smoothing, x, t, pos_weight):
    c = consts(v.accumulation_dtype(x.dtype), forward=True)
    x = finite_logits(x, c)
    t = jnp.broadcast_to(_smooth(t.astype(x.dtype), label_smoothing, forward=True), x.shape)
    neg_log_p, neg_log_q = neg_log_sigmoids(x, c)
    pos = t if pos_weight is None else jnp.broadcast_to(pos_weight, x.shape) * t
    return pos * neg_log_p + (c.one - t) * neg_log_q, None


def _sbce_tangent(label_smoothing, arrays, stats, dots):
    x, t, pos_weight = arrays
    x_dot, t_dot, _ = dots
    acc = v.accumulation_dtype(x.dtype)
    c = consts(acc, forward=False)
    x = finite_logits(x, c)
    t = jnp.broadcast_to(_smooth(t.astype(acc), label_smoothing, forward=False), x.shape)
    out = jnp.zeros(x.shape, acc)
    pw = None if pos_weight is None else jnp.broadcast_to(pos_weight, x.shape)
    if x_dot is not None:
        # d/dx = (1 - t) sigmoid(x) - pw t sigmoid(-x)  (= sigmoid(x) - t without pw),
        # written with both sigmoids so that it keeps full relative precision when
        # either is tiny, and so that its own derivative, (1 - t + pw t) sigmoid(x)
        # sigmoid(-x), is a sum of non-negative terms.
        pos = t if pw is None else pw * t
        g = (1 - t) * sigmoid(x) - pos * sigmoid(-x)
        out = out + g * x_dot.astype(acc)
    if t_dot is not None:
        # d/dt = pw softplus(-x) - softplus(x)  (= -x without pw).
        if pw is None:
            g = -x
        else:
            neg_log_p, neg_log_q = neg_log_sigmoids(x, c)
            g = pw * neg_log_p - neg_log_q
        if label_smoothing:
            g = (1 - label_smoothing) * g
        out = out + g * jnp.broadcast_to(t_dot.astype(acc), x.shape)
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

    The second derivative, :math:`(1 - t + w_+ t)\, \sigma(x)\, \sigma(-x)`, keeps
    full relative precision too (``jax.hessian``, forward or reverse mode), also in
    the tails where :math:`\sigma(x)` rounds to 1.

    Drop-in for :func:`optax.losses.sigmoid_binary_cross_entropy` (same result,
    one value per element; labels broadcast against the logits as in optax).

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
      labels: targets in ``[0, 1]`` (float, int or bool), of the logits' shape or
        broadcasting to it (NumPy rules, as optax: a scalar, ``[batch, 1]`` for
        one label per row, ...), never enlarging it: logits ``[N, 1]`` with labels
        ``[N]`` raise (optax returns an ``[N, N]`` loss). Values outside ``[0, 1]``
        are not checked.
      pos_weight: weight :math:`w_+ \ge 0` of the positive term: a scalar, or one
        weight per class of shape ``[num_classes]``, the last axis of the loss
        (it broadcasts over the leading axes only).
      label_smoothing: :math:`a \in [0, 1]`, a static Python number.
      where: a boolean mask of the loss' shape (or that many dimensions, some
        of size 1): excluded elements give loss 0 and gradient 0, even if their
        logits are NaN.
      reduction: ``"none"`` (element-wise, the logits' shape), ``"sum"``, or
        ``"mean"`` (over the included elements; 0 if none).

    Returns:
      The loss, float32 for float32 or narrower logits (the gradient has the
      logits' dtype); element-wise it has the logits' shape.

    Raises:
      TypeError: integer logits, complex labels, a non-boolean ``where``.
      ValueError: labels that do not broadcast to the logits' shape, ``pos_weight``
        of another shape than ``()`` or ``[num_classes]``, an option out of range.

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
      >>> # the second derivative sigmoid(x) sigmoid(-x), exact in the tail as well:
      >>> hess = jax.hessian(lambda x: jxent.sigmoid_binary_cross_entropy(x, 0.0))
      >>> print(f"{float(hess(jnp.float32(30.0))):.4e}")  # float64: 9.3576e-14
      9.3576e-14

    References:
      PyTorch, `BCEWithLogitsLoss
      <https://pytorch.org/docs/stable/generated/torch.nn.BCEWithLogitsLoss.html>`_.
      Keras, `BinaryCrossentropy
      <https://keras.io/api/losses/probabilistic_losses/#binarycrossentropy-class>`_
      (label smoothing).
    """
    x = v.as_array("logits", logits)
    v.check_floating("logits", x)
    t = check_labels(labels, x, "logits")
    a = v.static_number("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    v.check_reduction(reduction)
    shape = v.broadcast_shape("logits", x, labels=t)
    mask = check_where(where, shape, "logits")
    acc = v.accumulation_dtype(x.dtype)
    pw = None
    if pos_weight is not None:
        pw = _check_pos_weight(pos_weight, shape, acc)
    x, t = broadcast_inputs(x, t, shape, mask)
    return finish_elementwise(_sbce(a, x, t, pw), mask, reduction)


def _check_pos_weight(pos_weight, shape: tuple[int, ...], acc) -> jax.Array:
    pw = v.as_array("pos_weight", pos_weight)
    if not (jnp.issubdtype(pw.dtype, jnp.floating) or jnp.issubdtype(pw.dtype, jnp.integer)):
        raise TypeError(f"pos_weight must be a real number or array, got dtype {pw.dtype}.")
    allowed = {()} if not shape else {(), (shape[-1],)}
    if pw.shape not in allowed:
        want = "()" if not shape else f"() or ({shape[-1]},) (one weight per class)"
        raise ValueError(
            f"pos_weight must have shape {want}: it broadcasts along the class (last) axis "
            f"of the loss {shape} (logits and labels broadcast) only, got shape {pw.shape}."
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
    # Barrier: see consts.
    zero, one, floor = _backend.cpu_barrier(
        (jnp.zeros((), acc), jnp.ones((), acc), jnp.asarray(_LOG_FLOOR, acc))
    )
    p = p.astype(acc)
    t = t.astype(acc)
    log_p, log_q = _clamped_logs(p, floor)
    # zero - (...) rather than -(...): a loss of exactly 0 is +0, not -0.
    return zero - (t * log_p + (one - t) * log_q), None


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _bce_grad_p(p: jax.Array, t: jax.Array, eps: float) -> jax.Array:
    """PyTorch's ``(p - t) / max(p (1 - p), eps)``: ``p - t`` is exact where ``p`` is
    near ``t`` (it is where the gradient is small), the quotient is one rounding."""
    return (p - t) / jnp.maximum(p * (1 - p), eps)


@_bce_grad_p.defjvp
def _bce_grad_p_jvp(eps, primals, tangents):
    p, t = primals
    p_dot, t_dot = tangents
    denom = p * (1 - p)
    clamped = denom <= eps
    # Unclamped, d/dp = (1 - t) / (1 - p)**2 + t / p**2: non-negative terms, where the
    # quotient rule's difference cancels (to 0 at p = 1e-8, t = 0 in float32, against 1).
    # Clamped, the gradient is (p - t) / eps. p_safe keeps 1 / p**2 out of the
    # unselected branch (its derivative would be 0 * inf = NaN in reverse mode).
    p_safe = jnp.where(clamped, jnp.full_like(p, 0.5), p)
    curv = (1 - t) / jnp.square(1 - p_safe) + t / jnp.square(p_safe)
    curv = jnp.where(clamped, jnp.full_like(p, 1 / eps), curv)
    slope_t = -1 / jnp.maximum(denom, eps)
    return _bce_grad_p(p, t, eps), curv * p_dot + slope_t * t_dot


def _bce_tangent(_, arrays, stats, dots):
    p, t = arrays
    p_dot, t_dot = dots
    acc = v.accumulation_dtype(p.dtype)
    p = p.astype(acc)
    t = t.astype(acc)
    out = jnp.zeros(p.shape, acc)
    if p_dot is not None:
        out = out + _bce_grad_p(p, t, _grad_eps(p_dot.dtype)) * p_dot.astype(acc)
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
    float16. Second derivatives differentiate this gradient, exactly:
    :math:`(1 - t)/(1 - p)^2 + t/p^2` where it is not clamped, :math:`1/10^{-12}`
    where it is.

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
    t = check_labels(labels, p, "probs")
    same_shape(t, p, "probs")  # as PyTorch's BCELoss, which has no broadcasting either
    v.check_reduction(reduction)
    mask = check_where(where, p.shape, "probs")
    p = sanitise(p, mask, 0.5)
    t = sanitise(t, mask, 0)
    return finish_elementwise(_bce(None, p, t), mask, reduction)
