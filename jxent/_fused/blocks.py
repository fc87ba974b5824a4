"""Loops over blocks, and the grouped views the blocks are taken from.

**Loops.** :func:`for_blocks` runs a body over ``[0, total)`` in blocks: full blocks in
a ``fori_loop``, a shorter last block as a second, static copy of the body. Nothing is
padded, so ``x`` and ``w`` are never copied to a rounded-up size.

**Groups.** Each blocked axis (tokens, vocabulary) is viewed as ``[G, L]``, ``G``
groups of ``L = total / G`` consecutive entries, and a block takes the same ``b``
consecutive entries of every group (``G * b`` in all); the loops run over the second
axis. Under ``jax.jit`` with arrays sharded over ``Auto`` mesh axes (GSPMD), a ``w``
split over ``S`` devices along ``V`` with ``S`` dividing ``G`` then has its groups
split over the devices, and every block is sliced from the unsplit axis on each
device: each device computes its own columns of every block, and per-token numbers
are combined across devices. A contiguous block would be a dynamic slice of the split
axis, which GSPMD can only take from a gathered copy of the whole of ``w`` (and of
``x`` for the tokens). ``G = 1`` is the plain contiguous layout.

Slices, writes and transposes of bfloat16 blocks go through ``jxent._backend``
(XLA:CPU's workarounds, selected per lowering platform).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _backend
from jxent._rules import vary_like


def for_blocks(total: int, size: int, body: Callable, carry):
    """Runs ``carry = body(start, length, carry)`` over ``[0, total)`` in blocks of ``size``.

    Full blocks run in a ``fori_loop`` (``start`` traced, one compiled body), a shorter
    last block with a static ``start`` and ``length``. The shorter block runs first:
    the loop then writes the accumulators last, and a grouped accumulator's final
    reshape is of the loop's result (a write into a reshaped buffer after the loop
    would cost XLA:CPU a copy of the accumulator).

    A symbolic ``total`` (``jax.export`` shape polymorphism) must be a multiple of
    ``size`` (the caller pads to one): its blocks all run in the loop, whose trip count
    is then computed from the shapes at run time.
    """
    num_full, rest = divmod(total, size)
    symbolic = not isinstance(total, int)
    if symbolic and not (isinstance(rest, int) and rest == 0):
        raise ValueError(
            f"a symbolic number of items ({total}) must be a known multiple of the block "
            f"({size}): pad it to one"
        )
    if rest:
        carry = body(num_full * size, rest, carry)
    if not symbolic and num_full == 1:
        carry = body(0, size, carry)
    elif symbolic or num_full > 1:

        def step(i, c):
            # int32 starts, whatever the loop counter's dtype (x64 or not).
            start = lax.convert_element_type(i, jnp.int32) * size
            if symbolic:
                # A symbolic loop may turn out to run once: XLA then removes it and folds
                # the start to 0, and with it the predicates of the _backend workarounds
                # (XLA:CPU then fails on transposed_block's bfloat16 product: "Unsupported
                # element type for DotThunk"). The barrier keeps the start traced.
                start = lax.optimization_barrier(start)
            return body(start, size, c)

        carry = vary_like(carry, jax.eval_shape(functools.partial(step, 0), carry))
        carry = lax.fori_loop(0, num_full, step, carry)
    return carry


def _grouped(a: jax.Array, axis: int, groups: int) -> jax.Array:
    """``a`` with ``axis`` split into ``[groups, length / groups]`` (a free reshape)."""
    shape = a.shape
    return a.reshape(shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1 :])


def _ungrouped(a: jax.Array, axis: int) -> jax.Array:
    """The inverse of ``_grouped``: axes ``axis`` and ``axis + 1`` merged."""
    shape = a.shape
    return a.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2 :])


def group(a: jax.Array | None, axis: int, groups: int) -> jax.Array | None:
    """The view of ``a`` that :func:`block` and :func:`put_block` take: ``a`` itself for
    one group, else ``axis`` split into ``[groups, length / groups]``.

    Made once, outside the loops, for the inputs and for the accumulators the loops
    update in place (a reshape between a loop's update and its buffer can cost a copy).
    """
    return a if a is None or groups == 1 else _grouped(a, axis, groups)


def ungroup(a: jax.Array | None, axis: int, groups: int) -> jax.Array | None:
    return a if a is None or groups == 1 else _ungrouped(a, axis)


def block(a: jax.Array | None, start, length: int, axis: int, groups: int) -> jax.Array | None:
    """The block ``(start, length)`` of a :func:`group` view, ``groups * length`` entries
    along ``axis``: entries ``[start, start + length)`` of every group, group by group."""
    if a is None or groups == 1:
        return _slice(a, start, length, axis)
    return _ungrouped(_slice(a, start, length, axis + 1), axis)


def put_block(a: jax.Array, update: jax.Array, start, axis: int, groups: int) -> jax.Array:
    """A :func:`group` view with the block ``(start, len)`` replaced by ``update`` (in place)."""
    if groups == 1:
        return _put(a, update, start, axis)
    return _put(a, _grouped(update, axis, groups), start, axis + 1)


def add_block(a: jax.Array, update: jax.Array, start, axis: int, groups: int) -> jax.Array:
    """A :func:`group` view with ``update`` added to its block ``(start, len)`` (in place).

    The sum is formed in the grouped layout: a reshape between the block's slice and
    the update would keep XLA from fusing the slice into the in-place update.
    """
    if groups > 1:
        update, axis = _grouped(update, axis, groups), axis + 1
    return _put(a, _slice(a, start, update.shape[axis], axis) + update, start, axis)


def transposed_block(a: jax.Array, start, length: int, groups: int) -> jax.Array:
    """``block(a, start, length, 0, groups).T`` for the product ``x.T @ dz``, laid out as
    the backend's matrix product wants it (``_backend.transposed_block``)."""
    shape = (a.shape[-1], groups * length)
    return _backend.transposed_block(a, lambda: block(a, start, length, 0, groups), start, shape)


def _slice(a: jax.Array | None, start, length: int, axis: int = 0) -> jax.Array | None:
    """``length`` entries of ``a`` along ``axis`` from ``start`` (static or traced)."""
    if a is None:
        return None
    if isinstance(start, int):
        if start == 0 and length == a.shape[axis]:
            return a
        return lax.slice_in_dim(a, start, start + length, axis=axis)
    return _backend.slice_block(a, start, length, axis)


def _put(a: jax.Array, update: jax.Array, start, axis: int = 0) -> jax.Array:
    """``a`` with ``update`` written from ``start`` along ``axis``, in place."""
    if isinstance(start, int) and start == 0 and update.shape == a.shape:
        return update
    return _backend.put_block(a, update, start, axis)
