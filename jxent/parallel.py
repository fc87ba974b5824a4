"""Vocabulary-parallel cross-entropy for code written with ``jax.shard_map``.

Under plain ``jax.jit`` with sharded arrays the ordinary categorical losses
(``jxent.*``) already partition well: give the logits a ``NamedSharding`` with the
vocabulary on a model axis and the batch on a data axis, and XLA reduces max and
sum-exp across shards without gathering the logits. This module is for code that
is *already* inside ``jax.shard_map`` and holds only its own slice of the
vocabulary (Megatron-style tensor parallelism): each function takes the
device-local logits and the name of the mesh axis the
vocabulary is split over, and does the cross-shard reductions itself with
``lax.pmax``/``lax.psum`` on per-row numbers.

Layout on a 2-D ``("data", "model")`` mesh:

=====================  ==========================  ===============================
array                  global shape                ``in_specs``
=====================  ==========================  ===============================
logits                 ``[tokens, V]``             ``P("data", "model")``
labels                 ``[tokens]`` (global ids)   ``P("data")``
class weights          ``[V]``                     ``P("model")``
=====================  ==========================  ===============================

Shard ``s`` of ``n`` (its index along ``axis_name``) holds the classes
``[s * V_local, (s + 1) * V_local)``. When the vocabulary size ``V`` is not a
multiple of ``n``, pad the class axis at the end to ``n * ceil(V / n)`` (any
values) and pass ``num_classes=V``: the padding classes take no part in the loss
and get exactly zero gradient. Pass ``batch_axis_name="data"`` for a ``"mean"``
over the whole batch (the sum of the per-device sums over the sum of the
per-device counts).

Communication: the forward pass does one ``pmax`` and one ``psum`` of a few
``[rows]`` arrays over ``axis_name``. The backward pass does none (each shard's
gradient needs only the per-row log-sum-exp and coefficients it already holds).
It needs ``shard_map``'s default ``check_vma=True``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _validation as v
from jxent._categorical import _config
from jxent._reduction import reduce_loss
from jxent._softmax import (
    XentConfig,
    _cap,
    _cap_derivative,
    _finite_parts,
    _gather_last,
    _row_sums,
    _smoothing_sums,
    take_classes,
)

AxisName = str | tuple[str, ...]

__all__ = ["softmax_cross_entropy_with_integer_labels"]


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


def _shard_offset(layout: _Layout, dtype) -> jax.Array:
    """Global index of this shard's first class."""
    return lax.axis_index(layout.axis_name).astype(dtype) * layout.local_classes


def _padding_bias(layout: _Layout, dtype) -> jax.Array | None:
    """``[V_local]``: 0 on real classes, ``-inf`` on the padding (None if unpadded).

    An additive ``-inf`` rather than a mask: the losses already treat ``-inf``
    logits as absent classes, and an addition fuses into XLA:CPU's reductions
    where a select would materialise a [rows, classes] buffer.
    """
    if not layout.padded:
        return None
    index = _shard_offset(layout, jnp.int32) + jnp.arange(layout.local_classes, dtype=jnp.int32)
    return jnp.where(index < layout.num_classes, 0, -jnp.inf).astype(dtype)


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
    lse: jax.Array
    scale: jax.Array
    label_coef: jax.Array
    smooth_coef: jax.Array | None


