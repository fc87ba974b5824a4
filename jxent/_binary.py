"""Binary (sigmoid) cross-entropy from logits and from probabilities, and the focal loss.

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
  it has its own derivative rule: ``_sigmoid``'s is ``sigmoid(x) sigmoid(-x)`` (JAX's
  ``logistic`` uses ``s (1 - s)``, exactly 0 once ``s`` rounds to 1: ``|x| > 17`` in
  float32), ``_softplus_pair``'s are sigmoids, and the gradient of the loss from
  probabilities is differentiated as ``(1 - t) / (1 - p)**2 + t / p**2``.
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jxent import _backend
from jxent import _validation as v
from jxent._reduction import reduce_loss
from jxent._rules import custom_jvp_loss

# --------------------------------------------------------------------------------------------
# Validation shared by the element-wise losses
# --------------------------------------------------------------------------------------------


def _check_labels(labels, x: jax.Array, x_name: str) -> jax.Array:
    """Real labels; integer/bool labels come back in ``x``'s dtype (exact for 0 and 1; a
    wider copy would be stored for the backward pass)."""
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
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(x.dtype)
    return labels


def _same_shape(labels: jax.Array, x: jax.Array, x_name: str) -> None:
    if labels.shape != x.shape:
        raise ValueError(
            f"labels must have exactly the shape of {x_name} {x.shape} (one label per "
            f"prediction; no implicit broadcasting), got shape {labels.shape}."
        )


def _broadcast_shape(x: jax.Array, named: dict[str, jax.Array | None]) -> tuple[int, ...]:
    """The NumPy broadcast of the logits' shape with those of ``named`` (None: absent)."""
    shape = x.shape
    for name, a in named.items():
        if a is None:
            continue
        try:
            shape = np.broadcast_shapes(shape, a.shape)
        except ValueError:
            raise ValueError(
                f"{name} must broadcast against the logits (NumPy rules, as optax): got "
                f"shape {a.shape} for logits of shape {x.shape}"
                + (f" (broadcast so far: {shape})" if shape != x.shape else "")
                + "."
            ) from None
    return tuple(shape)


