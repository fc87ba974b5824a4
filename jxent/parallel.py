"""Vocabulary-parallel cross-entropy for code written with ``jax.shard_map``.

Under plain ``jax.jit`` with sharded arrays the ordinary categorical losses
(``jxent.*``) already partition well: give the logits a ``NamedSharding`` with the
vocabulary on a model axis and the batch on a data axis, and XLA reduces max and
sum-exp across shards without gathering the logits. This module is for code that
is *already* inside ``jax.shard_map`` and holds only its own slice of the
vocabulary (Megatron-style tensor parallelism): each function takes the
device-local logits (or output-weight columns) and the name of the mesh axis the
vocabulary is split over, and does the cross-shard reductions itself with
``lax.pmax``/``lax.psum`` on per-row numbers.

Layout on a 2-D ``("data", "model")`` mesh:

=====================  ==========================  ===============================
array                  global shape                ``in_specs``
=====================  ==========================  ===============================
logits                 ``[tokens, V]``             ``P("data", "model")``
hidden states ``x``    ``[tokens, D]``             ``P("data", None)``
output weight ``w``    ``[D, V]``                  ``P(None, "model")``
labels                 ``[tokens]`` (global ids)   ``P("data")``
bias, class weights    ``[V]``                     ``P("model")``
=====================  ==========================  ===============================

Shard ``s`` of ``n`` (its index along ``axis_name``) holds the classes
``[s * V_local, (s + 1) * V_local)``. When the vocabulary size ``V`` is not a
multiple of ``n``, pad the class axis at the end to ``n * ceil(V / n)`` (any
values, ``inf`` and ``NaN`` included: they are selected away before anything reads
them) and pass ``num_classes=V``: the padding classes take no part in the loss
and get exactly zero gradient. Pass ``batch_axis_name="data"`` for a ``"mean"``
over the whole batch (the sum of the per-device sums over the sum of the
per-device counts).

Communication: the forward pass does one ``pmax`` and one ``psum`` of a few
``[rows]`` arrays over ``axis_name``. The backward pass of the logits form does
none (each shard's gradient needs only the per-row log-sum-exp and coefficients
it already holds); that of the linear form sums ``dx`` over ``axis_name`` (``x``
feeds every shard's logits) and, as any data-parallel weight, ``dw`` over the
data axes. Both need ``shard_map``'s default ``check_vma=True``.

What is checked at trace time, from ``shard_map``'s types: the vocabulary-split array
(``local_logits``, ``local_w``) must vary over ``axis_name``, and the per-token
arrays (``x``, ``labels``, ``where``) must not: every shard reduces the same rows, so
tokens split over the vocabulary axis (sequence parallelism over the same mesh axis)
would combine different shards' rows into wrong losses. ``class_weights`` are
constants everywhere: no gradient flows to them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from jxent import _validation as v
from jxent._categorical import xent_config
from jxent._reduction import reduce_loss
from jxent._softmax import (
    XentConfig,
    cap_derivative,
    cap_logits,
    finish_rows,
    finite_parts,
    gather_last,
    row_sums,
    take_classes,
)
from jxent.linear import chunked
from jxent.linear.api import plan_blocks

AxisName = str | tuple[str, ...]

__all__ = ["linear_softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]


class _Layout(NamedTuple):
    """Static description of the vocabulary split (hashable: a nondiff argument)."""

    axis_name: AxisName
    num_shards: int
    local_classes: int  # V_local, the class-axis size on each shard
    num_classes: int  # the true vocabulary size V <= num_shards * local_classes

    @property
    def padded(self) -> bool:
        return self.num_classes < self.num_shards * self.local_classes


def _layout(axis_name, local_classes: int, num_classes) -> _Layout:
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"axis_name must be a mesh axis name or a tuple of names, got {axis_name!r}."
        )
    try:
        num_shards = int(lax.axis_size(axis_name))
    except NameError:
        raise ValueError(
            f"axis_name={axis_name!r} is not a bound mesh axis: call this function inside "
            "jax.shard_map over a mesh that has that axis (the axis the vocabulary is "
            "split over)."
        ) from None
    total = num_shards * local_classes
    if num_classes is None:
        num_classes = total
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be a Python int or None, got {num_classes!r}.")
    if not (num_shards - 1) * local_classes < num_classes <= total:
        raise ValueError(
            f"num_classes must be in ({(num_shards - 1) * local_classes}, {total}] for "
            f"{num_shards} shards of {local_classes} classes (pad the vocabulary at the "
            f"end to a multiple of the shard count, by less than one shard), got "
            f"{num_classes}."
        )
    return _Layout(axis_name, num_shards, local_classes, num_classes)


def _varying(a) -> frozenset:
    """The mesh axes ``a`` varies over inside ``shard_map`` (empty elsewhere)."""
    manual = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset() if manual is None else frozenset(manual.varying)


def _sum_to_type(ct: jax.Array | None, primal: jax.Array | None) -> jax.Array | None:
    """A cotangent summed over the mesh axes it varies over but its primal does not.

    This is the sum autodiff would insert where a replicated value meets a sharded
    one (``x`` replicated over the vocabulary axis feeds every shard's logits: ``dx``
    is summed over that axis; ``w`` replicated over the data axis meets every data
    shard's tokens: ``dw`` is summed over it). Outside ``shard_map``, or with
    ``check_vma=False``, nothing varies and nothing is summed here.
    """
    if ct is None or primal is None:
        return ct
    extra = tuple(sorted(_varying(ct) - _varying(primal)))
    return lax.psum(ct, extra) if extra else ct


def _check_split(name: str, a: jax.Array, layout: _Layout) -> None:
    """``a`` must vary over the vocabulary axis: split over it by ``shard_map``.

    The gradients rely on ``shard_map``'s types (``check_vma=True``, its default): with
    ``check_vma=False`` nothing is typed as varying, and ``psum``'s transpose is
    another ``psum``, which would scale the gradients.
    """
    names = layout.axis_name if isinstance(layout.axis_name, tuple) else (layout.axis_name,)
    missing = [n for n in names if n not in _varying(a)]
    if missing:
        raise ValueError(
            f"{name} must be split over axis_name={layout.axis_name!r} by jax.shard_map "
            f"(its in_specs naming that axis for the vocabulary), with check_vma=True (the "
            f"default); got a value that does not vary over {missing}."
        )


def _check_unsplit(name: str, a: jax.Array | None, layout: _Layout, example: str) -> None:
    """``a`` must be the same on every shard of the vocabulary axis: not vary over it.

    Each shard computes its classes' part of every row's sums and the shards add them
    up, so every shard must see the same rows. A value split over the vocabulary axis
    (say, tokens split over it as in sequence parallelism) would combine one shard's
    rows with another's into plausible but wrong losses, so it is refused at trace
    time. The check reads ``shard_map``'s types, exact under ``check_vma=True`` (the
    default, which ``_check_split`` already requires).
    """
    if a is None:
        return
    names = layout.axis_name if isinstance(layout.axis_name, tuple) else (layout.axis_name,)
    varying = [n for n in names if n in _varying(a)]
    if varying:
        raise ValueError(
            f"{name} must be the same on every shard of axis_name={layout.axis_name!r} (the "
            f"axis the vocabulary is split over: every shard reduces the same rows), i.e. "
            f"not vary over it (in_specs without that axis, e.g. {example}); got a value "
            f"of type {jax.typeof(a)} that varies over {varying}. Split the tokens over "
            f"another mesh axis (batch_axis_name), or all-gather them over {varying} first."
        )


def _shard_offset(layout: _Layout, dtype) -> jax.Array:
    """Global index of this shard's first class."""
    return lax.axis_index(layout.axis_name).astype(dtype) * layout.local_classes


