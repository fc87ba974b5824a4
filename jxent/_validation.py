"""Trace-time argument checks shared by every loss.

Each check raises at trace time (shapes and dtypes are static under ``jit``) with a
message that names the argument, what it got and what it wanted, so that a mistake
never turns into a plausible wrong number.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Sequence
from typing import NamedTuple

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


class LinearInputs(NamedTuple):
    x: jax.Array
    w: jax.Array
    labels: jax.Array
    bias: jax.Array | None
    class_weights: jax.Array | None
    row_mask: jax.Array | None


def linear_inputs(
    x,
    w,
    labels,
    bias,
    class_weights,
    where,
    *,
    w_name: str,
    w_shape: str,
    per_column: str,
    w_layout: str = "dv",
) -> LinearInputs:
    """Checks the arguments of a fused linear cross-entropy (one shard's or the whole).

    ``w`` must be ``[D, columns]`` (``w_shape`` says how, in words); ``bias`` and
    ``class_weights`` have one entry per column (``per_column`` says which); ``where``
    flags tokens. Raises at trace time naming the argument and the shape it wanted.
    """
    x = as_array("x", x)
    w = as_array(w_name, w)
    check_floating("x", x)
    check_floating(w_name, w)
    if x.ndim < 1:
        raise ValueError(f"x must have shape [..., D] (hidden states), got a scalar {x.shape}.")
    if w_layout not in ("dv", "vd"):
        raise ValueError(
            f'w_layout must be "dv" (w is [D, V]) or "vd" (w is [V, D], e.g. a tied '
            f"embedding table), got {w_layout!r}."
        )
    d_axis = 0 if w_layout == "dv" else 1
    if w.ndim != 2 or w.shape[d_axis] != x.shape[-1] or w.shape[1 - d_axis] == 0:
        want = w_shape.format(D=x.shape[-1])
        if w_layout == "vd":
            want = f"(V, D) = (num_classes >= 1, {x.shape[-1]}) (w_layout='vd')"
        raise ValueError(
            f"{w_name} must have shape {want} to multiply x of shape {x.shape}, got shape "
            f"{w.shape}."
        )
    batch_shape = x.shape[:-1]
    if labels is not None:  # None: a loss without labels (the entropy)
        labels = as_array("labels", labels)
        check_integer("labels", labels, " Labels are class indices.")
        check_shape("labels", labels, batch_shape, "x.shape[:-1]: one label per token")
    columns = (w.shape[1 - d_axis],)
    if bias is not None:
        bias = as_array("bias", bias)
        check_floating("bias", bias)
        check_shape("bias", bias, columns, f"one bias per column: {per_column}")
    if class_weights is not None:
        class_weights = as_array("class_weights", class_weights)
        check_floating("class_weights", class_weights)
        check_shape("class_weights", class_weights, columns, f"one per column: {per_column}")
    if where is not None:
        where = as_array("where", where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
        check_shape("where", where, batch_shape, "x.shape[:-1]: one flag per token")
    return LinearInputs(x, w, labels, bias, class_weights, where)


def check_dtypes(x: jax.Array, w: jax.Array, bias: jax.Array | None) -> None:
    """``x``, ``w`` and ``bias`` must promote to one dtype under strict promotion."""
    dtypes = [x.dtype, w.dtype] + ([] if bias is None else [bias.dtype])
    try:
        functools.reduce(jnp.promote_types, dtypes)
    except jax.dtypes.TypePromotionError:
        raise TypeError(
            f"x, w and bias have dtypes {[str(d) for d in dtypes]}, which "
            "jax_numpy_dtype_promotion='strict' does not promote: cast them to one dtype."
        ) from None


def checked_normalizer(normalizer, reduction: str, acc):
    """The mean's denominator given by the caller, as a scalar of ``acc`` (or None)."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f'normalizer divides the "mean" reduction; got it with reduction={reduction!r}.'
        )
    normalizer = as_array("normalizer", normalizer)
    if normalizer.ndim != 0:
        raise ValueError(
            f"normalizer must be a scalar (the global token count), got shape {normalizer.shape}."
        )
    return jax.lax.stop_gradient(normalizer.astype(acc))


def checked_num_classes(num_classes, columns: int) -> int:
    """``num_classes`` checked against ``w``'s ``columns`` (``None``: all of them)."""
    if num_classes is None:
        return columns
    if isinstance(num_classes, bool):
        raise TypeError(f"num_classes must be a positive int or None, got {num_classes!r}.")
    try:
        num_classes = operator.index(num_classes)
    except TypeError:
        raise TypeError(
            f"num_classes must be a positive int or None, got {num_classes!r}."
        ) from None
    if not 1 <= num_classes <= columns:
        raise ValueError(
            f"num_classes must be in [1, {columns}] (the classes among w's {columns} "
            f"columns, padding after them), got {num_classes}."
        )
    return num_classes


