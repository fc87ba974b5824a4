"""The stable softmax primitives that every softmax loss is built on.

The row statistics of a softmax over the last axis, shared by the cross-entropy core
(``jxent._softmax_xent``), the divergence and poly families, the fused engine
(``jxent._fused``) and ``jxent.parallel``:

* :func:`finish_rows` writes a row's cross-entropy as ``(lse - max) * C + sum_k c_k *
  (max - z_k)``: both terms are sums of non-negative numbers, so there is no
  cancellation for large logits;
* :func:`row_sums` sums terms over the classes in one variadic reduction (the logits
  are read once, bfloat16/float16 converted inside it), compensated so that the error
  does not grow with the number of classes;
* the softmax is ``exp(z - max) * exp(-log_sum)`` from a row's statistics
  (:func:`softmax_from_stats`), never ``exp(z - lse)``, which inherits the rounding of
  ``lse``; masked classes are ``-inf`` before anything reads them (:func:`mask_logits`).

Backend-specific forms (the gather of bfloat16 bits, the single-device test of the
blocked sums) come from ``jxent._backend``; the static options
(:class:`~jxent._layout.XentConfig`) from ``jxent._layout``.

Internal API (the loss modules, ``jxent._fused``, ``jxent.parallel`` and ``jxent.linear``
build on these; users call the public functions instead):

* the cross-entropy's rows: :func:`finish_rows` (per-row loss and gradient
  coefficients from the row sums), :class:`RowStats` (the per-row statistics a
  cross-entropy tangent rule reads);
* row sums and logits: :func:`row_sums`, :func:`short_row_sums` (``SHORT_ROW``),
  :func:`finite_parts`, :func:`cap_logits`,
  :func:`cap_derivative`, :func:`mask_logits`, :func:`gather_last`,
  :func:`take_along_last`, :func:`take_classes`, :func:`softmax_from_stats`,
  :func:`log_softmax_from_stats`;
* softmax statistics shared by the divergence and poly families:
  :class:`Shifted` and :func:`shifted_exp` (a row's shifted exponentials),
  :func:`scaled_logits`, :func:`half_gap`, :func:`log_shifted_sum`,
  :func:`dot_last`, :func:`kept_rows`, :func:`xlog_ratio`,
  :func:`fill_masked`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _backend
from jxent._layout import XentConfig


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
    return gather_last(x, index), take_along_last(tangents[0], index)


def take_along_last(a: jax.Array, index: jax.Array) -> jax.Array:
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


#: Rows of at most this many classes are summed in one plain variadic reduction
#: (:func:`short_row_sums`).
SHORT_ROW = 32


def short_row_sums(terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums each term over a short last axis (``SHORT_ROW`` classes at most) in ONE plain
    variadic reduction: no blocks and no compensation, exact to the error of as many
    additions as the blocked sums' blocks (:data:`SUM_BLOCK`).

    For short rows this is the fastest form on XLA:CPU (jax 0.10.2, four sums of 1024 x
    10 float32: 0.03 ms, 0.06 ms as separate reductions, 0.15 ms compensated), where
    the fixed cost of each reduction and each extra pass dominates.
    """
    names = list(terms)
    return dict(zip(names, _plain_sum_last_axis(*(terms[n] for n in names)), strict=True))


@jax.custom_jvp
def _plain_sum_last_axis(*operands: jax.Array) -> tuple[jax.Array, ...]:
    inits = tuple(jnp.zeros((), o.dtype) for o in operands)
    add = lambda a, b: tuple(i + j for i, j in zip(a, b, strict=True))  # noqa: E731
    return tuple(lax.reduce(operands, inits, add, (operands[0].ndim - 1,)))


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
_plain_sum_last_axis.defjvp(_sum_jvp(_plain_sum_last_axis))


def mask_logits(x: jax.Array, class_mask: jax.Array | None) -> jax.Array:
    """``x`` with the classes that ``class_mask`` drops set to ``-inf``.

    Applied before anything reads the logits: a masked class then takes no part
    whatever it holds (``+inf`` and NaN included), exactly as a ``-inf`` logit.
    """
    if class_mask is None:
        return x
    return jnp.where(class_mask, x, jnp.asarray(-jnp.inf, x.dtype))


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