def _real_columns(layout: _Layout, ndim: int) -> jax.Array | None:
    """``[1, ..., V_local]`` bool: True on this shard's real classes (None if unpadded).

    A select with it on the logits, before anything reads them: the padding's values
    (``+inf``, ``NaN``, anything) never reach a sum, a maximum or a gradient, where an
    additive ``-inf`` would turn ``+inf`` into ``NaN`` and keep ``NaN``.
    """
    if not layout.padded:
        return None
    index = _shard_offset(layout, jnp.int32) + jnp.arange(layout.local_classes, dtype=jnp.int32)
    return _rows(index < layout.num_classes, ndim)


def _masked(a: jax.Array, real: jax.Array | None, fill) -> jax.Array:
    """``a`` with ``fill`` on the padding columns (``a`` itself when unpadded)."""
    return a if real is None else jnp.where(real, a, jnp.asarray(fill, a.dtype))


def _rows(vec: jax.Array, ndim: int) -> jax.Array:
    """A ``[classes]`` vector as ``[1, ..., classes]`` (explicit rank broadcast)."""
    return jnp.expand_dims(vec, tuple(range(ndim - 1)))


def _local_pick(table: jax.Array, local: jax.Array, in_shard: jax.Array, zero) -> jax.Array:
    """``table[local]`` where the label is on this shard, 0 elsewhere ([rows])."""
    return jnp.where(in_shard, take_classes(table, jnp.clip(local, 0, table.shape[0] - 1)), zero)


class _Residuals(NamedTuple):
    x: jax.Array
    labels: jax.Array
    class_weights: jax.Array | None
    keep: jax.Array
    row_max: jax.Array
    lse_rel: jax.Array
    scale: jax.Array
    label_coef: jax.Array
    smooth_coef: jax.Array | None


