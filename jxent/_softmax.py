"""The stable softmax cross-entropy core that every categorical loss is built on.

One function, :func:`softmax_xent`, computes per-row

    loss = sum_k c_k * (lse - z_k) + z_loss * lse**2,     lse = log sum_k exp(z_k)

for a target given either as dense coefficients ``t`` or as an integer label with
optional class weights and label smoothing, over the last axis of ``x``.

Why it is written this way:

* ``jax.custom_jvp`` rather than ``custom_vjp``: forward mode (``jvp``, ``jacfwd``,
  ``hessian``) keeps working. The tangent rule is wrapped in ``jax.checkpoint``, so
  when JAX linearises and transposes it for reverse mode, the only residuals are the
  rule's inputs (the logits, which the caller holds anyway) and a few per-row
  scalars; the softmax is recomputed in the backward pass as one fused elementwise
  expression ``(exp(z - max) - c / f) * f`` with a per-row ``f``, never stored.
* Everything is written as ``(lse - max) * C + sum_k c_k * (max - z_k)``: both terms
  are sums of non-negative numbers, so there is no cancellation for large logits,
  and a zero coefficient on a ``-inf`` logit is selected away instead of giving
  ``0 * inf = NaN``.
* bfloat16/float16 logits are read as they are and converted inside the fused
  reductions, so no float32 copy of the logits is materialised; sums accumulate in
  float32 and the loss is returned in float32.

Backend-specific forms (the row reductions in pieces, the gather of bfloat16 bits,
the fusion barrier) come from ``jxent._backend``; the layout and the static options
(:class:`~jxent._layout.XentConfig`) from ``jxent._layout``.

Internal API (the other loss modules, ``jxent.parallel`` and ``jxent.linear`` build on
these; users call the public functions instead):

* the core: :func:`softmax_xent`, :func:`finish_rows` (per-row loss and gradient
  coefficients from the row sums), :class:`RowStats` (the per-row statistics its
  tangent rule reads);
* row sums and logits: :func:`row_sums`, :func:`finite_parts`, :func:`cap_logits`,
  :func:`cap_derivative`, :func:`mask_logits`, :func:`gather_last`,
  :func:`take_classes`, :func:`softmax_from_stats`, :func:`log_softmax_from_stats`;
* softmax statistics shared by the divergence and poly families:
  :class:`Shifted` and :func:`shifted_exp` (a row's shifted exponentials),
  :func:`scaled_logits`, :func:`half_gap`, :func:`log_shifted_sum`,
  :func:`dot_last`, :func:`kept_rows`, :func:`xlog_ratio`,
  :func:`fill_masked`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _backend
from jxent._layout import XentConfig, flatten_classes
from jxent._validation import accumulation_dtype

_DEFAULT_CONFIG = XentConfig()


class RowStats(NamedTuple):
    """Per-row scalars the tangent rule needs: all of shape ``x.shape[:-1]``."""

    # lse = row_max + lse_rel, kept apart: the softmax exp(z - row_max) * exp(-lse_rel)
    # is accurate for logits of any magnitude, where exp(z - lse) inherits lse's rounding.
    row_max: jax.Array  # the row's largest unmasked logit (0 on empty rows)
    lse_rel: jax.Array  # log sum exp(z - row_max), >= 0 (0 on empty rows)
    scale: jax.Array  # C + 2 * z_loss * lse: the coefficient of softmax in the gradient
    label_coef: jax.Array | None  # (1 - a) * w_y, integer labels only
    smooth_coef: jax.Array | None  # a / K_eff (label smoothing only)
    keep: jax.Array  # bool: the row contributes (included and has an unmasked class)
    # Scalar bool: every logit of the batch is finite, so the smoothing term of the
    # gradient needs no -inf mask. None where the forward did not check.
    all_finite: jax.Array | None = None


def cap_logits(x: jax.Array, soft_cap: float | None, dtype) -> jax.Array:
    """Soft-capped logits ``c * tanh(x / c)`` in ``dtype``; ``-inf`` stays ``-inf``."""
    z = x.astype(dtype)
    if soft_cap is None:
        return z
    # min(z, lowest) - lowest is 0 for finite z and +inf, -inf for -inf: arithmetic, not a
    # select, so the capped logits still fuse into XLA:CPU's reductions (see finite_parts).
    # (z - max(z, lowest) would be inf - inf = NaN for +inf, whose cap is c.)
    lowest = jnp.finfo(dtype).min
    return soft_cap * jnp.tanh(z / soft_cap) + (jnp.minimum(z, lowest) - lowest)


def cap_derivative(x: jax.Array, soft_cap: float | None, dtype) -> jax.Array | None:
    """d cap_logits / d x in ``dtype``, or None without a soft cap."""
    if soft_cap is None:
        return None
    t = jnp.tanh(x.astype(dtype) / soft_cap)
    return 1 - t * t


def _class_mask(x: jax.Array, class_mask: jax.Array | None) -> jax.Array:
    """Classes that take part: not masked by ``where`` and not a ``-inf`` logit."""
    finite = x > -jnp.inf
    return finite if class_mask is None else finite & class_mask


def _class_axis_sharded(x: jax.Array) -> bool:
    """Whether the class (last) axis of ``x`` is explicitly sharded over a mesh axis.

    Only mesh axes of type ``Explicit`` appear in an array's type; under ``Auto``
    axes (and on one device) this is False and GSPMD partitions the gather itself.
    A mesh axis of size 1 counts too: a gather on it cannot be typed either.
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None or len(spec) < x.ndim:
        return False
    names = spec[x.ndim - 1]
    return isinstance(names, str) or (isinstance(names, tuple) and len(names) > 0)


