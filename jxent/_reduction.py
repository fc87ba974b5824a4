"""The ``reduction`` argument shared by every loss: "none", "sum" or "mean".

Also the mean's denominator with class weights (PyTorch's rule: the sum of the kept
rows' label weights ``w_y``), and the mean over a data-parallel mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def reduce_loss(loss: jax.Array, reduction: str, weight: jax.Array | None = None) -> jax.Array:
    """Reduces per-example ``loss`` as ``reduction`` asks.

    Args:
      loss: per-example losses; excluded examples already hold 0.
      reduction: "none" (return ``loss``), "sum" or "mean".
      weight: per-example weight in the mean's denominator (0 for excluded
        examples, the class weight of the label for weighted losses); ``None``
        counts every example once.

    Returns:
      ``loss`` itself, or a scalar. A mean over no included example is 0, not NaN.
    """
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    if weight is None:
        return total / max(loss.size, 1)
    return safe_divide(total, jnp.sum(weight.astype(loss.dtype)))


def safe_divide(total: jax.Array, denom: jax.Array) -> jax.Array:
    """``total / denom``, and 0 (not NaN) when nothing was counted (``denom <= 0``)."""
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1), jnp.zeros_like(total))


def mean_weight(
    row_mask: jax.Array | None,
    class_weights: jax.Array | None,
    labels: jax.Array,
    reduction: str,
    dtype,
    take: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array | None:
    """Each row's weight in the mean's denominator: ``w_y`` on kept rows, 0 elsewhere.

    Without class weights (or for "none"/"sum") it is the row mask itself (``None``:
    every row counts once). ``take(table, labels)`` reads ``w_y`` for labels clipped to
    the table's range (an ignored row's label may be anything), e.g. a gather, or a
    pick on the shard that owns the label summed over the vocabulary axis.
    """
    if class_weights is None or reduction != "mean":
        return row_mask
    weight = take(class_weights.astype(dtype), labels).astype(dtype)
    return weight if row_mask is None else jnp.where(row_mask, weight, jnp.zeros((), dtype))


def reduce_across(
    loss: jax.Array,
    reduction: str,
    weight: jax.Array | None,
    batch_axis_name,
    normalizer: jax.Array | None = None,
) -> jax.Array:
    """``reduce_loss`` over every device of ``batch_axis_name`` (inside ``shard_map``).

    The mean is the sum of the per-device sums over the sum of the per-device
    denominators: a mean of per-device means would be wrong when devices keep
    different counts. ``batch_axis_name=None``: this device's rows only.
    ``normalizer`` (a scalar, with ``"mean"``): the mean is the (global) sum divided by
    it instead.
    """
    if normalizer is not None and reduction == "mean":
        total = jnp.sum(loss)
        if batch_axis_name is not None:
            total = lax.psum(total, batch_axis_name)
        return total / normalizer.astype(total.dtype)
    if batch_axis_name is None or reduction == "none":
        return reduce_loss(loss, reduction, weight)
    total = jnp.sum(loss)
    denom = jnp.sum(weight.astype(loss.dtype)) if weight is not None else loss.size
    total, denom = lax.psum((total, jnp.asarray(denom, loss.dtype)), batch_axis_name)
    if reduction == "sum":
        return total
    return safe_divide(total, denom)
