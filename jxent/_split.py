"""How a vocabulary is split over a mesh axis, and the checks that it is split as said.

Internal API (``jxent.parallel`` and the fused losses' driver): :class:`Layout`,
:func:`vocab_layout`, :func:`check_split`, :func:`check_unsplit`, :func:`shard_offset`,
:func:`real_columns`, :func:`masked`, :func:`local_labels`, :func:`local_pick`,
:func:`mean_weight`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _reduction
from jxent._rules import varying
from jxent._softmax import take_classes

AxisName = str | tuple[str, ...]


class Layout(NamedTuple):
    """Static description of the vocabulary split (hashable: a nondiff argument)."""

    axis_name: AxisName
    num_shards: int
    local_classes: int  # V_local, the class-axis size on each shard
    num_classes: int  # the true vocabulary size V <= num_shards * local_classes

    @property
    def padded(self) -> bool:
        return self.num_classes < self.num_shards * self.local_classes

    @property
    def names(self) -> tuple[str, ...]:
        return self.axis_name if isinstance(self.axis_name, tuple) else (self.axis_name,)


def vocab_layout(axis_name, local_classes: int, num_classes) -> Layout:
    """The split of ``num_classes`` (None: all columns) over ``axis_name``, checked."""
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
    return Layout(axis_name, num_shards, local_classes, num_classes)


def check_split(name: str, a: jax.Array, layout: Layout) -> None:
    """``a`` must vary over the vocabulary axis: split over it by ``shard_map``.

    The gradients rely on ``shard_map``'s types (``check_vma=True``, its default): with
    ``check_vma=False`` nothing is typed as varying, and ``psum``'s transpose is
    another ``psum``, which would scale the gradients.
    """
    missing = [n for n in layout.names if n not in varying(a)]
    if missing:
        raise ValueError(
            f"{name} must be split over axis_name={layout.axis_name!r} by jax.shard_map "
            f"(its in_specs naming that axis for the vocabulary), with check_vma=True (the "
            f"default); got a value that does not vary over {missing}."
        )


def check_unsplit(name: str, a: jax.Array | None, layout: Layout, example: str) -> None:
    """``a`` must be the same on every shard of the vocabulary axis: not vary over it.

    Each shard computes its classes' part of every row's sums and the shards add them
    up, so every shard must see the same rows. A value split over the vocabulary axis
    (say, tokens split over it as in sequence parallelism) would combine one shard's
    rows with another's into plausible but wrong losses, so it is refused at trace
    time. The check reads ``shard_map``'s types, exact under ``check_vma=True`` (the
    default, which ``check_split`` already requires).
    """
    if a is None:
        return
    split = [n for n in layout.names if n in varying(a)]
    if split:
        raise ValueError(
            f"{name} must be the same on every shard of axis_name={layout.axis_name!r} (the "
            f"axis the vocabulary is split over: every shard reduces the same rows), i.e. "
            f"not vary over it (in_specs without that axis, e.g. {example}); got a value "
            f"of type {jax.typeof(a)} that varies over {split}. Split the tokens over "
            f"another mesh axis (batch_axis_name), or all-gather them over {split} first."
        )


def shard_offset(layout: Layout, dtype) -> jax.Array:
    """Global index of this shard's first class."""
    return lax.axis_index(layout.axis_name).astype(dtype) * layout.local_classes


def real_columns(layout: Layout, ndim: int = 1) -> jax.Array | None:
    """``[1, ..., V_local]`` bool: True on this shard's real classes (None if unpadded).

    A select with it on the logits, before anything reads them: the padding's values
    (``+inf``, ``NaN``, anything) never reach a sum, a maximum or a gradient, where an
    additive ``-inf`` would turn ``+inf`` into ``NaN`` and keep ``NaN``.
    """
    if not layout.padded:
        return None
    index = shard_offset(layout, jnp.int32) + jnp.arange(layout.local_classes, dtype=jnp.int32)
    return jnp.expand_dims(index < layout.num_classes, tuple(range(ndim - 1)))


def masked(a: jax.Array, real: jax.Array | None, fill) -> jax.Array:
    """``a`` with ``fill`` on the padding columns (``a`` itself when unpadded)."""
    return a if real is None else jnp.where(real, a, jnp.asarray(fill, a.dtype))


def local_labels(layout: Layout, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(int32 label index on this shard or -1, bool label on this shard)``."""
    local = labels - shard_offset(layout, labels.dtype)
    here = (local >= 0) & (local < layout.local_classes) & (labels < layout.num_classes)
    return jnp.where(here, local, -1).astype(jnp.int32), here


def local_pick(table: jax.Array, local: jax.Array, in_shard: jax.Array, zero) -> jax.Array:
    """``table[local]`` where the label is on this shard, 0 elsewhere ([rows])."""
    return jnp.where(in_shard, take_classes(table, jnp.clip(local, 0, table.shape[0] - 1)), zero)


def mean_weight(layout: Layout, labels, row_mask, class_weights, reduction, acc):
    """Per-row weight of the mean's denominator: ``w_y`` (from the shard that owns it,
    summed over the vocabulary axis) on kept rows, or just the row mask."""

    def take(table, y):
        local = jnp.clip(y, 0, layout.num_classes - 1) - shard_offset(layout, y.dtype)
        in_shard = (local >= 0) & (local < layout.local_classes)
        return lax.psum(local_pick(table, local, in_shard, jnp.zeros((), acc)), layout.axis_name)

    return _reduction.mean_weight(row_mask, class_weights, labels, reduction, acc, take)