def _forward(layout: _Layout, cfg: XentConfig, x, labels, row_mask, class_weights):
    acc = v.accumulation_dtype(x.dtype)
    a = cfg.label_smoothing
    zero = jnp.zeros((), acc)
    axis = layout.axis_name
    bias = _padding_bias(layout, acc)
    z = _cap(x, cfg.soft_cap, acc)
    if bias is not None:
        z = z + _rows(bias, x.ndim)

    # As in the core: the maximum of the raw logits, capped afterwards (the cap is
    # monotone), so no converted copy of x feeds it; then the max over shards.
    masked_x = x if bias is None else x + _rows(bias.astype(x.dtype), x.ndim)
    row_max = lax.pmax(_cap(jnp.max(masked_x, axis=-1), cfg.soft_cap, acc), axis)
    has_class = row_max > -jnp.inf
    row_max = jnp.where(has_class, row_max, zero)
    terms = {"sum_exp": jnp.exp(z - row_max[..., None])}

    w = None
    if a > 0:
        w = jnp.ones(x.shape[-1:], acc) if class_weights is None else class_weights.astype(acc)

        def smoothing_terms(z):
            finite, z_floor = _finite_parts(z)
            w_rows = _rows(w, x.ndim)
            # (max - z) / 2 on finite classes: >= 0, never overflows, 0 on -inf logits.
            half_gap = finite * (0.5 * row_max[..., None] - 0.5 * z_floor)
            return {"n": finite, "w": finite * w_rows, "w_gap": 2 * w_rows * half_gap}

        if bias is None and cfg.soft_cap is None:
            # Every logit finite (the usual case): the core's matrix-product sums.
            def masked():
                s = _row_sums(smoothing_terms(_cap(x, None, acc)))
                return s["n"], s["w"], s["w_gap"]

            sums = _row_sums(terms)
            sums["n"], sums["w"], sums["w_gap"] = _smoothing_sums(x, row_max, w, masked)
        else:
            sums = _row_sums({**terms, **smoothing_terms(z)})
    else:
        sums = _row_sums(terms)

    # The label's logit and weight live on one shard: pick them there, 0 elsewhere.
    local = labels - _shard_offset(layout, labels.dtype)
    in_shard = (local >= 0) & (local < layout.local_classes)
    x_label = jnp.where(
        in_shard,
        _gather_last(x, jnp.clip(local, 0, layout.local_classes - 1)),
        zero.astype(x.dtype),
    )
    sums["z_label"] = jnp.where(in_shard, _cap(x_label, cfg.soft_cap, acc), zero)
    if class_weights is not None:
        sums["w_label"] = _local_pick(class_weights.astype(acc), local, in_shard, zero)
    sums = lax.psum(sums, axis)
    valid = (labels >= 0) & (labels < layout.num_classes)
    loss, stats = _combine(cfg, row_max, has_class, sums, valid, row_mask)
    return loss, _Residuals(x, labels, class_weights, *stats)


class _RowStats(NamedTuple):
    """Per-row results of the cross-shard reduction: equal on every shard."""

    keep: jax.Array  # the row contributes (kept and has a class)
    lse: jax.Array
    scale: jax.Array  # C + 2 z_loss lse: the coefficient of the softmax in the gradient
    label_coef: jax.Array  # (1 - a) w_y
    smooth_coef: jax.Array | None  # a / K (label smoothing only)


def _combine(cfg: XentConfig, row_max, has_class, sums, valid, row_mask):
    """Per-row loss and gradient coefficients from the reduced sums (same formula as the core).

    ``sums`` holds, summed over the shards and relative to the global ``row_max``:
    ``sum_exp``; ``z_label`` (the label's soft-capped logit); ``w_label`` with class
    weights; with label smoothing ``n`` (classes), ``w`` (sum of weights) and ``w_gap``
    (sum_k w_k (row_max - z_k), a sum of non-negative terms).
    """
    acc = row_max.dtype
    zero = jnp.zeros((), acc)
    a = cfg.label_smoothing
    lse_rel = jnp.log(jnp.where(has_class, sums["sum_exp"], 1))  # lse - row_max >= 0
    lse = row_max + lse_rel
    w_label = sums.get("w_label", jnp.ones(valid.shape, acc))
    # An out-of-range label (or one on the padding) has no logit: a NaN loss.
    label_coef = (1 - a) * jnp.where(valid, w_label, jnp.nan)
    big_c = label_coef
    dist = jnp.where(label_coef != 0, label_coef * (row_max - sums["z_label"]), zero)
    smooth_coef = None
    if a > 0:
        smooth_coef = a / jnp.where(has_class, sums["n"], 1)
        big_c = big_c + smooth_coef * sums["w"]
        dist = dist + smooth_coef * sums["w_gap"]
    loss = lse_rel * big_c + dist
    scale = big_c
    if cfg.z_loss > 0:
        loss = loss + cfg.z_loss * lse * lse
        scale = scale + 2 * cfg.z_loss * lse
    keep = has_class if row_mask is None else has_class & row_mask
    # Dropped rows: loss and coefficients exactly 0 (an ignore_index label is out of
    # range, so its coefficients are NaN: selected away, per row).
    loss = jnp.where(keep, loss, zero)
    scale = jnp.where(keep, scale, zero)
    label_coef = jnp.where(keep, label_coef, zero)
    if smooth_coef is not None:
        smooth_coef = jnp.where(keep, smooth_coef, zero)
    return loss, _RowStats(keep, lse, scale, label_coef, smooth_coef)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _xent(layout, cfg, x, labels, row_mask, class_weights):
    return _forward(layout, cfg, x, labels, row_mask, class_weights)[0]


