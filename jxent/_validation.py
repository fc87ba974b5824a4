"""Trace-time argument checks shared by every loss.

Each check raises at trace time (shapes and dtypes are static under ``jit``) with a
message that names the argument, what it got and what it wanted, so that a mistake
never turns into a plausible wrong number.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean")


def as_array(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """Converts ``x`` to a JAX array, naming ``name`` if it cannot be one."""
    try:
        return jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}: {e}") from None


def check_floating(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float16 or float64), "
            f"got {x.dtype} with shape {x.shape}."
        )


def check_integer(name: str, x: jax.Array, hint: str = "") -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"{name} must have an integer dtype, got {x.dtype} with shape {x.shape}.{hint}"
        )


def check_shape(name: str, x: jax.Array, want: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {tuple(want)} ({what}), got shape {x.shape}.")


def check_classes(name: str, shape: Sequence[int], axes: Sequence[int], axis) -> None:
    """Raises unless the class axes ``axes`` of ``shape`` hold at least one class.

    A loss over no classes is a mistake (optax returns 0, -0 or -inf per row).
    """
    if any(shape[a] == 0 for a in axes):
        raise ValueError(
            f"{name} must have at least one class along axis={axis!r}, got shape "
            f"{tuple(shape)} (no classes)."
        )


def broadcast_shape(name_a: str, a: jax.Array, **others: jax.Array | None) -> tuple[int, ...]:
    """``a``'s shape, once every array of ``others`` (``None``: absent) is checked to
    broadcast to it (NumPy's rules, as optax's products use) without enlarging it.

    An argument that would make the loss larger than ``a`` (the logits, the predictions,
    the labels being smoothed) is almost always a shape slip: logits ``[N, 1]`` with
    labels ``[N]`` broadcast to ``[N, N]``, and their mean is a plausible wrong number
    (optax and Keras return it; PyTorch raises). A user who means every pair broadcasts
    ``a`` first.
    """
    want = tuple(a.shape)
    for name, b in others.items():
        if b is None:
            continue
        try:
            shape = tuple(np.broadcast_shapes(want, b.shape))
        except ValueError:
            raise ValueError(
                f"{name} must have a shape that broadcasts to the shape of {name_a} {want}, "
                f"got shape {b.shape}."
            ) from None
        if shape != want:
            hint = (
                f" (a reshape, {name}.reshape({want}), if both hold one value per example)"
                if math.prod(b.shape) == math.prod(want)
                else ""
            )
            raise ValueError(
                f"{name} of shape {b.shape} and {name_a} of shape {want} broadcast to {shape}, "
                f"a loss larger than {name_a}: this is almost always a shape slip (logits "
                f"[N, 1] with labels [N] give [N, N]), so jxent does not enlarge a loss by "
                f"broadcasting. Give {name} a shape that broadcasts to {want}{hint}; to "
                f"compare every pair on purpose, broadcast {name_a} first "
                f"(jnp.broadcast_to({name_a}, {shape}))."
            )
    return want


def normalize_axes(axis: int | Sequence[int] | None, ndim: int, name: str = "axis") -> tuple:
    """Returns ``axis`` as a sorted-by-position tuple of non-negative, distinct axes.

    The order given by the user is kept (it defines how tuple class axes are flattened).
    """
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        axes = (axis,)
    out = []
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(
                f"{name} must be an int or a tuple of ints, got {axis!r} ({type(axis).__name__})."
            ) from None
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for logits with {ndim} dimensions "
                f"(valid axes are {-ndim}..{ndim - 1})."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice.")
    if not out:
        raise ValueError(f"{name}={axis!r} names no class axis.")
    return tuple(out)


def static_number(name: str, value, *, lo: float, hi: float = float("inf"), lo_open=False):
    """Checks that ``value`` is a Python (static) number in ``[lo, hi]``.

    Options that change which computation runs (label smoothing, z-loss, soft caps,
    temperatures) are static: their range can be checked at trace time and a zero
    switches the corresponding term off entirely.
    """
    if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0:
        try:
            value = float(value)
        except jax.errors.ConcretizationTypeError:
            raise TypeError(
                f"{name} must be a static Python number, got a traced value; pass a float "
                "(it is a hyperparameter, not a differentiable input)."
            ) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {value!r}.")
    value = float(value)
    below = value <= lo if lo_open else value < lo
    if below or value > hi or value != value:
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        hi_s = "inf)" if hi == float("inf") else f"{hi}]"
        raise ValueError(f"{name} must be in {lo_s}, {hi_s}, got {value}.")
    return value


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    return reduction


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """The one accumulation rule of every loss: float64 if any of ``dtypes`` is float64,
    else float32 (bfloat16, float16 and float32 inputs are summed in float32)."""
    wide = any(jnp.dtype(d) == jnp.float64 for d in dtypes)
    return jnp.dtype(jnp.float64) if wide else jnp.dtype(jnp.float32)
