"""The arguments of a fused loss, validated once at the public boundary.

Every public fused loss (``jxent.linear_*`` and ``jxent.parallel.linear_*``) hands its
arguments to :func:`checked_call` and gets a :class:`Call`: the static
:class:`Options` (hashable) and the checked arrays. Whatever is wrong with them raises
there, at trace time, naming the argument, except what only a later step can judge,
also at trace time: the block sizes (``plan.plan_blocks``), a teacher (its loss's call,
with the checks below) and a schedule the call cannot take (``driver.run``). The same
function serves one device's ``w`` and a ``w`` split over a mesh axis (``axis_name``,
inside ``jax.shard_map``), so every option means the same in both forms.

The checks of the fused losses' own arguments live here too (the hidden states and
weight, padding columns, a normalizer, a teacher's top-k or hidden states); the checks
every loss shares are ``jxent._validation``'s.

Internal API: :class:`Options`, :class:`Call`, :func:`checked_call`, :func:`checked_bool`,
:func:`static_positive`, :func:`is_hidden_teacher`, :func:`hidden_teacher`,
:func:`top_k_teacher`, :func:`jensen_shannon_beta`, ``TOKENS_SPEC``.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jxent import _validation as v
from jxent._fused import engine, filtering
from jxent._fused.logits import compute_dtype
from jxent._split import AxisName, Layout, check_split, check_unsplit, vocab_layout

#: How a value split as the tokens is written in a shard_map's in_specs (for errors).
TOKENS_SPEC = 'P("data") as x\'s tokens'


class Options(NamedTuple):
    """The static options of one call, checked (hashable)."""

    reduction: str
    chunk_size: Any  # None, an int or a pair (see plan.plan_blocks)
    soft_cap: float | None
    temperature: float | None  # None: 1
    num_classes: int  # the real classes of the whole vocabulary
    w_layout: str  # "dv" ([D, V]) or "vd" ([V, D])
    implementation: str  # "auto" or a name of engine.IMPLEMENTATIONS
    split: Layout | None = None  # the vocabulary's split over a mesh axis; None: one device
    batch_axis_name: AxisName | None = None  # mesh axes the tokens are split over
    schedule: str = "auto"  # "auto", "single_pass" or "streaming" (see plan.plan_blocks)
    precision: Any = None  # of the matrix products, as jnp.dot's (a Precision or a pair)
    filter_eps: float | None = None  # gradient filtering's eps, "auto" resolved; None: off


class Call(NamedTuple):
    """The checked arguments of one call: the options and the arrays (batch-shaped, as
    given; ``x`` ``[..., D]``)."""

    options: Options
    x: jax.Array
    w: jax.Array  # one device's [D, V] (or [V, D]), or this shard's columns
    bias: jax.Array | None
    labels: jax.Array | None  # integer, x.shape[:-1] (global class ids)
    class_weights: jax.Array | None  # [columns], a constant
    row_mask: jax.Array | None  # bool, x.shape[:-1]: False drops a token
    token_weights: jax.Array | None  # float in acc, x.shape[:-1], constants
    normalizer: jax.Array | None  # a scalar in acc, a constant
    acc: Any  # the accumulation dtype

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.x.shape[:-1]

    @property
    def columns(self) -> int:
        """``w``'s columns (this shard's, when split)."""
        return self.w.shape[1 if self.options.w_layout == "dv" else 0]


def static_positive(name: str, value) -> float:
    """A static Python number ``> 0`` (temperature, soft cap)."""
    return v.static_number(name, value, lo=0, lo_open=True)


def checked_call(
    x,
    w,
    labels=None,
    *,
    bias=None,
    class_weights=None,
    where=None,
    token_weights=None,
    normalizer=None,
    reduction: str = "mean",
    chunk_size=None,
    logit_soft_cap=None,
    temperature=1.0,
    num_classes=None,
    w_layout: str = "dv",
    implementation: str | None = None,
    axis_name: AxisName | None = None,
    batch_axis_name: AxisName | None = None,
    schedule: str = "auto",
    precision=None,
    filter_eps=None,
) -> Call:
    """Every argument of a fused loss checked, as a :class:`Call`. ``axis_name``: ``w``
    is this shard's columns of a vocabulary split over that mesh axis (inside
    ``shard_map``), and the token arrays must be the same on every shard of it."""
    split_w = axis_name is not None
    inputs = _linear_inputs(
        x,
        w,
        labels,
        bias,
        class_weights,
        where,
        w_name="local_w" if split_w else "w",
        w_shape=(
            "(D, V_local) = ({D}, columns on this shard)"
            if split_w
            # A [D, 0] w gets this message too: at least one column (class) is wanted.
            else "(D, V) = ({D}, num_classes >= 1) (for tied embeddings pass embedding.T, "
            "or the [V, D] table with w_layout='vd')"
        ),
        per_column=(
            "this shard's slice of the columns"
            if split_w
            else ("w.shape[1]" if w_layout == "dv" else "w.shape[0]")
        ),
        w_layout=w_layout,
    )
    x, w, labels, bias, class_weights, row_mask = inputs
    _check_dtypes(x, w, bias)
    v.check_reduction(reduction)
    acc = v.accumulation_dtype(compute_dtype(x, w, bias))
    columns = w.shape[1 if w_layout == "dv" else 0]
    split = None
    if split_w:
        split = vocab_layout(axis_name, columns, num_classes)
        num_classes = split.num_classes
        check_split("local_w", w, split)
        check_unsplit("x", x, split, 'P("data", None) for x beside local_w in P(None, "model")')
        check_unsplit("labels", labels, split, TOKENS_SPEC)
        check_unsplit("where", row_mask, split, TOKENS_SPEC)
    else:
        num_classes = _checked_num_classes(num_classes, columns)
    weights = _token_weights(token_weights, x.shape[:-1], acc)
    if split is not None:
        check_unsplit("token_weights", weights, split, TOKENS_SPEC)
    if isinstance(chunk_size, list):
        chunk_size = tuple(chunk_size)  # the options are static: hashable
    options = Options(
        reduction=reduction,
        chunk_size=chunk_size,
        soft_cap=None
        if logit_soft_cap is None
        else static_positive("logit_soft_cap", logit_soft_cap),
        temperature=_temperature(temperature),
        num_classes=num_classes,
        w_layout=w_layout,
        implementation=_implementation(implementation),
        split=split,
        batch_axis_name=batch_axis_name,
        schedule=_schedule(schedule, reduction),
        precision=_precision(precision),
        filter_eps=_filter_eps(filter_eps, compute_dtype(x, w, bias)),
    )
    if class_weights is not None:
        # Constants: no gradient, the mean's denominator included.
        class_weights = jax.lax.stop_gradient(class_weights)
    return Call(
        options,
        x,
        w,
        bias,
        labels,
        class_weights,
        row_mask,
        weights,
        _checked_normalizer(normalizer, reduction, acc),
        acc,
    )


def _temperature(temperature) -> float | None:
    temperature = static_positive("temperature", temperature)
    return None if temperature == 1 else temperature


#: The schedules a caller may ask for (see ``jxent._fused.plan.plan_blocks``).
SCHEDULES = ("auto", "single_pass", "streaming")


def _schedule(schedule, reduction: str) -> str:
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if schedule == "single_pass" and reduction == "none":
        raise ValueError(
            'schedule="single_pass" computes the loss summed over the tokens with its '
            'gradients: it needs reduction="sum" or "mean", got reduction="none".'
        )
    return schedule


def _filter_eps(filter_eps, dtype) -> float | None:
    """``filter_eps`` (None, ``"auto"`` or a number in ``[0, 1]``) as a static float or
    None (``"auto"``: the unit roundoff of the inputs' ``dtype``)."""
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(
                f'filter_eps must be None, "auto" or a number in [0, 1], got {filter_eps!r}.'
            )
        return filtering.auto_eps(dtype)
    return v.static_number("filter_eps", filter_eps, lo=0, hi=1)


def _precision(precision):
    """``precision`` as ``jnp.dot`` takes it (None, a ``jax.lax.Precision`` or its name, or
    a pair of them: one per operand, ``x``'s first), as Precision values; a clear error
    otherwise."""
    if precision is None:
        return None
    pair = isinstance(precision, (tuple, list))
    parts = tuple(precision) if pair else (precision,)
    named = [jax.lax.Precision(p) if p in _PRECISION_NAMES else p for p in parts]
    if (pair and len(parts) != 2) or not all(isinstance(p, jax.lax.Precision) for p in named):
        raise ValueError(
            f"precision must be None, a jax.lax.Precision or one of {_PRECISION_NAMES}, "
            f"or a pair of them (one per operand), as jnp.dot takes it; got {precision!r}."
        )
    return tuple(named) if pair else named[0]


#: The names jax.lax.Precision takes.
_PRECISION_NAMES = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def _implementation(implementation) -> str:
    # The name is checked here; whether it runs this loss, once the loss exists.
    engine.choose(implementation)
    return engine.AUTO if implementation is None else implementation


def _token_weights(weights, batch_shape, acc):
    """Checked per-token float weights in ``acc`` (batch-shaped, constants), or None."""
    if weights is None:
        return None
    weights = v.as_array("token_weights", weights)
    v.check_floating("token_weights", weights)
    v.check_shape("token_weights", weights, batch_shape, "x.shape[:-1]: one weight per token")
    return jax.lax.stop_gradient(weights.astype(acc))


def checked_bool(name: str, value) -> bool:
    """A static Python bool (``return_lse``, ``return_entropy``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


class _LinearInputs(NamedTuple):
    x: jax.Array
    w: jax.Array
    labels: jax.Array
    bias: jax.Array | None
    class_weights: jax.Array | None
    row_mask: jax.Array | None


def _linear_inputs(
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
) -> _LinearInputs:
    """Checks the arguments of a fused linear cross-entropy (one shard's or the whole).

    ``w`` must be ``[D, columns]`` (``w_shape`` says how, in words); ``bias`` and
    ``class_weights`` have one entry per column (``per_column`` says which); ``where``
    flags tokens. Raises at trace time naming the argument and the shape it wanted.
    """
    x = v.as_array("x", x)
    w = v.as_array(w_name, w)
    v.check_floating("x", x)
    v.check_floating(w_name, w)
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
        labels = v.as_array("labels", labels)
        v.check_integer("labels", labels, " Labels are class indices.")
        v.check_shape("labels", labels, batch_shape, "x.shape[:-1]: one label per token")
    columns = (w.shape[1 - d_axis],)
    if bias is not None:
        bias = v.as_array("bias", bias)
        v.check_floating("bias", bias)
        v.check_shape("bias", bias, columns, f"one bias per column: {per_column}")
    if class_weights is not None:
        class_weights = v.as_array("class_weights", class_weights)
        v.check_floating("class_weights", class_weights)
        v.check_shape("class_weights", class_weights, columns, f"one per column: {per_column}")
    if where is not None:
        where = v.as_array("where", where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
        v.check_shape("where", where, batch_shape, "x.shape[:-1]: one flag per token")
    return _LinearInputs(x, w, labels, bias, class_weights, where)


def _check_dtypes(x: jax.Array, w: jax.Array, bias: jax.Array | None) -> None:
    """``x``, ``w`` and ``bias`` must promote to one dtype under strict promotion."""
    dtypes = [x.dtype, w.dtype] + ([] if bias is None else [bias.dtype])
    try:
        functools.reduce(jnp.promote_types, dtypes)
    except jax.dtypes.TypePromotionError:
        raise TypeError(
            f"x, w and bias have dtypes {[str(d) for d in dtypes]}, which "
            "jax_numpy_dtype_promotion='strict' does not promote: cast them to one dtype."
        ) from None


def _checked_normalizer(normalizer, reduction: str, acc):
    """The mean's denominator given by the caller, as a scalar of ``acc`` (or None)."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f'normalizer divides the "mean" reduction; got it with reduction={reduction!r}.'
        )
    normalizer = v.as_array("normalizer", normalizer)
    if normalizer.ndim != 0:
        raise ValueError(
            f"normalizer must be a scalar (the global token count), got shape {normalizer.shape}."
        )
    return jax.lax.stop_gradient(normalizer.astype(acc))


def _checked_num_classes(num_classes, columns: int) -> int:
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
    x_t, w_t = (
        v.as_array("teacher[0] (x_t)", teacher[0]),
        v.as_array("teacher[1] (w_t)", teacher[1]),
    )
    b_t = None
    if len(teacher) == 3 and teacher[2] is not None:
        b_t = v.as_array("teacher[2]", teacher[2])
    for name, a in (("teacher[0] (x_t)", x_t), ("teacher[1] (w_t)", w_t), ("teacher[2]", b_t)):
        if a is not None:
            v.check_floating(name, a)
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
        v.check_shape("teacher[2] (bias_t)", b_t, (w.shape[vocab_axis],), "one entry per column")
    dtypes = [a.dtype for a in (x_t, w_t, b_t) if a is not None]
    try:
        teacher_acc = v.accumulation_dtype(functools.reduce(jnp.promote_types, dtypes))
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
    beta = v.static_number("beta", beta, lo=0, hi=1)
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
    indices, log_probs = v.as_array("teacher[0]", teacher[0]), v.as_array("teacher[1]", teacher[1])
    v.check_integer("teacher[0] (indices)", indices, " The teacher's classes are indices.")
    v.check_floating("teacher[1] (log_probs)", log_probs)
    if indices.ndim != len(batch_shape) + 1 or indices.shape[:-1] != tuple(batch_shape):
        raise ValueError(
            f"teacher[0] (indices) must have shape x.shape[:-1] + (k,) = {tuple(batch_shape)} "
            f"+ (k,), got {indices.shape}."
        )
    v.check_shape("teacher[1] (log_probs)", log_probs, indices.shape, "teacher[0]'s shape")
    if indices.shape[-1] == 0:
        raise ValueError("teacher's top-k must have k >= 1 classes, got k = 0.")
    return indices, log_probs