def is_hidden_teacher(teacher) -> bool:
    """Whether ``teacher`` is ``(x_t, w_t[, bias_t])``, the teacher's hidden states and
    weight (a floating first entry), rather than its top-k ``(indices, log_probs)``."""
    if not isinstance(teacher, (tuple, list)) or len(teacher) not in (2, 3):
        return False
    first = teacher[0]
    return len(teacher) == 3 or (
        hasattr(first, "dtype") and jnp.issubdtype(first.dtype, jnp.floating)
    )


def hidden_teacher(teacher, batch_shape, w: jax.Array, w_layout: str, acc):
    """The checked teacher ``(x_t [..., D_t], w_t, bias_t or None)``, ``w_t`` in ``w``'s
    layout over its columns, whose products accumulate in ``acc`` as the student's."""
    x_t, w_t = as_array("teacher[0] (x_t)", teacher[0]), as_array("teacher[1] (w_t)", teacher[1])
    b_t = None if len(teacher) < 3 or teacher[2] is None else as_array("teacher[2]", teacher[2])
    for name, a in (("teacher[0] (x_t)", x_t), ("teacher[1] (w_t)", w_t), ("teacher[2]", b_t)):
        if a is not None:
            check_floating(name, a)
    if x_t.ndim != len(batch_shape) + 1 or x_t.shape[:-1] != tuple(batch_shape):
        raise ValueError(
            f"teacher[0] (x_t), the teacher's hidden states, must have shape x.shape[:-1] + "
            f"(D_t,) = {tuple(batch_shape)} + (D_t,), got {x_t.shape}."
        )
    vocab_axis = 1 if w_layout == "dv" else 0
    want = [x_t.shape[-1], w.shape[vocab_axis]]
    want = tuple(want if w_layout == "dv" else want[::-1])
    if w_t.shape != want:
        layout = "(D_t, V)" if w_layout == "dv" else "(V, D_t)"
        raise ValueError(
            f"teacher[1] (w_t) must have shape {layout} = {want} (x_t's last axis and w's "
            f"{w.shape[vocab_axis]} columns, in w_layout={w_layout!r}), got {w_t.shape}."
        )
    if b_t is not None:
        check_shape("teacher[2] (bias_t)", b_t, (w.shape[vocab_axis],), "one entry per column")
    dtypes = [a.dtype for a in (x_t, w_t, b_t) if a is not None]
    try:
        teacher_acc = accumulation_dtype(functools.reduce(jnp.promote_types, dtypes))
    except jax.dtypes.TypePromotionError:
        raise TypeError(
            f"the teacher's x_t, w_t (and bias_t) have dtypes {[str(d) for d in dtypes]}, "
            "which jax_numpy_dtype_promotion='strict' does not promote: cast them to one dtype."
        ) from None
    if teacher_acc != acc:
        raise TypeError(
            f"the teacher's products would accumulate in {teacher_acc} and the student's in "
            f"{acc}: give x_t and w_t dtypes that accumulate like x and w (e.g. both "
            "float32/bfloat16 with x64 off)."
        )
    return x_t, w_t, b_t


def jensen_shannon_beta(beta, teacher) -> float:
    """The static ``beta`` of a fused Jensen-Shannon divergence: in ``[0, 1]`` with a
    ``teacher`` given as hidden states (its full distribution), ``[0, 1)`` with a top-k."""
    beta = static_number("beta", beta, lo=0, hi=1)
    if beta == 1 and not is_hidden_teacher(teacher):
        raise ValueError(
            "beta must be in [0, 1) with a top-k teacher, got 1.0: the reverse KL is "
            "infinite wherever the student has mass off the teacher's top-k classes. "
            "A teacher given as hidden states (x_t, w_t) takes beta = 1."
        )
    return beta


def top_k_teacher(teacher, batch_shape):
    """The checked top-k teacher: ``(indices int [..., k], log_probs float [..., k])``."""
    if not isinstance(teacher, (tuple, list)) or len(teacher) != 2:
        raise TypeError(
            "teacher must be a pair (indices, log_probs) of the teacher's top-k classes, "
            f"each of shape x.shape[:-1] + (k,); got {type(teacher).__name__}."
        )
    indices, log_probs = as_array("teacher[0]", teacher[0]), as_array("teacher[1]", teacher[1])
    check_integer("teacher[0] (indices)", indices, " The teacher's classes are indices.")
    check_floating("teacher[1] (log_probs)", log_probs)
    if indices.ndim != len(batch_shape) + 1 or indices.shape[:-1] != tuple(batch_shape):
        raise ValueError(
            f"teacher[0] (indices) must have shape x.shape[:-1] + (k,) = {tuple(batch_shape)} "
            f"+ (k,), got {indices.shape}."
        )
    check_shape("teacher[1] (log_probs)", log_probs, indices.shape, "teacher[0]'s shape")
    if indices.shape[-1] == 0:
        raise ValueError("teacher's top-k must have k >= 1 classes, got k = 0.")
    return indices, log_probs