def _forward(layout: _Layout, cfg: XentConfig, x, labels, row_mask, class_weights):
    acc = v.accumulation_dtype(x.dtype)
    a = cfg.label_smoothing
    zero = jnp.zeros((), acc)
    axis = layout.axis_name
    # Padding classes are -inf logits from here on: selected before any reduction reads
    # them, so that no value they hold reaches the loss (see _real_columns).
    masked_x = _masked(x, _real_columns(layout, x.ndim), -jnp.inf)
    z = cap_logits(masked_x, cfg.soft_cap, acc)

    # As in the core: the maximum of the raw logits, capped afterwards (the cap is
    # monotone), so no converted copy of x feeds it; then the max over shards.
    row_max = lax.pmax(cap_logits(jnp.max(masked_x, axis=-1), cfg.soft_cap, acc), axis)
    has_class = row_max > -jnp.inf
    row_max = jnp.where(has_class, row_max, zero)
    terms = {"sum_exp": jnp.exp(z - row_max[..., None])}

    w = None
    if a > 0:
        w = jnp.ones(x.shape[-1:], acc) if class_weights is None else class_weights.astype(acc)

        finite, z_floor = finite_parts(z)
        w_rows = _rows(w, x.ndim)
        # (max - z) / 2 on finite classes: >= 0, never overflows, 0 on -inf logits.
        half_gap = finite * (0.5 * row_max[..., None] - 0.5 * z_floor)
        terms.update(n=finite, w=finite * w_rows, w_half_gap=w_rows * half_gap)
    # One variadic reduction: the logits are read once (see the core's row_sums).
    sums = row_sums(terms)

    # The label's logit and weight live on one shard: pick them there, 0 elsewhere.
    local = labels - _shard_offset(layout, labels.dtype)
    in_shard = (local >= 0) & (local < layout.local_classes)
    x_label = jnp.where(
        in_shard,
        gather_last(x, jnp.clip(local, 0, layout.local_classes - 1)),
        zero.astype(x.dtype),
    )
    sums["z_label"] = jnp.where(in_shard, cap_logits(x_label, cfg.soft_cap, acc), zero)
    if class_weights is not None:
        sums["w_label"] = _local_pick(class_weights.astype(acc), local, in_shard, zero)
    sums = lax.psum(sums, axis)
    valid = (labels >= 0) & (labels < layout.num_classes)
    loss, stats = _combine(cfg, row_max, has_class, sums, valid, row_mask)
    return loss, _Residuals(x, labels, class_weights, *stats)


class _RowStats(NamedTuple):
    """Per-row results of the cross-shard reduction: equal on every shard."""

    keep: jax.Array  # the row contributes (kept and has a class)
    # lse = row_max + lse_rel, kept apart as in the core: the backward pass's
    # exp((z - row_max) - lse_rel) is accurate for logits of any magnitude, where
    # exp(z - lse) inherits lse's rounding (3e-5 relative for float32 logits near 1000).
    row_max: jax.Array  # the global row maximum (0 on rows without a class)
    lse_rel: jax.Array  # log sum_k exp(z_k - row_max) >= 0
    scale: jax.Array  # C + 2 z_loss lse: the coefficient of the softmax in the gradient
    label_coef: jax.Array  # (1 - a) w_y
    smooth_coef: jax.Array | None  # a / K (label smoothing only)


def _combine(cfg: XentConfig, row_max, has_class, sums, valid, row_mask):
    """Per-row loss and gradient coefficients from the reduced sums (same formula as the core).

    ``sums`` holds, summed over the shards and relative to the global ``row_max``:
    ``sum_exp``; ``z_label`` (the label's soft-capped logit); ``w_label`` with class
    weights; with label smoothing ``n`` (classes), ``w`` (sum of weights) and
    ``w_half_gap`` (sum_k w_k (row_max - z_k) / 2, a sum of non-negative terms, halved
    so that it cannot overflow).
    """
    acc = row_max.dtype
    zero = jnp.zeros((), acc)
    a = cfg.label_smoothing
    lse_rel = jnp.log(jnp.where(has_class, sums["sum_exp"], 1))  # lse - row_max >= 0
    w_label = sums.get("w_label", jnp.ones(valid.shape, acc))
    # An out-of-range label (or one on the padding) has no logit: a NaN loss.
    label_coef = (1 - a) * jnp.where(valid, w_label, jnp.nan)
    dist = jnp.where(label_coef != 0, label_coef * (row_max - sums["z_label"]), zero)
    smoothing = (sums["n"], sums["w"], sums["w_half_gap"]) if a > 0 else None
    loss, keep, scale, label_coef, smooth_coef = finish_rows(
        cfg, row_max, lse_rel, has_class, label_coef, dist, label_coef, smoothing, row_mask
    )
    return loss, _RowStats(keep, row_max, lse_rel, scale, label_coef, smooth_coef)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _xent(layout, cfg, x, labels, row_mask, class_weights):
    return _forward(layout, cfg, x, labels, row_mask, class_weights)[0]


def _xent_fwd(layout, cfg, x, labels, row_mask, class_weights):
    return _forward(layout, cfg, x, labels, row_mask, class_weights)


