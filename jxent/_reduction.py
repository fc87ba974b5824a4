"""The ``reduction`` argument shared by every loss: "none", "sum" or "mean"."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    denom = jnp.sum(weight.astype(loss.dtype))
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1), jnp.zeros_like(total))
