"""Where the classes are, which rows and classes count, and the static options.

The bottom layer beside ``_validation`` (nothing here imports another jxent module
but that one): every loss family brings its arrays to ``[*batch, classes]`` rows with
:func:`rows_and_masks` / :func:`flatten_classes`, splits a ``where`` into a row mask
and a class mask, and describes the options of the softmax cross-entropy core with
:class:`XentConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jxent import _validation as v

#: A class axis, or a tuple of class axes (flattened in the order given).
Axis = int | Sequence[int]


class XentConfig(NamedTuple):
    """Static options of the softmax cross-entropy (hashable: they select the terms traced)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    soft_cap: float | None = None
    # Where the classes are in the caller's arrays; None: the last axis. The core brings
    # the arrays to [*batch, classes] inside its rule, so that reverse mode saves the
    # caller's logits, not a transposed copy.
    class_axes: tuple[int, ...] | None = None


def xent_config(label_smoothing, z_loss, logit_soft_cap=None, class_axes=None) -> XentConfig:
    """The core's static options, each checked (a clear error names the argument)."""
    return XentConfig(
        class_axes=class_axes,
        label_smoothing=v.static_number("label_smoothing", label_smoothing, lo=0.0, hi=1.0),
        z_loss=v.static_number("z_loss", z_loss, lo=0.0),
        soft_cap=None
        if logit_soft_cap is None
        else v.static_number("logit_soft_cap", logit_soft_cap, lo=0.0, lo_open=True),
    )


def flatten_classes(a: jax.Array | None, axes: tuple[int, ...] | None) -> jax.Array | None:
    """``a`` with ``axes`` moved last (in that order) and flattened: ``[*batch, classes]``.

    ``axes=None`` leaves ``a`` as it is (its classes are already the last axis). The
    sizes are spelled out, so an empty batch (a zero in the batch shape) works too.
    """
    if a is None or axes is None:
        return a
    ndim = a.ndim
    batch_axes = tuple(i for i in range(ndim) if i not in axes)
    if axes != tuple(range(ndim - len(axes), ndim)):
        a = jnp.transpose(a, batch_axes + axes)
    nb = len(batch_axes)
    return a.reshape(a.shape[:nb] + (math.prod(a.shape[nb:]),))


def class_masks(
    logits: jax.Array, axes: tuple[int, ...], where: jax.Array | None
) -> tuple[tuple[int, ...], jax.Array | None, jax.Array | None]:
    """The batch shape, and the row and class masks that ``where`` describes.

    A ``where`` of the batch shape masks rows; one of the logits' rank masks classes
    (broadcast to the logits' shape, in their layout) and drops rows it fully masks.
    """
    ndim = logits.ndim
    batch_shape = tuple(n for i, n in enumerate(logits.shape) if i not in axes)
    if where is None:
        return batch_shape, None, None
    where = v.as_array("where", where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
    wrong_shape = ValueError(
        f"where must have the batch shape {batch_shape} (masking rows) or a shape "
        f"broadcastable to logits.shape {logits.shape} (masking classes), got "
        f"shape {where.shape}."
    )
    if where.ndim == ndim:
        try:
            class_mask = jnp.broadcast_to(where, logits.shape)
        except ValueError:
            raise wrong_shape from None
        return batch_shape, jnp.any(class_mask, axis=axes), class_mask
    if where.shape == batch_shape:
        return batch_shape, where, None
    raise wrong_shape


def rows_and_masks(
    logits: jax.Array, axes: tuple[int, ...], where: jax.Array | None
) -> tuple[jax.Array, tuple[int, ...], jax.Array | None, jax.Array | None]:
    """Moves the class axes last and flattens them: ``[*batch, classes]``.

    Returns the reshaped logits, the batch shape, a row mask (from a batch-shaped
    ``where``) and a class mask (from a logits-shaped ``where``), reshaped likewise.
    """
    batch_shape, row_mask, class_mask = class_masks(logits, axes, where)
    return flatten_classes(logits, axes), batch_shape, row_mask, flatten_classes(class_mask, axes)


def and_masks(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """``a & b`` where None means "no mask"."""
    if a is None:
        return b
    return a if b is None else a & b