def _check_where(where, shape: tuple[int, ...], x_name: str) -> jax.Array | None:
    if where is None:
        return None
    where = v.as_array("where", where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
    try:
        if where.ndim != len(shape):
            raise ValueError
        return jnp.broadcast_to(where, shape)
    except ValueError:
        raise ValueError(
            f"where must have the shape of the loss, {shape} ({x_name} and labels "
            f"broadcast), or that number of dimensions with some of size 1 (e.g. to mask "
            f"whole examples), got shape {where.shape}."
        ) from None


def _sanitise(x: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """Replaces excluded elements by a harmless value, so that even NaN there cannot
    leak into the gradient (the select's transpose routes a zero cotangent to them)."""
    if mask is None:
        return x
    return jnp.where(mask, x, jnp.asarray(fill, x.dtype))


def _sanitise_small(a: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """:func:`_sanitise` for an operand that may be smaller than the mask (it broadcasts):
    only an operand of the mask's own shape can be sanitised without a broadcast copy."""
    if mask is None or a.shape != mask.shape:
        return a
    return _sanitise(a, mask, fill)


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

    In a forward pass they go through ``_backend.cpu_barrier``: CSE would otherwise
    share a broadcast constant (the 1 of ``1 - t``) with the backward pass, and
    XLA:CPU materialises such a broadcast as a full float32 buffer; with the barrier a
    ``"sum"``/``"mean"`` loss needs no temporary buffer at all.
    """
    values = (jnp.zeros((), acc), jnp.ones((), acc), jnp.asarray(jnp.finfo(acc).max, acc))
    return _Consts(*(_backend.cpu_barrier(values) if forward else values))


def _finite_logits(x: jax.Array, c: _Consts) -> jax.Array:
    """``x`` in the accumulation dtype, with ``±inf`` replaced by the largest finite float."""
    return jnp.minimum(jnp.maximum(x.astype(c.big.dtype), -c.big), c.big)


@jax.custom_jvp
def _sigmoid(x: jax.Array) -> jax.Array:
    """``sigmoid(x)`` whose derivatives of every order keep full relative precision."""
    return jax.nn.sigmoid(x)


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    # sigmoid(-x) rather than 1 - sigmoid(x): it is the small factor in the tail, where
    # 1 - sigmoid(x) is 0. Recursive, so that the next order is exact as well.
    return _sigmoid(x), _sigmoid(x) * _sigmoid(-x) * x_dot


@jax.custom_jvp
def _softplus_pair(x: jax.Array, zero: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(softplus(-x), softplus(x)) = (-log sigmoid(x), -log sigmoid(-x))``, both exact,
    sharing one ``log1p(exp(-|x|))``; ``zero`` is the constant 0 (see ``_consts``)."""
    tail = jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.maximum(-x, zero) + tail, jnp.maximum(x, zero) + tail


@_softplus_pair.defjvp
def _softplus_pair_jvp(primals, tangents):
    x, zero = primals
    x_dot, _ = tangents  # zero is a constant
    # softplus' = sigmoid, with no max/abs kink at 0 and exact derivatives of every order.
    return _softplus_pair(x, zero), (-_sigmoid(-x) * x_dot, _sigmoid(x) * x_dot)


def _neg_log_sigmoids(x: jax.Array, c: _Consts) -> tuple[jax.Array, jax.Array]:
    """``(-log sigmoid(x), -log sigmoid(-x)) = (softplus(-x), softplus(x))``, both exact."""
    return _softplus_pair(x, c.zero)


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
        keep, add = _backend.cpu_barrier((keep, add))  # see _consts
    return t * keep + add


def _sbce_forward(label_smoothing, x, t, pos_weight):
    c = _consts(v.accumulation_dtype(x.dtype), forward=True)
    x = _finite_logits(x, c)
    t = jnp.broadcast_to(_smooth(t.astype(x.dtype), label_smoothing, forward=True), x.shape)
    neg_log_p, neg_log_q = _neg_log_sigmoids(x, c)
    pos = t if pos_weight is None else jnp.broadcast_to(pos_weight, x.shape) * t
    return pos * neg_log_p + (c.one - t) * neg_log_q, None


def _sbce_tangent(label_smoothing, arrays, stats, dots):
    x, t, pos_weight = arrays
    x_dot, t_dot, _ = dots
    acc = v.accumulation_dtype(x.dtype)
    c = _consts(acc, forward=False)
    x = _finite_logits(x, c)
    t = jnp.broadcast_to(_smooth(t.astype(acc), label_smoothing, forward=False), x.shape)
    out = jnp.zeros(x.shape, acc)
    pw = None if pos_weight is None else jnp.broadcast_to(pos_weight, x.shape)
    if x_dot is not None:
        # d/dx = (1 - t) sigmoid(x) - pw t sigmoid(-x)  (= sigmoid(x) - t without pw),
        # written with both sigmoids so that it keeps full relative precision when
        # either is tiny, and so that its own derivative, (1 - t + pw t) sigmoid(x)
        # sigmoid(-x), is a sum of non-negative terms.
        pos = t if pw is None else pw * t
        g = (1 - t) * _sigmoid(x) - pos * _sigmoid(-x)
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
        broadcasting against it (NumPy rules, as optax: a scalar, ``[batch, 1]``
        for one label per row, ...). Values outside ``[0, 1]`` are not checked.
      pos_weight: weight :math:`w_+ \ge 0` of the positive term: a scalar, or one
        weight per class of shape ``[num_classes]``, the last axis of the loss
        (it broadcasts over the leading axes only).
      label_smoothing: :math:`a \in [0, 1]`, a static Python number.
      where: a boolean mask of the loss' shape (or that many dimensions, some
        of size 1): excluded elements give loss 0 and gradient 0, even if their
        logits are NaN.
      reduction: ``"none"`` (element-wise, the broadcast shape of logits and
        labels), ``"sum"``, or ``"mean"`` (over the included elements; 0 if none).

    Returns:
      The loss, float32 for float32 or narrower logits (the gradient has the
      logits' dtype); element-wise it has the broadcast shape of logits and labels.

    Raises:
      TypeError: integer logits, complex labels, a non-boolean ``where``.
      ValueError: labels that do not broadcast against the logits, ``pos_weight``
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
    t = _check_labels(labels, x, "logits")
    a = v.static_number("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    v.check_reduction(reduction)
    shape = _broadcast_shape(x, {"labels": t})
    mask = _check_where(where, shape, "logits")
    acc = v.accumulation_dtype(x.dtype)
    pw = None
    if pos_weight is not None:
        pw = _check_pos_weight(pos_weight, shape, acc)
    x, t = _broadcast_inputs(x, t, shape, mask)
    return _finish(_sbce(a, x, t, pw), mask, reduction)


def _broadcast_inputs(x: jax.Array, t: jax.Array, shape, mask) -> tuple[jax.Array, jax.Array]:
    """Logits of the loss' shape, sanitised; labels as small as they came unless a mask
    must sanitise them (a label broadcast over excluded elements only may be NaN)."""
    x = _sanitise(jnp.broadcast_to(x, shape), mask, 0.0)
    if mask is not None:
        t = _sanitise(jnp.broadcast_to(t, shape), mask, 0)
    return x, t


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
    # Barrier: see _consts.
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
    t = _check_labels(labels, p, "probs")
    _same_shape(t, p, "probs")  # as PyTorch's BCELoss, which has no broadcasting either
    v.check_reduction(reduction)
    mask = _check_where(where, p.shape, "probs")
    p = _sanitise(p, mask, 0.5)
    t = _sanitise(t, mask, 0)
    return _finish(_bce(None, p, t), mask, reduction)


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
    c = _consts(acc, forward)
    x = _finite_logits(x, c)
    t = jnp.broadcast_to(t.astype(acc), x.shape)
    neg_log_p, neg_log_q = _neg_log_sigmoids(x, c)
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
    gamma, alpha, beta = _backend.cpu_barrier(scalars) if forward else scalars  # see _consts
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
    neg_log_p, neg_log_q = _neg_log_sigmoids(x, _consts(acc, forward=False))
    alpha_t = 1 if f.alpha_t is None else f.alpha_t
    focusing = cfg.gamma != 0  # a gamma array may hold zeros: its terms then vanish
    out = jnp.zeros(x.shape, acc)

    def tangent(d):
        return jnp.broadcast_to(d.astype(acc), x.shape)

    if x_dot is not None:
        # d/dx [w ce] = w (gamma ce d log(1 - p_t)/dx + sigmoid(x) - t), where
        # d log(1 - p_t)/dx = (1 - 2t) sigmoid(x) sigmoid(-x) / (1 - p_t), evaluated in
        # log space. Finite everywhere; at p_t -> 1 it tends to 0 with the weight.
        g = (1 - t) * _sigmoid(x) - t * _sigmoid(-x)
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
            g = g + gamma * (_sigmoid(-x) - _sigmoid(x)) * ratio
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
    against the logits, traced or not, as in optax).

    Args:
      logits: real-valued logits, any shape (one binary prediction per element).
      labels: targets in ``[0, 1]`` (float, int or bool), of the logits' shape or
        broadcasting against it (NumPy rules, as optax).
      alpha: weight of the positive class in ``[0, 1]`` (Lin et al. use 0.25), or
        ``None`` for no weighting: a Python number, or an array broadcasting
        against the loss (e.g. one weight per class), which may be traced.
      gamma: focusing exponent :math:`\gamma \ge 0` (0 gives the plain binary
        cross-entropy): a Python number, or an array broadcasting against the
        loss, which may be traced. A Python 0 skips the focusing terms entirely.
      where: a boolean mask of the loss' shape (or that many dimensions, some of
        size 1): excluded elements give loss 0 and gradient 0.
      reduction: ``"none"`` (element-wise, the broadcast shape of logits, labels,
        ``alpha`` and ``gamma``), ``"sum"`` or ``"mean"`` (over the included
        elements). The paper normalises the sum by the number of positive
        anchors: ``reduction="sum"`` divided by that count.

    Returns:
      The loss, float32 for float32 or narrower logits.

    Raises:
      TypeError: integer logits, complex labels, a non-real ``alpha``/``gamma``.
      ValueError: labels, ``alpha`` or ``gamma`` that do not broadcast against the
        logits; ``alpha`` outside ``[0, 1]`` or ``gamma < 0`` (checked unless
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
    t = _check_labels(labels, x, "logits")
    alpha_arr = None
    if alpha is not None:
        alpha, alpha_arr = _focal_option("alpha", alpha, lo=0.0, hi=1.0)
    gamma, gamma_arr = _focal_option("gamma", gamma, lo=0.0, hi=float("inf"))
    v.check_reduction(reduction)
    shape = _broadcast_shape(x, {"labels": t, "alpha": alpha_arr, "gamma": gamma_arr})
    mask = _check_where(where, shape, "logits")
    x, t = _broadcast_inputs(x, t, shape, mask)
    cfg = _FocalConfig(alpha, gamma)
    return _finish(_focal(cfg, x, t, alpha_arr, gamma_arr), mask, reduction)
