"""The element-wise core of the binary losses: exact sigmoids and softplus, and the
argument handling every element-wise loss shares.

Internal API (``jxent._binary`` and ``jxent._focal`` build on these): :func:`sigmoid`,
:func:`softplus_pair`, :func:`neg_log_sigmoids`, :class:`Consts`, :func:`consts`,
:func:`finite_logits`, :func:`check_labels`, :func:`same_shape`, :func:`check_where`,
:func:`broadcast_inputs`, :func:`sanitise`, :func:`sanitise_small`,
:func:`finish_elementwise`.

Second and higher derivatives of the binary losses differentiate their tangent rules, so
every function here has its own derivative rule: :func:`sigmoid`'s is
``sigmoid(x) sigmoid(-x)`` (JAX's ``logistic`` uses ``s (1 - s)``, exactly 0 once ``s``
rounds to 1: ``|x| > 17`` in float32), :func:`softplus_pair`'s are sigmoids.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jxent import _backend
from jxent import _validation as v
from jxent._reduction import reduce_loss

# --------------------------------------------------------------------------------------------
# Validation shared by the element-wise losses
# --------------------------------------------------------------------------------------------


def check_labels(labels, x: jax.Array, x_name: str) -> jax.Array:
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


def same_shape(labels: jax.Array, x: jax.Array, x_name: str) -> None:
    if labels.shape != x.shape:
        raise ValueError(
            f"labels must have exactly the shape of {x_name} {x.shape} (one label per "
            f"prediction; no implicit broadcasting), got shape {labels.shape}."
        )


def check_where(where, shape: tuple[int, ...], x_name: str) -> jax.Array | None:
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


def sanitise(x: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """Replaces excluded elements by a harmless value, so that even NaN there cannot
    leak into the gradient (the select's transpose routes a zero cotangent to them)."""
    if mask is None:
        return x
    return jnp.where(mask, x, jnp.asarray(fill, x.dtype))


def sanitise_small(a: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """:func:`sanitise` for an operand that may be smaller than the mask (it broadcasts):
    only an operand of the mask's own shape can be sanitised without a broadcast copy."""
    if mask is None or a.shape != mask.shape:
        return a
    return sanitise(a, mask, fill)


def finish_elementwise(loss: jax.Array, mask: jax.Array | None, reduction: str) -> jax.Array:
    if mask is not None:
        loss = jnp.where(mask, loss, jnp.zeros((), loss.dtype))
    return reduce_loss(loss, reduction, mask)


class Consts(NamedTuple):
    zero: jax.Array
    one: jax.Array
    big: jax.Array  # the largest finite float


def consts(acc, forward: bool) -> Consts:
    """The scalar constants of an element-wise loss, in the accumulation dtype.

    In a forward pass they go through ``_backend.cpu_barrier``: CSE would otherwise
    share a broadcast constant (the 1 of ``1 - t``) with the backward pass, and
    XLA:CPU materialises such a broadcast as a full float32 buffer; with the barrier a
    ``"sum"``/``"mean"`` loss needs no temporary buffer at all.
    """
    values = (jnp.zeros((), acc), jnp.ones((), acc), jnp.asarray(jnp.finfo(acc).max, acc))
    return Consts(*(_backend.cpu_barrier(values) if forward else values))


def finite_logits(x: jax.Array, c: Consts) -> jax.Array:
    """``x`` in the accumulation dtype, with ``±inf`` replaced by the largest finite float."""
    return jnp.minimum(jnp.maximum(x.astype(c.big.dtype), -c.big), c.big)


@jax.custom_jvp
def sigmoid(x: jax.Array) -> jax.Array:
    """``sigmoid(x)`` whose derivatives of every order keep full relative precision."""
    return jax.nn.sigmoid(x)


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    # sigmoid(-x) rather than 1 - sigmoid(x): it is the small factor in the tail, where
    # 1 - sigmoid(x) is 0. Recursive, so that the next order is exact as well.
    return sigmoid(x), sigmoid(x) * sigmoid(-x) * x_dot


@jax.custom_jvp
def softplus_pair(x: jax.Array, zero: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(softplus(-x), softplus(x)) = (-log sigmoid(x), -log sigmoid(-x))``, both exact,
    sharing one ``log1p(exp(-|x|))``; ``zero`` is the constant 0 (see ``consts``)."""
    tail = jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.maximum(-x, zero) + tail, jnp.maximum(x, zero) + tail


@softplus_pair.defjvp
def _softplus_pair_jvp(primals, tangents):
    x, zero = primals
    x_dot, _ = tangents  # zero is a constant
    # softplus' = sigmoid, with no max/abs kink at 0 and exact derivatives of every order.
    return softplus_pair(x, zero), (-sigmoid(-x) * x_dot, sigmoid(x) * x_dot)


def neg_log_sigmoids(x: jax.Array, c: Consts) -> tuple[jax.Array, jax.Array]:
    """``(-log sigmoid(x), -log sigmoid(-x)) = (softplus(-x), softplus(x))``, both exact."""
    return softplus_pair(x, c.zero)


def broadcast_inputs(x: jax.Array, t: jax.Array, shape, mask) -> tuple[jax.Array, jax.Array]:
    """Logits of the loss' shape, sanitised; labels as small as they came unless a mask
    must sanitise them (a label broadcast over excluded elements only may be NaN)."""
    x = sanitise(jnp.broadcast_to(x, shape), mask, 0.0)
    if mask is not None:
        t = sanitise(jnp.broadcast_to(t, shape), mask, 0)
    return x, t
