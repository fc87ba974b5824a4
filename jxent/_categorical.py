"""Softmax (categorical) cross-entropy with dense targets and with integer labels.

Drop-in compatible with the functions of the same names in ``optax.losses`` (same
positional arguments and results); every new option is keyword-only.

The layout (class axes, ``where``) and the static options come from ``jxent._layout``,
the core from ``jxent._softmax_xent``.

Internal API (the poly family, ``jxent._poly``, builds on the dense path):
:func:`dense_inputs` (validated dense-target arguments, broadcast to one shape) and
:func:`dense_loss` (their per-row cross-entropy and row mask).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jxent import _validation as v
from jxent._layout import Axis, XentConfig, and_masks, class_masks, flatten_classes, xent_config
from jxent._reduction import mean_weight, reduce_loss
from jxent._softmax import take_classes
from jxent._softmax_xent import softmax_xent


def _core_layout(config: XentConfig, batch_shape, *arrays):
    """The core's config and arrays: as given, or flattened to rows for an empty batch.

    The core flattens the class axes itself (so that reverse mode keeps the caller's
    logits); for an empty batch, which has nothing to keep, they are flattened here.
    """
    if math.prod(batch_shape) != 0:
        return config, arrays
    axes = config.class_axes
    return config._replace(class_axes=None), tuple(flatten_classes(a, axes) for a in arrays)


def dense_inputs(logits, labels, axis, *, one_hot_ints: bool):
    """Validated dense-target arguments, broadcast to one shape as optax's product does.

    Returns ``(logits, labels, axes)``. Integer or bool labels (with ``one_hot_ints``)
    of a shape broadcastable to the logits' are cast to the logits' dtype. When either
    input is float64, so are the logits (the loss accumulates in float64, as optax's).
    """
    logits = v.as_array("logits", logits)
    labels = v.as_array("labels", labels)
    v.check_floating("logits", logits)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        castable = jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_
        try:
            np.broadcast_shapes(logits.shape, labels.shape)
            broadcastable = True
        except ValueError:
            broadcastable = False
        if not (one_hot_ints and castable and broadcastable):
            what = "" if one_hot_ints else "floating "
            raise TypeError(
                f"labels must be {what}target distributions with a shape broadcastable to "
                f"the logits' shape {logits.shape}, got dtype {labels.dtype} with shape "
                f"{labels.shape}; for integer class indices use "
                "softmax_cross_entropy_with_integer_labels."
            )
        labels = labels.astype(logits.dtype)
    shape = v.broadcast_shape("logits", logits, labels=labels)
    axes = v.normalize_axes(axis, len(shape))
    v.check_classes("logits", shape, axes, axis)
    if jnp.float64 in (labels.dtype, logits.dtype):
        logits = logits.astype(jnp.float64)
    return jnp.broadcast_to(logits, shape), jnp.broadcast_to(labels, shape), axes


def dense_loss(logits, labels, axes, where, config: XentConfig):
    """Per-row dense cross-entropy of validated inputs, and the row mask."""
    batch_shape, row_mask, class_mask = class_masks(logits, axes, where)
    config, (logits, labels, class_mask) = _core_layout(
        config, batch_shape, logits, labels, class_mask
    )
    loss = softmax_xent(
        logits, targets=labels, class_mask=class_mask, row_mask=row_mask, config=config
    )
    return loss, row_mask


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy between logits and target distributions.

    For logits :math:`x` and targets :math:`t` over the classes :math:`k`,

    .. math::
      \ell = -\sum_k t'_k \log \operatorname{softmax}(x)_k
             + \lambda_z \Big(\log \sum_k e^{x_k}\Big)^2,
      \qquad t' = (1 - \alpha)\, t + \alpha / K,

    with :math:`\alpha` = ``label_smoothing``, :math:`\lambda_z` = ``z_loss`` and
    :math:`K` the number of unmasked classes. A term with :math:`t'_k = 0`
    contributes exactly 0 even where :math:`x_k = -\infty` (:math:`0 \log 0 = 0`),
    so masked vocabularies are safe: this function is also
    ``safe_softmax_cross_entropy``.

    Drop-in for :func:`optax.losses.softmax_cross_entropy`. Unlike optax it never
    returns NaN for ``-inf`` logits, accumulates bfloat16/float16 logits in
    float32 (the loss is float32, the gradient has the logits' dtype), and its
    reverse-mode rule keeps only per-row scalars besides the inputs.

    Args:
      logits: unnormalised log-probabilities, ``[..., num_classes]``. ``-inf``
        marks a class as impossible (it gets no smoothing mass and no gradient).
      labels: target distributions (any non-negative weights; one-hot, smoothed
        or soft teacher targets) of a shape that broadcasts to the logits' shape
        (as in optax, e.g. ``[num_classes]`` for every row), never enlarging it
        (logits ``[1, K]`` with labels ``[N, K]`` raise; optax broadcasts).
        Integer or bool one-hot labels are cast to the logits' dtype. A float64
        ``labels`` makes the loss float64.
      axis: the class axis, a tuple of class axes, or ``None`` for all axes.
      where: a boolean mask of the batch shape (drops whole rows) or of the
        logits' shape (drops classes from the softmax and the sum).
      label_smoothing: :math:`\alpha \in [0, 1]`, a static Python number.
      z_loss: :math:`\lambda_z \ge 0` (PaLM, T5X), a static Python number.
      reduction: ``"none"`` (per-example, shape of the batch), ``"sum"`` or
        ``"mean"`` (over the rows that ``where`` keeps; 0 if none).

    Returns:
      The loss, float32 for float32 or narrower logits (float64 if either input
      is float64). An empty batch gives an empty loss (0 for ``"sum"``/``"mean"``).

    Raises:
      TypeError: integer logits, or integer labels that do not broadcast against
        the logits (class indices: use
        :func:`softmax_cross_entropy_with_integer_labels`).
      ValueError: ``labels`` that do not broadcast to the logits' shape, no class
        along ``axis``, an out-of-range ``axis``, a ``where`` of neither shape,
        or an option out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(np.round(np.asarray(jxent.softmax_cross_entropy(logits, labels)), 4))
      [0.2761 2.9518]
      >>> masked = jnp.array([[1.2, -jnp.inf, -0.5]])
      >>> print(np.round(np.asarray(jxent.softmax_cross_entropy(masked, labels[:1])), 4))
      [0.1678]

    References:
      Müller, Kornblith & Hinton, `When does label smoothing help?
      <https://arxiv.org/abs/1906.02629>`_, 2019.
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss).
    """
    logits, labels, axes = dense_inputs(logits, labels, axis, one_hot_ints=True)
    v.check_reduction(reduction)
    config = xent_config(label_smoothing, z_loss, class_axes=axes)
    loss, row_mask = dense_loss(logits, labels, axes, where, config)
    return reduce_loss(loss, reduction, row_mask)


safe_softmax_cross_entropy = softmax_cross_entropy


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    logit_soft_cap: float | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy between logits and integer class labels.

    For logits :math:`x`, label :math:`y`, class weights :math:`w` and
    :math:`K` unmasked classes,

    .. math::
      \ell = (1 - \alpha)\, w_y \big(\mathrm{lse}(x) - x_y\big)
             + \frac{\alpha}{K} \sum_k w_k \big(\mathrm{lse}(x) - x_k\big)
             + \lambda_z\, \mathrm{lse}(x)^2,

    where :math:`\mathrm{lse}(x) = \log \sum_k e^{x_k}`. This is PyTorch's
    ``F.cross_entropy(logits, labels, weight=w, label_smoothing=α)`` plus the
    z-loss, computed without ever building a one-hot or smoothed target array.
    With ``logit_soft_cap=c`` the logits are first replaced by
    :math:`c \tanh(x / c)` (Gemma 2).

    ``reduction="mean"`` divides by :math:`\sum w_y` over the included rows
    (PyTorch's rule; the row count without ``class_weights``); rows dropped by
    ``where`` or ``ignore_index`` give loss 0, gradient 0 and do not count.

    Out-of-range labels cannot raise under ``jit``: a label outside
    ``[0, num_classes)`` that is not ``ignore_index`` gives a NaN loss (and NaN
    gradient for its row), never a plausible number. To check labels
    explicitly, call :func:`check_labels` inside ``jax.experimental.checkify``.

    Drop-in for :func:`optax.losses.softmax_cross_entropy_with_integer_labels`.

    Args:
      logits: unnormalised log-probabilities, ``[..., num_classes]``; ``-inf``
        marks an impossible class (no smoothing mass, zero gradient).
      labels: integer class indices with the batch shape (``logits`` without the
        class axes). For a tuple ``axis`` a label is the flat (C-order) index
        into ``logits.shape[axis]``, as in optax.
      axis: the class axis or a tuple of class axes.
      where: a boolean mask of the batch shape (drops rows) or of the logits'
        shape (drops classes from the normaliser).
      ignore_index: rows whose label equals it are dropped (PyTorch's
        ``ignore_index``, e.g. ``-100`` for padding).
      label_smoothing: :math:`\alpha \in [0, 1]`, a static Python number.
      z_loss: :math:`\lambda_z \ge 0`, a static Python number.
      class_weights: ``[num_classes]`` non-negative weights (PyTorch's
        ``weight``); treated as constants in every reduction: no gradient flows
        to them.
      logit_soft_cap: :math:`c > 0` to soft-cap the logits, or ``None``.
      reduction: ``"none"`` (per-example), ``"sum"`` or ``"mean"``.

    Returns:
      The loss, float32 for float32 or narrower logits; with
      ``reduction="none"`` it has the labels' shape.

    Raises:
      TypeError: floating labels or integer logits.
      ValueError: no class along ``axis`` (an empty batch is fine: it gives an
        empty loss), labels not of the batch shape, ``class_weights`` not of shape
        ``[num_classes]``, an out-of-range ``axis`` or option.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([0, 1])
      >>> loss = jxent.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> print(np.round(np.asarray(loss), 4))
      [0.2761 2.9518]
      >>> loss = jxent.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean")
      >>> print(np.round(np.asarray(loss), 4))
      0.2761

    References:
      Szegedy et al., `Rethinking the Inception Architecture
      <https://arxiv.org/abs/1512.00567>`_, 2016 (label smoothing).
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss).
      Gemma Team, `Gemma 2 <https://arxiv.org/abs/2408.00118>`_, 2024 (soft cap).
    """
    logits = v.as_array("logits", logits)
    labels = v.as_array("labels", labels)
    v.check_floating("logits", logits)
    v.check_integer(
        "labels",
        labels,
        " For target distributions use softmax_cross_entropy.",
    )
    v.check_reduction(reduction)
    axes = _integer_axes(axis, logits.ndim)
    v.check_classes("logits", logits.shape, axes, axis)
    config = xent_config(label_smoothing, z_loss, logit_soft_cap, class_axes=axes)
    batch_shape, row_mask, class_mask = class_masks(logits, axes, where)
    v.check_shape("labels", labels, batch_shape, "the logits' shape without the class axes")
    num_classes = math.prod(logits.shape[i] for i in axes)
    if class_weights is not None:
        class_weights = v.as_array("class_weights", class_weights)
        v.check_floating("class_weights", class_weights)
        v.check_shape("class_weights", class_weights, (num_classes,), "one weight per class")
        # Constants, as documented: also in the mean's denominator, so that no reduction
        # gives a partial derivative (the denominator's alone).
        class_weights = jax.lax.stop_gradient(class_weights)
    if ignore_index is not None:
        row_mask = and_masks(row_mask, labels != ignore_index)
    config, (logits, class_mask) = _core_layout(config, batch_shape, logits, class_mask)
    loss = softmax_xent(
        logits,
        labels=labels,
        class_mask=class_mask,
        row_mask=row_mask,
        class_weights=class_weights,
        config=config,
    )

    def take(table, labels):
        # An ignored row's label may be anything: read w_y at a clipped index.
        return take_classes(table, jnp.clip(labels, 0, num_classes - 1))

    weight = mean_weight(row_mask, class_weights, labels, reduction, loss.dtype, take)
    return reduce_loss(loss, reduction, weight)


def _integer_axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        raise TypeError(
            "axis must be an int or a tuple of ints for integer labels, got None "
            "(integer labels need a batch axis)."
        )
    return v.normalize_axes(axis, ndim)


def smooth_labels(
    labels: jax.typing.ArrayLike,
    alpha: jax.typing.ArrayLike,
    *,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Label smoothing of one-hot (or any) target distributions, as optax.

    .. math:: t' = (1 - \alpha)\, t + \alpha / K

    with :math:`K` the number of classes along ``axis`` (those ``where`` keeps).
    For integer labels prefer the ``label_smoothing`` option of
    :func:`softmax_cross_entropy_with_integer_labels`, which never builds the
    ``[..., K]`` array this returns.

    Args:
      labels: floating target distributions, e.g. ``jax.nn.one_hot(y, K)``.
      alpha: the smoothing factor in ``[0, 1]``: a scalar or an array that
        broadcasts to the labels' shape (e.g. one per row, ``[batch, 1]``).
      axis: the class axis or axes.
      where: classes that count in :math:`K`, any shape that broadcasts to the
        labels' shape (e.g. ``[K]`` for every row; optax's rule: the smoothed
        value is returned for every class, counted or not).

    Returns:
      The smoothed targets, of the labels' shape (an ``alpha`` or ``where`` that
      would enlarge it raises; optax broadcasts), and of the labels' dtype
      unless ``alpha`` is a wider float array (a float64 ``alpha`` with float32
      labels gives float64, as optax).

    Example:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> print(jxent.smooth_labels(jnp.array([0.0, 1.0, 0.0, 0.0]), 0.2))
      [0.05 0.85 0.05 0.05]

    References:
      Müller, Kornblith & Hinton, `When does label smoothing help?
      <https://arxiv.org/abs/1906.02629>`_, 2019.
    """
    labels = v.as_array("labels", labels)
    v.check_floating("labels", labels)
    alpha = v.as_array("alpha", alpha)
    # optax's result dtype: the labels' unless alpha is a wider (non-weak) float array.
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(labels, alpha)
    if where is None:
        axes = v.normalize_axes(axis, labels.ndim)
        num_classes = math.prod(labels.shape[i] for i in axes)
        shape = v.broadcast_shape("labels", labels, alpha=alpha)
        labels, alpha = (jnp.broadcast_to(a.astype(dtype), shape) for a in (labels, alpha))
        return (1 - alpha) * labels + alpha / num_classes
    where = v.as_array("where", where)
    shape = v.broadcast_shape("labels", labels, where=where, alpha=alpha)
    axes = v.normalize_axes(axis, len(shape))
    num_classes = jnp.sum(jnp.broadcast_to(where, shape), axis=axes, keepdims=True).astype(dtype)
    labels, alpha, num_classes = (
        jnp.broadcast_to(a.astype(dtype), shape) for a in (labels, alpha, num_classes)
    )
    return (1 - alpha) * labels + alpha / num_classes


def check_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    *,
    ignore_index: int | None = None,
) -> None:
    """Checks integer labels are in range, with ``jax.experimental.checkify``.

    A label outside ``[0, num_classes)`` cannot raise inside ``jit`` (the losses
    return NaN for it instead). Call this inside a function wrapped with
    ``checkify.checkify`` to get an error that says which labels are wrong.

    Args:
      logits: the logits passed to the loss (only their shape is used).
      labels: the integer labels.
      axis: the class axis or axes, as given to the loss.
      ignore_index: a label value that is allowed (padding).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> import jxent
      >>> def loss(logits, labels):
      ...     jxent.check_labels(logits, labels, ignore_index=-100)
      ...     return jxent.softmax_cross_entropy_with_integer_labels(
      ...         logits, labels, ignore_index=-100, reduction="mean")
      >>> err, _ = jax.jit(checkify.checkify(loss))(jnp.zeros((2, 3)), jnp.array([1, 7]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      labels must be in [0, 3) or equal ignore_index; got 1 bad label(s), e.g. 7 ...
    """
    logits = v.as_array("logits", logits)
    labels = v.as_array("labels", labels)
    v.check_integer("labels", labels)
    axes = _integer_axes(axis, logits.ndim)
    num_classes = math.prod(logits.shape[i] for i in axes)
    ok = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        ok = ok | (labels == ignore_index)
    bad = jnp.sum(~ok)
    first = jnp.min(jnp.where(ok, jnp.iinfo(labels.dtype).max, labels))
    checkify.check(
        jnp.all(ok),
        f"labels must be in [0, {num_classes}) or equal ignore_index; "
        "got {n} bad label(s), e.g. {e}",
        n=bad,
        e=first,
    )