def _xent_fwd(layout, cfg, x, labels, row_mask, class_weights):
    return _forward(layout, cfg, x, labels, row_mask, class_weights)


def _xent_bwd(layout, cfg, res: _Residuals, g):
    """d loss / d x on this shard: ``g (scale p - c) dz``, with no communication."""
    x = res.x
    acc = res.lse.dtype
    zero = jnp.zeros((), acc)
    bias = _padding_bias(layout, acc)
    z = _cap(x, cfg.soft_cap, acc)
    if bias is not None:
        z = z + _rows(bias, x.ndim)
    # Per-row coefficients (0 on dropped rows) times the cotangent.
    g = g.astype(acc)

    def row_coef(c):
        return (g * c)[..., None]

    grad = row_coef(res.scale) * jnp.exp(z - res.lse[..., None])
    if res.smooth_coef is not None:
        finite = _finite_parts(z)[0]
        w = jnp.ones((), acc) if res.class_weights is None else res.class_weights.astype(acc)
        w = jnp.expand_dims(w, tuple(range(x.ndim - w.ndim)))
        grad = grad - row_coef(res.smooth_coef) * w * finite
    local = res.labels - _shard_offset(layout, res.labels.dtype)
    is_label = lax.broadcasted_iota(local.dtype, x.shape, x.ndim - 1) == local[..., None]
    grad = grad - jnp.where(is_label, row_coef(res.label_coef), zero)
    dz = _cap_derivative(x, cfg.soft_cap, acc)
    if dz is not None:
        grad = grad * dz
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
    to ``n * ceil(V / n)`` (any values) and pass ``num_classes=V``.

    Args:
      local_logits: this device's ``[..., V_local]`` slice of the logits (class
        axis last; any floating dtype, bfloat16 accumulates in float32).
      labels: integer global class indices, ``local_logits.shape[:-1]``.
      axis_name: the mesh axis (or tuple of axes) the vocabulary is split over.
      ignore_index: rows whose label equals it are dropped (loss 0, gradient 0,
        not counted in the mean).
      label_smoothing: :math:`\alpha \in [0, 1]`, a static Python number.
      z_loss: :math:`\lambda_z \ge 0`, a static Python number.
      logit_soft_cap: :math:`c > 0` to use :math:`c \tanh(x / c)`, or ``None``.
      class_weights: this device's ``[V_local]`` slice of the class weights
        (constants: no gradient flows to them).
      where: a boolean mask of the batch shape (drops whole rows).
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
        that do not match, ``num_classes`` out of range, an option out of range.

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
      >>> jax.jit(sharded)(put(padded, "data", "model"), put(labels, "data")).round(4)
      Array(0.464, dtype=float32)
      >>> jxent.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean").round(4)
      Array(0.464, dtype=float32)

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
    cfg = _config(label_smoothing, z_loss, logit_soft_cap)
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
        class_weights = lax.stop_gradient(class_weights)
    _check_split("local_logits", x, layout)
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