def take_classes(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[index]`` for a ``[classes]`` table and in-range batch-shaped indices.

    Under ``Explicit`` mesh axes a gather into a batch-sharded index needs its output
    sharding spelled out (the index's); a class-sharded table is then read by
    select + all-reduce of the per-row result, never gathered whole.
    """
    sharding = getattr(jax.typeof(index), "sharding", None)
    if any(s is not None for s in getattr(sharding, "spec", ())):
        return table.at[index].get(out_sharding=sharding)
    return jnp.take(table, index)


def _pick(x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The logit of each row's label, and whether the label is in range.

    A gather of one element per row: on XLA:CPU a compare-select-reduce over the
    classes does not fuse and would materialise a [rows, classes] buffer.
    """
    num_classes = x.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    return _take_last(gather_last, x, jnp.where(valid, labels, 0)), valid


def _take_last(gather, x: jax.Array, index: jax.Array) -> jax.Array:
    """``gather(x, index)`` (one element per row), also when x's class axis is sharded.

    With ``Explicit`` mesh axes a gather into a sharded axis has no typed form; run
    under ``auto_axes`` it is partitioned by XLA as with ``Auto`` axes: each shard
    reads the rows whose label it holds and a [rows] all-reduce combines them (no
    shard sees another's logits). The transposed scatter in the gradient likewise.
    """
    if not _class_axis_sharded(x):
        return gather(x, index)
    return jax.sharding.auto_axes(gather, out_sharding=jax.typeof(index).sharding)(x, index)


@jax.custom_jvp
def gather_last(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[..., index]`` per row (in-range ``index`` of the batch shape), any dtype.

    The gather itself is ``_backend.gather_bits`` (bfloat16 logits are read as bits on
    XLA:CPU); the tangent is the same gather of the logits' tangent.
    """
    return _backend.gather_bits(x, index)


@gather_last.defjvp
def _gather_last_jvp(primals, tangents):
    x, index = primals
    return gather_last(x, index), _take_along_last(tangents[0], index)


def _take_along_last(a: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(a, index[..., None], axis=-1, mode="clip")[..., 0]


def finite_parts(z: jax.Array):
    """``(indicator of z > -inf, max(z, lowest))`` using only arithmetic and max/min.

    XLA:CPU fuses a reduction with its elementwise producers only when those are
    arithmetic (no compare or select); written this way, the masked sums below run
    as single fused passes over the logits instead of materialising a
    [rows, classes] float32 temporary. For finite z, ``z / 2 + lowest`` is at least
    half the largest float, so the clamp gives exactly 1; for ``-inf`` it gives 0.
    """
    big = jnp.finfo(z.dtype).max
    indicator = jnp.minimum(jnp.maximum(0.5 * z + big, 0), 1)
    return indicator, jnp.maximum(z, -big)


def row_sums(terms: dict[str, jax.Array], *, blocked: bool = True) -> dict[str, jax.Array]:
    """Sums each [..., classes] term over the last axis in ONE variadic reduction.

    On XLA:CPU, separate reductions of the same float32-converted bfloat16 logits
    make XLA materialise the converted copy; a single variadic reduce fuses the
    conversion instead and reads the logits once. The sums are compensated (see
    :func:`_sum_last_axis`): their error does not grow with the number of classes.
    ``blocked=False`` trades speed for no temporary at all (a ``[rows, classes / 128]``
    buffer per term otherwise), for paths that rarely run.
    """
    names = list(terms)
    fn = _sum_last_axis if blocked else _compensated_sum_last_axis
    return dict(zip(names, fn(*(terms[n] for n in names)), strict=True))


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s = fl(a + b)`` and its exact rounding error ``a + b - s`` (Knuth's TwoSum).

    Branch-free, valid in either order of magnitude, and XLA does not reassociate
    floating-point arithmetic, so the error term survives compilation.
    """
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


#: Columns per block of the blocked row sums (see ``_sum_last_axis``).
SUM_BLOCK = 128


@jax.custom_jvp
def _sum_last_axis(*operands: jax.Array) -> tuple[jax.Array, ...]:
    # XLA:CPU runs a variadic reduce as one scalar loop, element after element: a plain
    # sum's rounding error would grow linearly with the row length (4.4e-4 relative at
    # 131072 classes, jax 0.10). On one device the rows are summed in blocks of
    # SUM_BLOCK columns (error of 128 additions) and the block sums with compensation:
    # accurate, and faster than one long loop (dense targets at 1024x32000, float32:
    # 383 ms against 413 ms plain and 596 ms compensated throughout, jax 0.10.2 CPU).
    # The block view merges part of the class axis with the batch, which on a mesh
    # could make GSPMD regather a class-sharded axis: there every element is summed
    # with compensation instead.
    k = operands[0].shape[-1]
    if not _backend.single_device() or k <= 2 * SUM_BLOCK or operands[0].ndim < 1:
        return _compensated_sums(operands)
    blocks = -(-k // SUM_BLOCK)
    pad = [(0, 0)] * (operands[0].ndim - 1) + [(0, blocks * SUM_BLOCK - k)]
    shape = operands[0].shape[:-1] + (blocks, SUM_BLOCK)
    inits = tuple(jnp.zeros((), o.dtype) for o in operands)
    add = lambda a, b: tuple(i + j for i, j in zip(a, b, strict=True))  # noqa: E731
    blocked = tuple(jnp.pad(o, pad).reshape(shape) for o in operands)
    partial = lax.reduce(blocked, inits, add, (len(shape) - 1,))
    return _compensated_sums(tuple(partial))


def _compensated_sums(operands: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    # Each operand carries a running compensation (its inputs are zeros, fused away),
    # which keeps the error at a few ulps for any length and any order of combination,
    # so tree reductions (GPU, TPU, sharded rows) are exact to the same bound.
    n = len(operands)
    zeros = tuple(jnp.zeros_like(o) for o in operands)
    inits = tuple(jnp.zeros((), o.dtype) for o in operands) * 2

    def add(a, b):
        sums, comps = [], []
        for i in range(n):
            s, err = _two_sum(a[i], b[i])
            sums.append(s)
            comps.append(a[n + i] + b[n + i] + err)
        return tuple(sums) + tuple(comps)

    out = lax.reduce(operands + zeros, inits, add, (operands[0].ndim - 1,))
    return tuple(out[i] + out[n + i] for i in range(n))


@jax.custom_jvp
def _compensated_sum_last_axis(*operands: jax.Array) -> tuple[jax.Array, ...]:
    return _compensated_sums(operands)


def _sum_jvp(fn):
    def jvp(primals, tangents):
        # The sum is linear; plain sums keep the tangent transposable and exact to any
        # order (JAX's generic variadic-reduce rule mishandles symbolic-zero tangents).
        return fn(*primals), tuple(jnp.sum(t, axis=-1) for t in tangents)

    return jvp


_sum_last_axis.defjvp(_sum_jvp(_sum_last_axis))
_compensated_sum_last_axis.defjvp(_sum_jvp(_compensated_sum_last_axis))


def _smoothing_sums(x, row_max, class_weights, masked_smoothing_sums):
    """``(n, sum_k w_k, sum_k w_k (max - x_k) / 2)`` over the finite classes of each row,
    and whether every logit of the batch is finite.

    The common case, every logit finite, is one reduction of ``w_k (max - x_k) / 2``:
    a sum of non-negative terms, exact to a few ulps for logits of any offset (the
    shorter ``max * sum(w) - x @ w`` cancels: 5e-5 relative error at an offset of
    1e4). A batch with any ``-inf`` (or overflowing) logit makes that sum non-finite
    and takes the masked path instead; under ``vmap`` the ``cond`` becomes a select
    and both paths run.
    """
    acc = row_max.dtype
    if class_weights is None:

        def term(x, m):
            return 0.5 * m - 0.5 * x.astype(acc)

        arrays = (x,)
        sum_w = jnp.asarray(x.shape[-1], acc)
    else:
        w = class_weights.astype(acc)

        def term(x, w, m):
            return w * (0.5 * m - 0.5 * x.astype(acc))

        arrays = (x, jnp.broadcast_to(w, x.shape))
        sum_w = jnp.sum(w)
    # Halved so that a sum of gaps near the float32 maximum does not overflow. The barrier
    # keeps XLA:CPU from sharing the float32 conversion of bfloat16 logits between this
    # sum and the sum of exponentials (a shared conversion is materialised).
    arrays = (_backend.cpu_barrier(arrays[0]),) + arrays[1:]
    gap_sum = _backend.reduce_rows(jnp.sum, term, arrays, (row_max,))

    def unmasked_sums():
        # Built from the sum over x so both branches have its type, sharding included
        # (and, inside shard_map, the same varying mesh axes).
        n = jnp.full_like(gap_sum, x.shape[-1])
        return n, jnp.zeros_like(gap_sum) + sum_w, gap_sum

    ok = jnp.all(jnp.isfinite(gap_sum))
    return lax.cond(ok, unmasked_sums, masked_smoothing_sums), ok


def mask_logits(x: jax.Array, class_mask: jax.Array | None) -> jax.Array:
    """``x`` with the classes that ``class_mask`` drops set to ``-inf``.

    Applied before anything reads the logits: a masked class then takes no part
    whatever it holds (``+inf`` and NaN included), exactly as a ``-inf`` logit.
    """
    if class_mask is None:
        return x
    return jnp.where(class_mask, x, jnp.asarray(-jnp.inf, x.dtype))


def _forward(cfg: XentConfig, x, targets, labels, class_mask, row_mask, class_weights):
    x, targets, class_mask = (flatten_classes(a, cfg.class_axes) for a in (x, targets, class_mask))
    # The label's own logit is read unmasked (optax's rule: where masks the normaliser).
    x_raw, x = x, mask_logits(x, class_mask)
    acc = accumulation_dtype(x.dtype)
    a = cfg.label_smoothing
    zero = jnp.zeros((), acc)
    z = cap_logits(x, cfg.soft_cap, acc)
    all_finite = None

    # The row maximum is taken on the raw logits: max is exact in any dtype and the
    # soft cap is monotone, so no converted copy of x is needed for it. -inf logits
    # need no mask: they never win the max and exp(-inf) = 0 below.
    raw_max = _backend.reduce_rows(jnp.max, lambda x: x, (x,))
    row_max = cap_logits(raw_max, cfg.soft_cap, acc)
    has_class = row_max != -jnp.inf  # NaN logits keep the row (and make it NaN)
    row_max = lax.stop_gradient(jnp.where(has_class, row_max, zero))
    exp_shifted = jnp.exp(z - row_max[..., None])
    if class_mask is not None:
        exp_shifted = jnp.where(class_mask, exp_shifted, zero)
    terms = {"sum_exp": exp_shifted}

    def sum_exp_only():
        # The common case: one reduction, cut into pieces for long rows on CPU.
        def term(x, m):
            return jnp.exp(cap_logits(x, cfg.soft_cap, acc) - m)

        return {"sum_exp": _backend.reduce_rows(jnp.sum, term, (x,), (row_max,))}

    def finite_and_half_gap(z=z):
        finite, z_floor = finite_parts(z)
        if class_mask is not None:
            finite = jnp.where(class_mask, finite, zero)
        # (max - z) / 2 on finite classes: >= 0, never overflows, and 0 * it is 0 on -inf.
        return finite, finite * (0.5 * row_max[..., None] - 0.5 * z_floor)

    if labels is None:
        finite, gaps = finite_and_half_gap()
        t = targets.astype(acc)
        if class_mask is not None:
            t = jnp.where(class_mask, t, zero)
        terms.update(t=t, t_gap=t * gaps, t_on_inf=t * (1 - finite))
    if a > 0:
        w = jnp.ones(x.shape[-1:], acc) if class_weights is None else class_weights.astype(acc)
        w_rows = jnp.expand_dims(w, tuple(range(x.ndim - 1)))  # explicit rank broadcast

        def smoothing_terms(z):
            finite, gaps = finite_and_half_gap(z)
            return {"n": finite, "w": finite * w_rows, "w_gap": w_rows * gaps}

        if labels is None or class_mask is not None or cfg.soft_cap is not None:
            # In the same variadic reduction as the sum of exponentials: every sum reads
            # the (converted, capped) logits in one pass.
            terms.update(smoothing_terms(z))
            sums = row_sums(terms)
        else:
            sums = sum_exp_only()

            def masked_smoothing_sums():
                # Converted here, inside the branch: a converted copy of x passed into
                # the cond would be materialised.
                s = row_sums(smoothing_terms(cap_logits(x, cfg.soft_cap, acc)), blocked=False)
                return s["n"], s["w"], s["w_gap"]

            (n, sum_w, w_gap), all_finite = _smoothing_sums(
                x, row_max, class_weights, masked_smoothing_sums
            )
            sums.update(n=n, w=sum_w, w_gap=w_gap)
    elif labels is not None and class_mask is None:
        sums = sum_exp_only()
    else:
        sums = row_sums(terms)

    lse_rel = jnp.log(jnp.where(has_class, sums["sum_exp"], 1))  # lse - row_max, >= 0
    if labels is not None:
        z_label, valid = _pick(x_raw, labels)
        z_label = cap_logits(z_label, cfg.soft_cap, acc)
        if class_weights is None:
            w_label = jnp.ones(labels.shape, acc)
        else:
            w_label = take_classes(class_weights.astype(acc), jnp.where(valid, labels, 0))
        # An out-of-range label has no logit: make its loss NaN, never plausible.
        w_label = jnp.where(valid, w_label, jnp.nan)
        label_coef = (1 - a) * w_label
        big_c = label_coef
        dist = jnp.where(label_coef != 0, label_coef * (row_max - z_label), zero)
    else:
        label_coef = None
        big_c = (1 - a) * sums["t"]
        dist = (2 * (1 - a)) * sums["t_gap"]
        # Target mass on a -inf logit is impossible under the model: the loss is +inf.
        dist = jnp.where(sums["t_on_inf"] > 0, jnp.inf, dist)

    smoothing = (sums["n"], sums["w"], sums["w_gap"]) if a > 0 else None
    loss, keep, scale, label_coef, smooth_coef = finish_rows(
        cfg, row_max, lse_rel, has_class, big_c, dist, label_coef, smoothing, row_mask
    )
    lse_rel = jnp.where(has_class, lse_rel, zero)
    return loss, RowStats(row_max, lse_rel, scale, label_coef, smooth_coef, keep, all_finite)


def softmax_from_stats(z: jax.Array, row_max: jax.Array, log_sum: jax.Array) -> jax.Array:
    """``softmax(z)`` over the last axis from the row's max and ``log sum exp(z - max)``.

    ``exp(z - max) * exp(-log_sum)``: the exponent is exact for logits of any
    magnitude, where ``exp(z - lse)`` inherits the rounding of ``lse`` (3e-5 relative
    at float32 logits near 1000). ``-inf`` logits give exactly 0.
    """
    return jnp.exp(z - row_max[..., None]) * jnp.exp(-log_sum)[..., None]


def log_softmax_from_stats(z: jax.Array, row_max: jax.Array, log_sum: jax.Array) -> jax.Array:
    """``log_softmax(z)`` from the same row statistics: ``(z - max) - log_sum``."""
    return (z - row_max[..., None]) - log_sum[..., None]


# --------------------------------------------------------------------------------------------
# Softmax statistics shared by the divergence and poly families
# --------------------------------------------------------------------------------------------


class Shifted(NamedTuple):
    """The shifted exponentials of a softmax over the last axis (see :func:`shifted_exp`)."""

    z: jax.Array  # [..., K] scaled logits in the accumulation dtype, -inf where masked
    row_max: jax.Array  # [...] max over unmasked classes; 0 on rows without any
    has_class: jax.Array  # [...] bool: the row has an unmasked finite logit
    e: jax.Array  # [..., K] exp(z - row_max), exactly 0 on -inf and masked classes


def scaled_logits(x: jax.Array, class_mask, scale: float, acc) -> jax.Array:
    """``scale * x`` in ``acc`` with masked classes at ``-inf`` (see :func:`mask_logits`)."""
    z = mask_logits(x, class_mask).astype(acc)
    return z if scale == 1.0 else z * scale


def shifted_exp(x: jax.Array, class_mask, scale: float, acc) -> Shifted:
    """The shifted exponentials of a softmax over the last axis of ``scale * x``.

    The row maximum is taken on the raw input (exact in any dtype, and ``scale > 0``
    is monotone), so no converted copy of a bfloat16 ``x`` is needed for it. Masked
    classes are ``-inf`` before anything reads them, whatever they hold.
    """
    row_max = jnp.max(mask_logits(x, class_mask), axis=-1).astype(acc)
    if scale != 1.0:
        row_max = row_max * scale
    has_class = row_max > -jnp.inf
    row_max = lax.stop_gradient(jnp.where(has_class, row_max, jnp.zeros((), acc)))
    z = scaled_logits(x, class_mask, scale, acc)
    return Shifted(z, row_max, has_class, jnp.exp(z - row_max[..., None]))


def half_gap(s: Shifted) -> jax.Array:
    """``(row_max - z) / 2``, finite everywhere (``-inf`` logits clamp to the lowest float).

    It is only ever multiplied by ``s.e``, which is 0 where the clamp applies; halving
    keeps the difference from overflowing for logits near the float maximum.
    """
    _, z_floor = finite_parts(s.z)
    return 0.5 * s.row_max[..., None] - 0.5 * z_floor


def log_shifted_sum(sums: jax.Array, has_class: jax.Array) -> jax.Array:
    """``log sum_k exp(z_k - row_max)`` from the row sums: 0 on rows without a class."""
    return jnp.log(jnp.where(has_class, sums, jnp.ones((), sums.dtype)))


def xlog_ratio(a: jax.Array, log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``a (log a - log b)``, exactly 0 where ``a = 0`` whatever ``log b`` (``0 log 0 = 0``,
    no ``0 * inf``): the terms of a KL divergence between two distributions."""
    zero = jnp.zeros((), a.dtype)
    ok = a > 0
    return jnp.where(ok, a * (log_a - jnp.where(ok, log_b, zero)), zero)


def kept_rows(has_class: jax.Array, row_mask: jax.Array | None) -> jax.Array:
    """The rows that count: those with a class, and kept by ``row_mask`` (None: all)."""
    return has_class if row_mask is None else has_class & row_mask


def fill_masked(x: jax.Array, class_mask: jax.Array | None, fill) -> jax.Array:
    """``x`` with ``fill`` on the classes that ``class_mask`` drops (None: none dropped)."""
    return x if class_mask is None else jnp.where(class_mask, x, jnp.asarray(fill, x.dtype))


def dot_last(g: jax.Array, dot: jax.Array | None) -> jax.Array | int:
    """``sum_k g_k dot_k`` over the last axis (0 if the input is not perturbed: None)."""
    if dot is None:
        return 0
    return jnp.sum(g * dot.astype(g.dtype), axis=-1)


def finish_rows(
    cfg: XentConfig, row_max, lse_rel, has_class, big_c, dist, label_coef, smoothing, row_mask
):
    """Per-row loss and gradient coefficients from the row sums (the core and jxent.parallel).

    ``big_c`` and ``dist`` are the target's ``C = sum_k c_k`` and ``sum_k c_k (max - z_k)``
    before smoothing; ``smoothing`` is ``(n, sum_k w_k, sum_k w_k (max - z_k) / 2)`` over
    the finite classes when label smoothing is on. Returns the loss, which rows count,
    and the coefficients of the gradient ``scale * softmax - c``. A dropped row's label
    coefficient is NaN when its label is out of range (an ignore_index): the transposed
    rule multiplies the coefficients by the row's zero cotangent, so they are zeroed here
    rather than selected away after.
    """
    zero = jnp.zeros((), row_max.dtype)
    smooth_coef = None
    if smoothing is not None:
        n, sum_w, w_half_gap = smoothing
        smooth_coef = cfg.label_smoothing / jnp.where(has_class, n, 1)
        big_c = big_c + smooth_coef * sum_w
        dist = dist + (2 * smooth_coef) * w_half_gap
    lse = row_max + lse_rel
    loss = lse_rel * big_c + dist
    scale = big_c
    if cfg.z_loss > 0:
        loss = loss + cfg.z_loss * lse * lse
        scale = scale + 2 * cfg.z_loss * lse
    keep = kept_rows(has_class, row_mask)
    loss = jnp.where(keep, loss, zero)
    scale = jnp.where(keep, scale, zero)
    if label_coef is not None:
        label_coef = jnp.where(keep, label_coef, zero)
    if smooth_coef is not None:
        smooth_coef = jnp.where(keep, smooth_coef, zero)
    return loss, keep, scale, label_coef, smooth_coef


def _tangent(cfg, x, targets, labels, class_mask, class_weights, stats, x_dot, t_dot):
    """The loss tangent: linear in ``(x_dot, t_dot)``; its transpose is the gradient.

    The softmax part is one elementwise expression of ``x``; for 32/64-bit logits
    the label's part is a gather of ``x_dot``, whose transpose is a scatter-add that
    XLA performs in place on the softmax part (cheaper than a compare-select over
    every class).
    """
    x, targets, class_mask, x_dot, t_dot = (
        flatten_classes(a, cfg.class_axes) for a in (x, targets, class_mask, x_dot, t_dot)
    )
    x_raw, x = x, mask_logits(x, class_mask)
    acc = stats.lse_rel.dtype
    zero = jnp.zeros((), acc)

    # The gradient scale * softmax - c is computed as factor * (exp(z - max) - c / factor)
    # with factor = scale / sum exp(z - max) a per-row number applied after the class
    # sum, so that the transposed pass reads three or four per-row numbers (max, c's
    # row coefficient, factor times the cotangent). XLA:CPU keeps a loop with so few
    # live values unrolled, 1.5x faster than with one more (measured). exp(z - max)
    # times a factor is also more accurate than exp(z - max - log sum) for small
    # probabilities: no rounded log-sum in the exponent.
    scale = stats.scale
    factor = scale * jnp.exp(-stats.lse_rel)
    # A zero factor (scale 0) leaves only -c: the softmax part vanishes (max -> +inf).
    usable = factor != 0
    row_max = jnp.where(usable, stats.row_max, jnp.inf)
    inv_factor = 1 / jnp.where(usable, factor, 1)
    factor = jnp.where(usable, factor, 1)
    z = cap_logits(x, cfg.soft_cap, acc)
    grad = jnp.exp(z - row_max[..., None])  # 0 on -inf logits
    if class_mask is not None:
        grad = jnp.where(class_mask, grad, zero)
    if labels is None:
        t = targets.astype(acc)
        if class_mask is not None:
            t = jnp.where(class_mask, t, zero)
        grad = grad - ((1 - cfg.label_smoothing) * inv_factor)[..., None] * t
    if stats.smooth_coef is not None:
        smooth = (inv_factor * stats.smooth_coef)[..., None]
        if class_weights is not None:
            smooth = smooth * jnp.expand_dims(class_weights.astype(acc), tuple(range(x.ndim - 1)))
        # No smoothing mass on -inf logits. all_finite is one flag for the whole batch:
        # the select then costs nothing in the common case (the loop is unswitched).
        finite = _class_mask(x, class_mask)
        if stats.all_finite is not None:
            finite = stats.all_finite | finite
        grad = grad - jnp.where(finite, smooth, zero)
    # XLA:CPU upcasts a scatter into a 16-bit gradient to float32 (a full copy), so
    # for bfloat16/float16 the label's term is a compare-select in the same
    # elementwise pass instead.
    label_in_pass = labels is not None and x.dtype.itemsize < 4
    if label_in_pass:
        # Laid out like x: an iota with no sharding would not match an explicitly sharded x.
        sharding = jax.typeof(x).sharding if _class_axis_sharded(x) else None
        iota = lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1, out_sharding=sharding)
        label = (inv_factor * stats.label_coef)[..., None]
        grad = grad - jnp.where(iota == labels[..., None], label, zero)
    dz = cap_derivative(x, cfg.soft_cap, acc)
    if dz is not None:
        grad = grad * dz
    out = factor * jnp.sum(grad * x_dot.astype(acc), axis=-1)
    if labels is not None and not label_in_pass:
        index = jnp.clip(labels, 0, x.shape[-1] - 1)
        x_dot_label = _take_last(_take_along_last, x_dot, index)
        coef = stats.label_coef
        if dz is not None:
            x_label = _take_last(gather_last, x_raw, index)
            coef = coef * cap_derivative(x_label, cfg.soft_cap, acc)
        out = out - coef * x_dot_label.astype(acc)
    if t_dot is not None:
        # d loss / d t_k = (1 - a) (lse - z_k). On a -inf logit the true derivative is
        # +inf; it is taken as 0 there so a zero tangent cannot make 0 * inf = NaN.
        log_p = log_softmax_from_stats(z, stats.row_max, stats.lse_rel)
        target_grad = jnp.where(_class_mask(x, class_mask), -log_p, zero)
        out = out + (1 - cfg.label_smoothing) * jnp.sum(target_grad * t_dot.astype(acc), axis=-1)
    return jnp.where(stats.keep, out, zero)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _xent(cfg, x, targets, labels, class_mask, row_mask, class_weights):
    return _forward(cfg, x, targets, labels, class_mask, row_mask, class_weights)[0]


@_xent.defjvp
def _xent_jvp(cfg, primals, tangents):
    x, targets, labels, class_mask, row_mask, class_weights = primals
    x_dot, t_dot = tangents[0], tangents[1]
    class_weights = None if class_weights is None else lax.stop_gradient(class_weights)
    loss, stats = _forward(cfg, x, targets, labels, class_mask, row_mask, class_weights)
    # checkpoint: under reverse mode the residuals are this call's inputs (x and the
    # per-row stats), and the softmax is recomputed inside the transposed rule.
    tangent = jax.checkpoint(functools.partial(_tangent, cfg))(
        x, targets, labels, class_mask, class_weights, stats, x_dot, t_dot
    )
    return loss, tangent


def softmax_xent(
    x: jax.Array,
    *,
    targets: jax.Array | None = None,
    labels: jax.Array | None = None,
    class_mask: jax.Array | None = None,
    row_mask: jax.Array | None = None,
    class_weights: jax.Array | None = None,
    config: XentConfig = _DEFAULT_CONFIG,
) -> jax.Array:
    """Per-row softmax cross-entropy over the class axes of ``x``.

    Arguments are assumed validated (see ``jxent._categorical``); exactly one of
    ``targets`` (same shape as ``x``) or integer ``labels`` (the batch shape) is
    given. The classes are ``config.class_axes`` (flattened in that order), or the
    last axis. ``class_mask`` broadcasts against ``x``; ``row_mask`` has the batch
    shape. Rows where ``row_mask`` is False, or with no unmasked class, give 0 with
    zero gradient. Returns float32 (float64 for float64 ``x``), shape ``x.shape[:-1]``.
    """
    if class_mask is not None:
        class_mask = jnp.broadcast_to(class_mask, x.shape)
    return _xent(config, x, targets, labels, class_mask, row_mask, class_weights)