def _xent_bwd(layout, cfg, res: _Residuals, g):
    """d loss / d x on this shard: ``g (scale p - c) dz``, with no communication."""
    x = res.x
    acc = res.lse_rel.dtype
    zero = jnp.zeros((), acc)
    real = _real_columns(layout, x.ndim)
    z = cap_logits(_masked(x, real, -jnp.inf), cfg.soft_cap, acc)
    # Per-row coefficients (0 on dropped rows) times the cotangent.
    g = g.astype(acc)

    def row_coef(c):
        return (g * c)[..., None]

    grad = row_coef(res.scale) * jnp.exp((z - res.row_max[..., None]) - res.lse_rel[..., None])
    if res.smooth_coef is not None:
        finite = finite_parts(z)[0]
        w = jnp.ones((), acc) if res.class_weights is None else res.class_weights.astype(acc)
        w = jnp.expand_dims(w, tuple(range(x.ndim - w.ndim)))
        grad = grad - row_coef(res.smooth_coef) * w * finite
    local = res.labels - _shard_offset(layout, res.labels.dtype)
    is_label = lax.broadcasted_iota(local.dtype, x.shape, x.ndim - 1) == local[..., None]
    grad = grad - jnp.where(is_label, row_coef(res.label_coef), zero)
    dz = cap_derivative(x, cfg.soft_cap, acc)
    if dz is not None:
        grad = grad * dz
    # Exactly 0 on the padding whatever it holds (the soft cap's derivative of a NaN or
    # infinite padding logit is NaN; a select, not a product, removes it).
    grad = _masked(grad, real, 0)
    cw_bar = None if res.class_weights is None else jnp.zeros_like(res.class_weights)
    return _sum_to_type(grad.astype(x.dtype), x), None, None, cw_bar


_xent.defvjp(_xent_fwd, _xent_bwd)


def _reduce(loss, reduction, weight, batch_axis_name):
    if batch_axis_name is None or reduction == "none":
        return reduce_loss(loss, reduction, weight)
    # Over a data-parallel axis, the mean is (sum of sums) / (sum of denominators):
    # a mean of per-device means would be wrong when devices keep different counts.
    total = jnp.sum(loss)
    denom = jnp.sum(weight.astype(loss.dtype)) if weight is not None else loss.size
    total, denom = lax.psum((total, jnp.asarray(denom, loss.dtype)), batch_axis_name)
    if reduction == "sum":
        return total
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1), jnp.zeros_like(total))


