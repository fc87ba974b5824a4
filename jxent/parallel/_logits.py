"""Vocabulary-parallel softmax cross-entropy on logits split over a mesh axis.

Each shard holds ``[..., V_local]`` logits; the forward pass reduces each row on its
shard (the core's sums: :func:`jxent._softmax.row_sums`), then combines the shards with
one ``pmax`` of the row maxima and one ``psum`` of per-row numbers, and finishes the
rows as the core does (:func:`jxent._softmax.finish_rows`). The backward pass needs no
communication.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _validation as v
from jxent._layout import XentConfig, xent_config
from jxent._reduction import reduce_across
from jxent._rules import sum_to_type
from jxent._softmax import (
    RowStats,
    cap_derivative,
    cap_logits,
    finish_rows,
    finite_parts,
    gather_last,
    row_sums,
)
from jxent._split import (
    AxisName,
    Layout,
    check_split,
    check_unsplit,
    local_pick,
    masked,
    mean_weight,
    real_columns,
    shard_offset,
    vocab_layout,
)
from jxent._validation import accumulation_dtype


class _Residuals(NamedTuple):
    x: jax.Array
    labels: jax.Array
    class_weights: jax.Array | None
    stats: RowStats  # per-row results of the cross-shard reduction: equal on every shard


def _forward(layout: Layout, cfg: XentConfig, x, labels, row_mask, class_weights):
    acc = accumulation_dtype(x.dtype)
    a = cfg.label_smoothing
    zero = jnp.zeros((), acc)
    axis = layout.axis_name
    # Padding classes are -inf logits from here on: selected before any reduction reads
    # them, so that no value they hold reaches the loss (see real_columns).
    masked_x = masked(x, real_columns(layout, x.ndim), -jnp.inf)
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
        w_rows = jnp.expand_dims(w, tuple(range(x.ndim - 1)))
        # (max - z) / 2 on finite classes: >= 0, never overflows, 0 on -inf logits.
        half_gap = finite * (0.5 * row_max[..., None] - 0.5 * z_floor)
        terms.update(n=finite, w=finite * w_rows, w_half_gap=w_rows * half_gap)
    # One variadic reduction: the logits are read once (see the core's row_sums).
    sums = row_sums(terms)

    # The label's logit and weight live on one shard: pick them there, 0 elsewhere.
    local = labels - shard_offset(layout, labels.dtype)
    in_shard = (local >= 0) & (local < layout.local_classes)
    x_label = jnp.where(
        in_shard,
        gather_last(x, jnp.clip(local, 0, layout.local_classes - 1)),
        zero.astype(x.dtype),
    )
    sums["z_label"] = jnp.where(in_shard, cap_logits(x_label, cfg.soft_cap, acc), zero)
    if class_weights is not None:
        sums["w_label"] = local_pick(class_weights.astype(acc), local, in_shard, zero)
    sums = lax.psum(sums, axis)
    valid = (labels >= 0) & (labels < layout.num_classes)
    loss, stats = _combine(cfg, row_max, has_class, sums, valid, row_mask)
    return loss, _Residuals(x, labels, class_weights, stats)


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
    return loss, RowStats(row_max, lse_rel, scale, label_coef, smooth_coef, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _split_xent(layout, cfg, x, labels, row_mask, class_weights):
    return _forward(layout, cfg, x, labels, row_mask, class_weights)[0]


def _split_xent_fwd(layout, cfg, x, labels, row_mask, class_weights):
    return _forward(layout, cfg, x, labels, row_mask, class_weights)


def _split_xent_bwd(layout, cfg, res: _Residuals, g):
    """d loss / d x on this shard: ``g (scale p - c) dz``, with no communication."""
    x, stats = res.x, res.stats
    acc = stats.lse_rel.dtype
    zero = jnp.zeros((), acc)
    real = real_columns(layout, x.ndim)
    z = cap_logits(masked(x, real, -jnp.inf), cfg.soft_cap, acc)
    # Per-row coefficients (0 on dropped rows) times the cotangent.
    g = g.astype(acc)

    def row_coef(c):
        return (g * c)[..., None]

    p = jnp.exp((z - stats.row_max[..., None]) - stats.lse_rel[..., None])
    grad = row_coef(stats.scale) * p
    if stats.smooth_coef is not None:
        finite = finite_parts(z)[0]
        w = jnp.ones((), acc) if res.class_weights is None else res.class_weights.astype(acc)
        w = jnp.expand_dims(w, tuple(range(x.ndim - w.ndim)))
        grad = grad - row_coef(stats.smooth_coef) * w * finite
    local = res.labels - shard_offset(layout, res.labels.dtype)
    is_label = lax.broadcasted_iota(local.dtype, x.shape, x.ndim - 1) == local[..., None]
    grad = grad - jnp.where(is_label, row_coef(stats.label_coef), zero)
    dz = cap_derivative(x, cfg.soft_cap, acc)
    if dz is not None:
        grad = grad * dz
    # Exactly 0 on the padding whatever it holds (the soft cap's derivative of a NaN or
    # infinite padding logit is NaN; a select, not a product, removes it).
    grad = masked(grad, real, 0)
    cw_bar = None if res.class_weights is None else jnp.zeros_like(res.class_weights)
    return sum_to_type(grad.astype(x.dtype), x), None, None, cw_bar


_split_xent.defvjp(_split_xent_fwd, _split_xent_bwd)


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
    layout = vocab_layout(axis_name, x.shape[-1], num_classes)
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
        class_weights = masked(class_weights, real_columns(layout, 1), 0)
    check_split("local_logits", x, layout)
    check_unsplit("labels", labels, layout, 'P("data") for labels of P("data", "model") logits')
    check_unsplit("where", where, layout, 'P("data") as the labels')
    loss = _split_xent(layout, cfg, x, labels, row_mask, class_weights)
    weight = mean_weight(layout, labels, row_mask, class_weights, reduction, loss.dtype)
    return reduce_across(loss, reduction, weight, batch_axis_name)