def softmax_cross_entropy_with_integer_labels(
    local_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis_name: AxisName,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
    num_classes: int | None = None,
    batch_axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Integer-label softmax cross-entropy over a vocabulary split across devices.

    Call it inside ``jax.shard_map``. It computes exactly
    :func:`jxent.softmax_cross_entropy_with_integer_labels` of the full logits
    (the concatenation of every shard's ``local_logits`` along ``axis_name``),

    .. math::
      \ell = (1 - \alpha)\, w_y \big(\mathrm{lse}(x) - x_y\big)
             + \frac{\alpha}{K} \sum_k w_k \big(\mathrm{lse}(x) - x_k\big)
             + \lambda_z\, \mathrm{lse}(x)^2,

    with :math:`\mathrm{lse}(x) = m + \log \sum_{\text{shards}} \sum_k e^{x_k - m}`,
    :math:`m` the ``pmax`` of the shards' row maxima. Only per-row scalars
    cross devices: one ``pmax`` and one ``psum`` (of the sum-exp, the label's
    logit picked on the shard that owns it, and the smoothing sums) in the
    forward pass, nothing in the backward pass. Reverse mode only (the gradient
    is a ``custom_vjp``).

    Layout on a 2-D ``("data", "model")`` mesh: ``local_logits`` in
    ``P("data", "model")`` (batch split over ``data``, vocabulary over
    ``model``), ``labels`` in ``P("data")`` (global class indices, replicated
    over ``model``), ``class_weights`` in ``P("model")``. Shard ``s`` holds the
    classes ``[s * V_local, (s + 1) * V_local)``. If the vocabulary size ``V`` is
    not a multiple of the model-axis size ``n``, pad the class axis at the end
    to ``n * ceil(V / n)`` (any values, ``inf`` and ``NaN`` included) and pass
    ``num_classes=V``: the padding is selected away before it is read and gets exactly
    zero gradient.

    ``class_weights`` is treated as a constant: no gradient flows to it (nor through
    the ``"mean"``'s denominator).

    Args:
      local_logits: this device's ``[..., V_local]`` slice of the logits (class
        axis last; any floating dtype, bfloat16 accumulates in float32).
      labels: integer global class indices, ``local_logits.shape[:-1]``; the same on
        every shard of ``axis_name`` (not split over it).
      axis_name: the mesh axis (or tuple of axes) the vocabulary is split over.
      ignore_index: rows whose label equals it are dropped (loss 0, gradient 0,
        not counted in the mean).
      label_smoothing: :math:`\alpha \in [0, 1]`, a static Python number.
      z_loss: :math:`\lambda_z \ge 0`, a static Python number.
      logit_soft_cap: :math:`c > 0` to use :math:`c \tanh(x / c)`, or ``None``.
      class_weights: this device's ``[V_local]`` slice of the class weights
        (constants: no gradient flows to them; any values on the padding).
      where: a boolean mask of the batch shape (drops whole rows); not split over
        ``axis_name``, as the labels.
      reduction: ``"none"`` (per-row, replicated over ``axis_name``), ``"sum"``
        or ``"mean"``; over this device's rows, or over every device of
        ``batch_axis_name`` if given.
      num_classes: the true vocabulary size ``V`` when the last shard is padded
        (default: ``V_local`` times the size of ``axis_name``).
      batch_axis_name: the data-parallel mesh axis (or axes) the batch is split
        over, for a ``"sum"``/``"mean"`` over the whole batch (``psum`` of the
        numerator and the denominator).

    Returns:
      float32 losses (float64 for float64 logits) of the labels' shape, or a
      scalar for ``"sum"``/``"mean"``; equal on every device of ``axis_name``.

    Raises:
      TypeError: non-floating logits, non-integer labels, a bad ``axis_name``.
      ValueError: ``axis_name`` not bound by an enclosing ``shard_map``, shapes
        that do not match, ``num_classes`` out of range, an option out of range,
        ``local_logits`` not split over ``axis_name`` (or ``check_vma=False``),
        ``labels`` or ``where`` split over it.

    Example:
      A 2-D ``("data", "model")`` mesh: the batch is split over ``data``, the
      vocabulary over ``model``. Here the mesh is 1 x 1 so that it runs
      anywhere; on 8 devices use e.g. ``jax.make_mesh((2, 4), ...)``. The
      vocabulary of 3 classes is padded to 4 (a multiple of the model-axis
      size) and ``num_classes=3`` masks the padding.

      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import jxent
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([0, 2])
      >>> padded = jnp.pad(logits, ((0, 0), (0, 1)))  # V = 3 -> 4 classes
      >>> def loss_fn(local_logits, local_labels):
      ...     return jxent.parallel.softmax_cross_entropy_with_integer_labels(
      ...         local_logits, local_labels, axis_name="model", num_classes=3,
      ...         reduction="mean", batch_axis_name="data")
      >>> sharded = jax.shard_map(
      ...     loss_fn, mesh=mesh, in_specs=(P("data", "model"), P("data")), out_specs=P())
      >>> loss = jax.jit(sharded)(put(padded, "data", "model"), put(labels, "data"))
      >>> print(f"{float(loss):.4f}")
      0.4640
      >>> single = jxent.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")
      >>> print(f"{float(single):.4f}")
      0.4640

    References:
      Shoeybi et al., `Megatron-LM <https://arxiv.org/abs/1909.08053>`_, 2019
      (vocabulary-parallel cross-entropy).
    """
    x = v.as_array("local_logits", local_logits)
    labels = v.as_array("labels", labels)
    v.check_floating("local_logits", x)
    v.check_integer("labels", labels)
    if x.ndim < 1:
        raise ValueError(f"local_logits must have a class axis, got shape {x.shape}.")
    v.check_shape("labels", labels, x.shape[:-1], "local_logits.shape without the class axis")
    v.check_reduction(reduction)
    cfg = xent_config(label_smoothing, z_loss, logit_soft_cap)
    layout = _layout(axis_name, x.shape[-1], num_classes)
    if labels.dtype != jnp.int64:
        labels = labels.astype(jnp.int32)
    row_mask = None
    if where is not None:
        where = v.as_array("where", where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
        v.check_shape("where", where, labels.shape, "the batch shape: it masks rows")
        row_mask = where
    if ignore_index is not None:
        ignored = labels != ignore_index
        row_mask = ignored if row_mask is None else row_mask & ignored
    if class_weights is not None:
        class_weights = v.as_array("class_weights", class_weights)
        v.check_floating("class_weights", class_weights)
        v.check_shape(
            "class_weights", class_weights, x.shape[-1:], "this shard's slice: one per local class"
        )
        # A constant (see Args); the padding's weights (any values) never take part.
        class_weights = lax.stop_gradient(class_weights)
        class_weights = _masked(class_weights, _real_columns(layout, 1), 0)
    _check_split("local_logits", x, layout)
    _check_unsplit("labels", labels, layout, 'P("data") for labels of P("data", "model") logits')
    _check_unsplit("where", where, layout, 'P("data") as the labels')
    loss = _xent(layout, cfg, x, labels, row_mask, class_weights)
    weight = _mean_weight(layout, labels, row_mask, class_weights, reduction, loss.dtype)
    return _reduce(loss, reduction, weight, batch_axis_name)


def _mean_weight(layout, labels, row_mask, class_weights, reduction, acc):
    """Per-row weight of the mean's denominator: ``w_y`` (from the shard that owns it) on
    kept rows, or just the row mask without class weights."""
    if class_weights is None or reduction != "mean":
        return row_mask
    safe = jnp.clip(labels, 0, layout.num_classes - 1)
    local = safe - _shard_offset(layout, labels.dtype)
    in_shard = (local >= 0) & (local < layout.local_classes)
    zero = jnp.zeros((), acc)
    weight = lax.psum(
        _local_pick(class_weights.astype(acc), local, in_shard, zero), layout.axis_name
    )
    return weight if row_mask is None else jnp.where(row_mask, weight, zero)


# ------------------------------------------------------------------------------------------
# The fused linear loss with a vocabulary-sharded weight
# ------------------------------------------------------------------------------------------


class _LinearSpec(NamedTuple):
    layout: _Layout
    blocks: chunked.Spec


def _local_labels(layout: _Layout, labels: jax.Array):
    """``(int32 label index on this shard or -1, bool label on this shard)``."""
    local = labels - _shard_offset(layout, labels.dtype)
    here = (local >= 0) & (local < layout.local_classes) & (labels < layout.num_classes)
    return jnp.where(here, local, -1).astype(jnp.int32), here


def _linear_forward(spec: _LinearSpec, inp: chunked._Inputs, labels, class_weights, keep):
    """Per-token losses and gradient coefficients: local blocked statistics, then one
    ``pmax`` and one ``psum`` of per-token numbers."""
    layout, cfg = spec.layout, spec.blocks.config
    axis = layout.axis_name
    run = chunked._statistics(spec.blocks, inp)
    acc = run.m.dtype
    zero = jnp.zeros((), acc)
    # Each shard holds at least one real class, so every local maximum is finite.
    row_max = lax.pmax(run.m, axis)
    sums = {"sum_exp": run.s * jnp.exp(run.m - row_max), "z_label": run.z_label}
    if class_weights is not None:
        local, here = _local_labels(layout, labels)
        sums["w_label"] = _local_pick(class_weights.astype(acc), local, here, zero)
    if run.gap is not None:
        # The blocked sum is over this shard's classes relative to its own maximum.
        if inp.class_weights is None:
            local_weight = jnp.asarray(layout.local_classes, acc)
        else:
            local_weight = jnp.sum(inp.class_weights.astype(acc))
        sums["w_half_gap"] = 0.5 * run.gap + (0.5 * row_max - 0.5 * run.m) * local_weight
        sums["w"] = jnp.zeros_like(row_max) + local_weight
    sums = lax.psum(sums, axis)
    if run.gap is not None:
        sums["n"] = jnp.full_like(row_max, layout.num_classes)  # every logit is finite
    valid = (labels >= 0) & (labels < layout.num_classes)
    has_class = jnp.ones(valid.shape, bool)
    loss, stats = _combine(cfg, row_max, has_class, sums, valid, keep)
    coefs = chunked._Coefficients(
        stats.row_max, stats.lse_rel, stats.scale, stats.label_coef, stats.smooth_coef
    )
    return loss, coefs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(spec, x, w, bias, local_labels, labels, keep, class_weights, cw_eff, real):
    inp = chunked._Inputs(x, w, bias, local_labels, cw_eff, real)
    return _linear_forward(spec, inp, labels, class_weights, keep)[0]


def _linear_fwd(spec, *args):
    values, perturbed = chunked._unwrap(args)
    x, w, bias, local_labels, labels, keep, class_weights, cw_eff, real = values
    inp = chunked._Inputs(x, w, bias, local_labels, cw_eff, real)
    loss, coefs = _linear_forward(spec, inp, labels, class_weights, keep)
    return loss, (inp, coefs, chunked._wanted(inp, perturbed))


def _linear_bwd(spec, res, g):
    """The blocked loss's streaming backward pass on this shard's columns. ``dx`` is summed
    over the vocabulary shards (the one collective the math needs: ``x`` feeds every
    shard's logits) and ``dw`` over the data shards (as for any data-parallel weight)."""
    inp, coefs, wanted = res
    if isinstance(g, SymbolicZero):
        grads = chunked._zero_cotangents(inp)
    else:
        scaled = chunked._scaled(coefs, g.astype(coefs.lse_rel.dtype))
        grads = chunked._streaming_grads(spec.blocks, inp, scaled, wanted)
        grads = chunked._fill(inp, grads)  # summed over the axes their primals do not vary over
    return (*grads, None, None, None, None, None, None)


_linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    local_w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis_name: AxisName,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    num_classes: int | None = None,
    batch_axis_name: AxisName | None = None,
    chunk_size: int | tuple[int, int] | None = None,
) -> jax.Array:
    r"""The fused linear softmax cross-entropy with the output weight split over devices.

    Call it inside ``jax.shard_map``. It computes
    :func:`jxent.linear_softmax_cross_entropy` ``(x, w, labels, ...)`` where ``w`` is
    the concatenation of every shard's ``local_w`` along its columns: each shard forms
    its own logits ``x @ local_w`` block by block (never the whole ``[tokens, V_local]``
    array) with the blocked loss's streaming schedule, then the shards combine per-token
    numbers: one ``pmax`` of the maxima and one ``psum`` of the sum-exp, the label's
    logit (found on the shard that owns it) and the smoothing sums. The backward pass
    recomputes each block's logits, keeps ``d local_w`` on its shard and sums
    ``dx`` over the shards: a ``[tokens, D]`` all-reduce, the one collective that the
    math needs (``x`` feeds every shard's logits). Reverse mode only.

    Layout on a 2-D ``("data", "model")`` mesh: ``x`` in ``P("data", None)`` (tokens
    split over ``data``, hidden size whole), ``local_w`` from ``w`` in
    ``P(None, "model")`` (vocabulary columns split over ``model``), ``labels`` in
    ``P("data")`` (global class indices), ``bias`` and ``class_weights`` in
    ``P("model")``. Shard ``s`` owns the classes ``[s * V_local, (s + 1) * V_local)``.
    If ``V`` is not a multiple of the model-axis size ``n``, pad ``w`` (and ``bias``,
    ``class_weights``) with columns at the end to ``n * ceil(V / n)`` (any values,
    ``inf`` and ``NaN`` included) and pass ``num_classes=V``: the padding takes no part
    (its logits and weights are selected away) and its gradient is exactly 0.

    ``class_weights`` is treated as a constant: no gradient flows to it (nor through
    the ``"mean"``'s denominator).

    Args:
      x: hidden states ``[..., D]``, the same on every shard of ``axis_name`` (not
        split over it: checked from ``shard_map``'s types).
      local_w: this device's ``[D, V_local]`` columns of the output projection.
      labels: integer global class indices of shape ``x.shape[:-1]``, not split over
        ``axis_name`` (as ``x``).
      axis_name: the mesh axis (or tuple of axes) the vocabulary is split over.
      bias: this device's ``[V_local]`` slice of the bias, or ``None``.
      ignore_index: tokens whose label equals it are dropped.
      where: boolean mask of shape ``x.shape[:-1]``; False drops a token. Not split
        over ``axis_name`` (as ``x``).
      label_smoothing: :math:`\alpha \in [0, 1]` over the ``V`` real classes.
      z_loss: :math:`\lambda_z \ge 0`.
      logit_soft_cap: :math:`c > 0` to use :math:`c \tanh(z / c)`, or ``None``.
      class_weights: this device's ``[V_local]`` slice of the class weights
        (constants: no gradient flows to them; any values on the padding).
      reduction: ``"mean"`` (default, as :func:`jxent.linear_softmax_cross_entropy`),
        ``"sum"`` or ``"none"``; over this device's tokens, or over every device of
        ``batch_axis_name`` if given.
      num_classes: the true vocabulary size ``V`` when the last shard is padded.
      batch_axis_name: the data-parallel mesh axis (or axes) for a global
        ``"sum"``/``"mean"``.
      chunk_size: vocabulary columns per block on each shard, or a pair (tokens,
        columns); ``None`` chooses as :func:`jxent.linear_softmax_cross_entropy`
        does for per-token losses (its streaming schedule).

    Returns:
      float32 losses (float64 for float64 inputs): of shape ``x.shape[:-1]`` for
      ``"none"``, else a scalar; equal on every device of ``axis_name``.

    Raises:
      TypeError: non-floating ``x``/``local_w``/``bias``/``class_weights``,
        non-integer labels, a non-boolean ``where``, a bad ``axis_name``.
      ValueError: ``axis_name`` not bound by an enclosing ``shard_map``, shapes that
        do not match, ``num_classes`` out of range, an option out of range,
        ``local_w`` not split over ``axis_name`` (or ``check_vma=False``), ``x``,
        ``labels`` or ``where`` split over it.

    Example:
      A 1 x 1 mesh so that it runs anywhere (e.g. ``(2, 4)`` on 8 devices); the
      vocabulary of 3 classes is padded to 4 columns.

      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import jxent
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> labels = jnp.array([1, 0, 2])
      >>> w_padded = jnp.pad(w, ((0, 0), (0, 1)))  # V = 3 -> 4 columns
      >>> def loss_fn(x, local_w, labels):
      ...     return jxent.parallel.linear_softmax_cross_entropy(
      ...         x, local_w, labels, axis_name="model", num_classes=3,
      ...         batch_axis_name="data")
      >>> sharded = jax.shard_map(
      ...     loss_fn, mesh=mesh, in_specs=(P("data", None), P(None, "model"), P("data")),
      ...     out_specs=P())
      >>> args = put(x, "data", None), put(w_padded, None, "model"), put(labels, "data")
      >>> print(f"{float(jax.jit(sharded)(*args)):.4f}")
      1.5740
      >>> print(f"{float(jxent.linear_softmax_cross_entropy(x, w, labels)):.4f}")
      1.5740

    References:
      Shoeybi et al., `Megatron-LM <https://arxiv.org/abs/1909.08053>`_, 2019.
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024.
    """
    x, w, labels, bias, class_weights, row_mask = v.linear_inputs(
        x,
        local_w,
        labels,
        bias,
        class_weights,
        where,
        w_name="local_w",
        w_shape="(D, V_local) = ({D}, columns on this shard)",
        per_column="this shard's slice of the columns",
    )
    batch_shape = x.shape[:-1]
    v.check_reduction(reduction)
    cfg = xent_config(label_smoothing, z_loss, logit_soft_cap)
    layout = _layout(axis_name, w.shape[1], num_classes)
    _check_split("local_w", w, layout)
    _check_unsplit("x", x, layout, 'P("data", None) for x beside local_w in P(None, "model")')
    _check_unsplit("labels", labels, layout, 'P("data") as x\'s tokens')
    _check_unsplit("where", row_mask, layout, 'P("data") as x\'s tokens')
    real = _real_columns(layout, 1)
    if class_weights is not None:
        # A constant (see Args); the padding's weights (any values) never take part.
        class_weights = _masked(lax.stop_gradient(class_weights), real, 0)
    if ignore_index is not None:
        ignored = labels != ignore_index
        row_mask = ignored if row_mask is None else row_mask & ignored

    n = labels.size
    dtypes = [x.dtype, w.dtype] + ([] if bias is None else [bias.dtype])
    acc = v.accumulation_dtype(functools.reduce(jnp.promote_types, dtypes))
    token_block, vocab_block, _ = plan_blocks(
        n,
        x.shape[-1],
        w.shape[1],
        "none",
        chunk_size,
        jnp.dtype(acc).itemsize,
        jax.default_backend(),
    )
    spec = _LinearSpec(layout, chunked.Spec(cfg, token_block, vocab_block))
    flat_labels = labels.reshape(n)
    if flat_labels.dtype != jnp.int64:
        flat_labels = flat_labels.astype(jnp.int32)
    local_labels, _ = _local_labels(layout, flat_labels)
    cw_eff = class_weights
    if real is not None and class_weights is None and cfg.label_smoothing > 0:
        # Smoothing sums run over every column: give the padding weight 0 there.
        cw_eff = real.astype(acc)
    keep = None if row_mask is None else row_mask.reshape(n)
    loss = _linear(
        spec,
        x.reshape(n, x.shape[-1]),
        w,
        bias,
        local_labels,
        flat_labels,
        keep,
        class_weights,
        cw_eff,
        real,
    ).reshape(batch_shape)
    weight = _mean_weight(layout, labels, row_mask, class_weights, reduction, loss.dtype)
    return _reduce(loss, reduction, weight, batch_axis_name)


# ------------------------------------------------------------------------------------------
# jxent.linear_softmax_cross_entropy under jit with Explicit mesh axes
# ------------------------------------------------------------------------------------------


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _explicit_spec(a: jax.Array) -> tuple:
    """The array's PartitionSpec entries (one per dimension) when typed with Explicit axes."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    if spec is None:
        return (None,) * a.ndim
    return tuple(spec) + (None,) * (a.ndim - len(spec))


def explicitly_sharded(*arrays) -> bool:
    """Whether any array's type names a mesh axis (``Explicit`` axes, outside shard_map)."""
    return any(any(_names(e) for e in _explicit_spec(a)) for a in arrays if a is not None)


def linear_from_explicit_sharding(x, w, labels, *, reduction, chunk_size, **options):
    """:func:`jxent.linear_softmax_cross_entropy` of arrays sharded with ``Explicit`` axes.

    A loop over vocabulary blocks of a ``w`` sharded over its columns has no typed
    sharded form, so the loss runs under ``shard_map`` over the arrays' mesh: tokens
    split as ``x``'s batch dimensions are (over the axes that do not split the
    vocabulary), vocabulary columns as ``w``'s are. With the vocabulary split, each
    device runs :func:`linear_softmax_cross_entropy` of this module on its columns;
    otherwise the blocked loss on its tokens. Arguments are validated already.
    """
    from jxent.linear.api import linear_softmax_cross_entropy as blocked

    vocab = _names(_explicit_spec(w)[1])
    batch_spec = tuple(
        tuple(n for n in _names(e) if n not in vocab) or None for e in _explicit_spec(x)[:-1]
    )
    batch_names = tuple(n for e in batch_spec for n in _names(e)) or None
    sharded = [a for a in (w, x, labels) if explicitly_sharded(a)]
    mesh = jax.typeof(sharded[0]).sharding.mesh
    vocab_entry = (vocab if len(vocab) > 1 else vocab[0]) if vocab else None
    token = P(*batch_spec)
    specs = {"x": P(*batch_spec, None), "w": P(None, vocab_entry), "labels": token}
    for name, spec in (("bias", P(vocab_entry)), ("class_weights", P(vocab_entry))):
        if options.get(name) is not None:
            specs[name] = spec
    if options.get("where") is not None:
        specs["where"] = token
    arrays = {"x": x, "w": w, "labels": labels, **{k: options[k] for k in specs if k in options}}
    arrays = {k: jax.sharding.reshard(a, specs[k]) for k, a in arrays.items()}
    static = {k: val for k, val in options.items() if k not in arrays}

    def local(arrays):
        kw = {k: a for k, a in arrays.items() if k not in ("x", "w", "labels")}
        if vocab:
            return linear_softmax_cross_entropy(
                arrays["x"],
                arrays["w"],
                arrays["labels"],
                axis_name=vocab_entry,
                reduction=reduction,
                batch_axis_name=batch_names,
                chunk_size=chunk_size,
                **kw,
                **static,
            )
        loss = blocked(
            arrays["x"],
            arrays["w"],
            arrays["labels"],
            reduction="none",
            chunk_size=chunk_size,
            **kw,
            **static,
        )
        return _reduce(
            loss, reduction, _token_weight(arrays, static, reduction, loss.dtype), batch_names
        )

    out = token if reduction == "none" else P()
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out)(arrays)


def _token_weight(arrays, static, reduction, acc):
    """The mean's per-token weight without a vocabulary split: kept tokens, times ``w_y``."""
    labels = arrays["labels"]
    keep = arrays.get("where")
    if static.get("ignore_index") is not None:
        kept = labels != static["ignore_index"]
        keep = kept if keep is None else keep & kept
    cw = arrays.get("class_weights")
    if cw is None or reduction != "mean":
        return keep
    weight = take_classes(cw.astype(acc), jnp.clip(labels, 0, cw.shape[0] - 1))
    return weight if keep is None else jnp.where(keep, weight, jnp.zeros((), acc))
