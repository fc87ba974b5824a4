"""Blocked linear softmax cross-entropy: the logits ``x @ w + b`` never exist whole.

The logits are produced one block of ``[token_block, vocab_block]`` at a time, in
float32 (float64 for float64 inputs), and reduced on the spot. Two schedules, both
under a ``jax.custom_vjp``:

* **Streaming** (vocabulary blocks narrower than the vocabulary; Cut Cross-Entropy's
  schedule). The forward pass keeps, per token, an online log-sum-exp (running
  maximum ``m`` and ``sum exp(z - m)``), the label's logit and, with label
  smoothing, ``sum_k w_k (m - z_k)``; it saves only these per-token numbers. The
  backward pass recomputes each block's logits and forms its ``dloss/dlogits``
  exactly as the core's tangent does, ``g * (scale * softmax - c)``; it adds the
  block's contribution ``dz @ w_blk.T`` to a float32 ``dx`` and, once all token
  blocks of a vocabulary block are done, writes that block's finished ``dw``
  columns in place. Temporary memory is a float32 ``dx`` plus a few panels
  (logits block, ``dx`` rows, ``dw`` columns): it does not grow with ``N * V``.
  Four matrix products of the size of ``x @ w`` in all.
* **Single pass** (a block spans the whole vocabulary, and the loss is summed over
  tokens; Liger Kernel's schedule). Each token block's logits give that block's
  exact softmax at once, so the forward pass under ``jax.vjp`` computes the
  gradients of the summed loss too, accumulating ``dw`` over token blocks in a
  float32 ``[D, V]`` buffer; the backward pass only scales them by the incoming
  cotangent. Three matrix products in all, as many as the unfused ``x @ w`` plus
  cross-entropy, at the price of the ``[D, V]`` accumulator. A call that is not
  differentiated runs the forward loop alone.

Per-token formulas (``a`` = label smoothing over all ``V`` classes, ``w`` = class
weights, ``z`` = soft-capped logits): with ``C = (1 - a) w_y + (a / V) sum_k w_k``,

    loss = C (lse - m) + (1 - a) w_y (m - z_y) + (a / V) sum_k w_k (m - z_k) + z_loss lse^2

where every term is a sum of non-negative numbers (no cancellation, as in the core),
and ``dloss/dz_k = (C + 2 z_loss lse) p_k - (1 - a) w_y [k = y] - (a / V) w_k``
(times ``1 - tanh^2`` of the scaled logit with a soft cap).

A shorter last block (``N`` or ``V`` not a multiple of the block) is a second,
static copy of the loop body: nothing is padded, so ``x`` and ``w`` are never
copied. XLA:CPU needs a few workarounds to keep bfloat16 blocks block-sized; see
``_rows``, ``_put`` and ``_rows_t``.

**Groups.** Each blocked axis (tokens, vocabulary) is viewed as ``[G, L]``, ``G``
groups of ``L = total / G`` consecutive entries, and a block takes the same ``b``
consecutive entries of every group (``G * b`` in all); the loops run over the
second axis. Under ``jax.jit`` with arrays sharded over ``Auto`` mesh axes (GSPMD),
a ``w`` split over ``S`` devices along ``V`` with ``S`` dividing ``G`` then has its
groups split over the devices, and every block is sliced from the unsplit axis on
each device: each device computes its own columns of every block, and per-token
numbers are combined across devices. A contiguous block would be a dynamic slice of
the split axis, which GSPMD can only take from a gathered copy of the whole of
``w`` (and of ``x`` for the tokens). ``G = 1`` is the plain contiguous layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jxent._softmax import XentConfig, reduce_rows, row_sums, take_classes
from jxent._validation import accumulation_dtype


class Spec(NamedTuple):
    """Static choices of one call: the options, the logits block shape and the groups.

    ``token_block`` and ``vocab_block`` count whole blocks (all groups); each is a
    multiple of its number of groups, which divides the axis length too.
    """

    config: XentConfig
    token_block: int
    vocab_block: int
    token_groups: int = 1
    vocab_groups: int = 1
    # The number of real classes when w has padding columns past them (None: all of w's
    # columns). The caller marks them in _Inputs.real_columns and gives them zero
    # smoothing weight.
    num_classes: int | None = None


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _for_blocks(total: int, size: int, body: Callable, carry):
    """Runs ``carry = body(start, length, carry)`` over ``[0, total)`` in blocks of ``size``.

    Full blocks run in a ``fori_loop`` (``start`` traced, one compiled body), a shorter
    last block with a static ``start`` and ``length``: nothing is padded, so neither
    ``x`` nor ``w`` is ever copied to a rounded-up size. The shorter block runs first:
    the loop then writes the accumulators last, and a grouped accumulator's final
    reshape is of the loop's result (a write into a reshaped buffer after the loop
    would cost XLA:CPU a copy of the accumulator).
    """
    num_full, rest = divmod(total, size)
    if rest:
        carry = body(num_full * size, rest, carry)
    if num_full == 1:
        carry = body(0, size, carry)
    elif num_full > 1:
        # int32 starts, whatever the loop counter's dtype (x64 or not).
        step = lambda i, c: body(lax.convert_element_type(i, jnp.int32) * size, size, c)  # noqa: E731
        carry = _vary_like(carry, jax.eval_shape(functools.partial(step, 0), carry))
        carry = lax.fori_loop(0, num_full, step, carry)
    return carry


def _varying(aval) -> frozenset:
    """The mesh axes a value of type ``aval`` varies over inside ``shard_map``."""
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset() if manual is None else frozenset(manual.varying)


def _vary_like(carry, out):
    """The loop's initial carry, varying over every mesh axis its body's results vary over.

    Inside ``shard_map`` a ``fori_loop`` needs carries of equal types, and zeros made
    here vary over no axis while the body's results vary with ``x`` and ``w``.
    """

    def cast(c, o):
        missing = tuple(sorted(_varying(o) - _varying(jax.typeof(c))))
        return lax.pcast(c, missing, to="varying") if missing else c

    return jax.tree.map(cast, carry, out)


def _sum_to_type(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the mesh axes it varies over and its primal does not.

    Inside ``shard_map``, a ``w`` replicated over a data axis meets every data shard's
    tokens: its gradient is the sum over them (what autodiff inserts for ``x @ w``).
    """
    extra = tuple(sorted(_varying(jax.typeof(ct)) - _varying(jax.typeof(primal))))
    return lax.psum(ct, extra) if extra else ct


def _narrow_float(a: jax.Array) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4


def _grouped(a: jax.Array, axis: int, groups: int) -> jax.Array:
    """``a`` with ``axis`` split into ``[groups, length / groups]`` (a free reshape)."""
    shape = a.shape
    return a.reshape(shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1 :])


def _ungrouped(a: jax.Array, axis: int) -> jax.Array:
    """The inverse of ``_grouped``: axes ``axis`` and ``axis + 1`` merged."""
    shape = a.shape
    return a.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2 :])


def _group(a: jax.Array | None, axis: int, groups: int) -> jax.Array | None:
    """The view of ``a`` that ``_block`` and ``_put_block`` take: ``a`` itself for one
    group, else ``axis`` split into ``[groups, length / groups]``.

    Made once, outside the loops, for the inputs and for the accumulators the loops
    update in place (a reshape between a loop's update and its buffer can cost a copy).
    """
    return a if a is None or groups == 1 else _grouped(a, axis, groups)


def _ungroup(a: jax.Array | None, axis: int, groups: int) -> jax.Array | None:
    return a if a is None or groups == 1 else _ungrouped(a, axis)


def _block(a: jax.Array | None, start, length: int, axis: int, groups: int) -> jax.Array | None:
    """The block ``(start, length)`` of a ``_group`` view, ``groups * length`` entries along
    ``axis``: entries ``[start, start + length)`` of every group, group by group."""
    if a is None or groups == 1:
        return _rows(a, start, length, axis)
    return _ungrouped(_rows(a, start, length, axis + 1), axis)


def _put_block(a: jax.Array, update: jax.Array, start, axis: int, groups: int) -> jax.Array:
    """A ``_group`` view with the block ``(start, len)`` replaced by ``update`` (in place)."""
    if groups == 1:
        return _put(a, update, start, axis)
    return _put(a, _grouped(update, axis, groups), start, axis + 1)


def _add_block(a: jax.Array, update: jax.Array, start, axis: int, groups: int) -> jax.Array:
    """A ``_group`` view with ``update`` added to its block ``(start, len)`` (in place).

    The sum is formed in the grouped layout: a reshape between the block's slice and
    the update would keep XLA from fusing the slice into the in-place update.
    """
    if groups > 1:
        update, axis = _grouped(update, axis, groups), axis + 1
    return _put(a, _rows(a, start, update.shape[axis], axis) + update, start, axis)


def _rows(a: jax.Array | None, start, length: int, axis: int = 0) -> jax.Array | None:
    """``length`` entries of ``a`` along ``axis`` from ``start`` (static or traced)."""
    if a is None:
        return None
    if isinstance(start, int):
        if start == 0 and length == a.shape[axis]:
            return a
        return lax.slice_in_dim(a, start, start + length, axis=axis)
    take = lambda: lax.dynamic_slice_in_dim(a, start, length, axis)  # noqa: E731
    if not _narrow_float(a):
        return take()
    # XLA:CPU slices a bfloat16/float16 array in float32: it converts the whole array,
    # and inside a loop that conversion of a loop-invariant operand (or of its integer
    # view) is hoisted out and materialised: a full-size copy of ``w``. A slice inside
    # a conditional branch cannot be hoisted, and fuses into a copy of the block.
    shape = a.shape[:axis] + (length,) + a.shape[axis + 1 :]
    in_branch = lambda: lax.cond(start >= 0, take, lambda: jnp.zeros_like(a, shape=shape))  # noqa: E731
    return lax.platform_dependent(cpu=in_branch, default=take)


def _put(a: jax.Array, update: jax.Array, start, axis: int = 0) -> jax.Array:
    """``a`` with ``update`` written from ``start`` along ``axis``, in place.

    A bfloat16/float16 update is written through the arrays' unsigned-integer views:
    XLA:CPU would otherwise convert the whole destination to float32 and back.
    """
    if isinstance(start, int) and start == 0 and update.shape == a.shape:
        return update
    if not _narrow_float(a):
        return lax.dynamic_update_slice_in_dim(a, update, start, axis)
    bits = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
    view = lambda t: lax.bitcast_convert_type(t, bits)  # noqa: E731
    out = lax.dynamic_update_slice_in_dim(view(a), view(update), start, axis)
    return lax.bitcast_convert_type(out, a.dtype)


#: The logit of a padding column, as a fraction of the accumulation dtype's largest value:
#: far below any real logit, and ``m - z`` of it cannot overflow in the smoothing sums.
PADDING_LOGIT = -0.25


class _Inputs(NamedTuple):
    """The flattened operands: x [N, D], w [D, V], optional bias and class weights [V]."""

    x: jax.Array
    w: jax.Array
    bias: jax.Array | None
    labels: jax.Array  # int32 [N]; -1 for a label outside [0, V)
    class_weights: jax.Array | None
    # bool [V]: True on the columns that are classes, False on padding columns (the
    # vocabulary padded to a multiple of the shards; see _logits for what that does).
    # None: every column is a class.
    real_columns: jax.Array | None = None


def _compute_dtype(inp: _Inputs):
    dtypes = [inp.x.dtype, inp.w.dtype] + ([] if inp.bias is None else [inp.bias.dtype])
    return functools.reduce(jnp.promote_types, dtypes)


def _logits(inp: _Inputs, cfg: XentConfig, x_blk, w_blk, b_blk, real_blk=None):
    """One block's logits in the accumulation dtype, soft-capped: ``(z, dz/dlogits)``.

    ``real_blk`` (bool, the block's columns): padding columns are *selected* to a large
    finite negative logit, whatever ``w`` and ``bias`` hold there (``inf`` and ``NaN``
    included): ``exp`` of it is exactly 0, the online sums stay NaN-free (a block of
    padding alone has a finite maximum), and the soft cap's derivative is selected to 0
    there, so ``dloss/dlogits`` is exactly 0 on the padding.
    """
    cdt = _compute_dtype(inp)
    acc = accumulation_dtype(cdt)
    logits = jnp.matmul(x_blk.astype(cdt), w_blk.astype(cdt), preferred_element_type=acc)
    if b_blk is not None:
        logits = logits + b_blk.astype(acc)[None, :]
    dcap = None
    if cfg.soft_cap is not None:
        t = jnp.tanh(logits / cfg.soft_cap)
        logits, dcap = cfg.soft_cap * t, 1 - t * t
    if real_blk is not None:
        real = real_blk[None, :]
        logits = jnp.where(real, logits, jnp.asarray(PADDING_LOGIT * jnp.finfo(acc).max, acc))
        if dcap is not None:
            dcap = jnp.where(real, dcap, jnp.zeros((), acc))
    return logits, dcap


def _real_weights(w_blk: jax.Array, real_blk: jax.Array | None) -> jax.Array:
    """``w_blk`` with its padding columns zeroed, for ``dx = dz @ w.T``.

    ``dz`` is exactly 0 on the padding, but ``0 * inf`` and ``0 * NaN`` are NaN: a padding
    column holding either would spread into every entry of ``dx``. Only when padded and
    ``dx`` is wanted; the select is of a block (or, in the single pass, of ``w``).
    """
    if real_blk is None:
        return w_blk
    return jnp.where(real_blk[None, :], w_blk, jnp.zeros((), w_blk.dtype))


# --------------------------------------------------------------------------------------------
# Forward: online per-token statistics
# --------------------------------------------------------------------------------------------


class _Running(NamedTuple):
    """Per-token running statistics over the vocabulary blocks seen so far, all [N]."""

    m: jax.Array  # running maximum of z
    s: jax.Array  # sum_k exp(z_k - m)
    gap: jax.Array | None  # sum_k w_k (m - z_k), label smoothing only
    z_label: jax.Array  # the label's logit once its block is seen (0 before)


def _init_running(n: int, acc, smoothing: bool) -> _Running:
    zeros = jnp.zeros((n,), acc)
    return _Running(jnp.full((n,), -jnp.inf, acc), zeros, zeros if smoothing else None, zeros)


def _label_column(labels: jax.Array, start, length: int, groups: int, inner: int) -> jax.Array:
    """Each label's column in the vocabulary block ``(start, length)``; outside
    ``[0, groups * length)`` where the block does not hold it (-1 labels included)."""
    if groups == 1:
        return labels - start
    group, offset = labels // inner, labels % inner - start
    here = (labels >= 0) & (offset >= 0) & (offset < length)
    return jnp.where(here, group * length + offset, -1)


def _merge_block(run: _Running, z, index, cw_blk, seen_weight) -> _Running:
    """Folds one logits block ``z`` [n, vb] into ``run``; ``index``: the labels' columns
    in it (``_label_column``)."""
    acc = z.dtype
    m_blk = reduce_rows(jnp.max, lambda z: z, (z,))
    if run.gap is None:
        # One reduction: in pieces for blocks wider than XLA:CPU's fast row length.
        sums = {"s": reduce_rows(jnp.sum, lambda z, m: jnp.exp(z - m), (z,), (m_blk,))}
    else:
        gap = m_blk[:, None] - z
        gap = gap if cw_blk is None else gap * cw_blk[None, :]
        sums = row_sums({"s": jnp.exp(z - m_blk[:, None]), "gap": gap})
    m = jnp.maximum(run.m, m_blk)
    s = run.s * jnp.exp(run.m - m) + sums["s"] * jnp.exp(m_blk - m)
    gap = None
    if run.gap is not None:
        blk_weight = z.shape[-1] if cw_blk is None else jnp.sum(cw_blk)
        # Re-centre both sums on the new maximum: only non-negative terms are added.
        # Before the first block the running maximum is -inf and no weight was seen.
        shift_old = jnp.where(run.m > -jnp.inf, (m - run.m) * seen_weight, jnp.zeros((), acc))
        gap = run.gap + shift_old + sums["gap"] + (m - m_blk) * blk_weight
    # The label's logit: a gather of one element per row (no [n, vb] compare-select).
    here = (index >= 0) & (index < z.shape[-1])
    picked = jnp.take_along_axis(z, jnp.clip(index, 0, z.shape[-1] - 1)[:, None], axis=-1)
    z_label = jnp.where(here, picked[:, 0], run.z_label)
    return _Running(m, s, gap, z_label)


class _Coefficients(NamedTuple):
    """Per-token coefficients of ``dloss/dz = scale * p - label_coef [k=y] - smooth * w_k``.

    ``lse = row_max + lse_rel`` is kept in its two parts: the softmax is computed as
    ``exp((z - row_max) - lse_rel)``, accurate for logits of any magnitude, where
    ``exp(z - lse)`` inherits the rounding of ``lse`` (about 3e-5 relative for float32
    logits near 1000).
    """

    row_max: jax.Array  # the row's largest logit
    lse_rel: jax.Array  # log sum_k exp(z_k - row_max) >= 0
    scale: jax.Array
    label_coef: jax.Array
    smooth: jax.Array | None


def _finish(cfg: XentConfig, run: _Running, labels, valid, num_classes, class_weights, keep):
    """Per-token losses and gradient coefficients from the final running statistics."""
    acc = run.m.dtype
    zero = jnp.zeros((), acc)
    a = cfg.label_smoothing
    lse_rel = jnp.log(run.s)  # lse - m >= 0
    lse = run.m + lse_rel
    if class_weights is None:
        w_label = jnp.ones(labels.shape, acc)
    else:
        w_label = take_classes(class_weights, jnp.where(valid, labels, 0))
    # An out-of-range label has no logit: its loss is NaN, never a plausible number.
    w_label = jnp.where(valid, w_label, jnp.nan)
    label_coef = (1 - a) * w_label
    big_c = label_coef
    loss = jnp.where(label_coef != 0, label_coef * (run.m - run.z_label), zero)
    smooth = None
    if a > 0:
        total_weight = num_classes if class_weights is None else jnp.sum(class_weights)
        smooth = jnp.full(labels.shape, a / num_classes, acc)
        big_c = big_c + smooth * total_weight
        loss = loss + smooth * run.gap
    loss = loss + big_c * lse_rel
    scale = big_c
    if cfg.z_loss > 0:
        loss = loss + cfg.z_loss * lse * lse
        scale = scale + 2 * cfg.z_loss * lse
    if keep is not None:
        # Dropped rows: loss and every coefficient exactly 0 (selected, since an
        # ignore_index label is out of range and its coefficients are NaN).
        loss = jnp.where(keep, loss, zero)
        scale = jnp.where(keep, scale, zero)
        label_coef = jnp.where(keep, label_coef, zero)
        if smooth is not None:
            smooth = jnp.where(keep, smooth, zero)
    return loss, _Coefficients(run.m, lse_rel, scale, label_coef, smooth)


def _statistics(spec: Spec, inp: _Inputs) -> _Running:
    """Per-token running statistics over every vocabulary block (streaming)."""
    cfg = spec.config
    n, v = inp.x.shape[0], inp.w.shape[1]
    tg, vg = spec.token_groups, spec.vocab_groups
    acc = accumulation_dtype(_compute_dtype(inp))
    smoothing = cfg.label_smoothing > 0
    cw = None if inp.class_weights is None else inp.class_weights.astype(acc)
    x, labels = _group(inp.x, 0, tg), _group(inp.labels, 0, tg)
    w = _group(inp.w, 1, vg)
    columns = [_group(a, 0, vg) for a in (inp.bias, cw, inp.real_columns)]

    def vocab_step(v0, vb, carry):
        run, seen_weight = carry
        w_blk = _block(w, v0, vb, 1, vg)
        b_blk, cw_blk, c_blk = (_block(a, v0, vb, 0, vg) for a in columns)

        def token_step(r0, nb, run):
            z, _ = _logits(inp, cfg, _block(x, r0, nb, 0, tg), w_blk, b_blk, c_blk)
            rows = _Running(*(_block(f, r0, nb, 0, tg) for f in run))
            index = _label_column(_block(labels, r0, nb, 0, tg), v0, vb, vg, v // vg)
            rows = _merge_block(rows, z, index, cw_blk, seen_weight)
            updated = zip(run, rows, strict=True)
            return _Running(
                *(None if f is None else _put_block(a, f, r0, 0, tg) for a, f in updated)
            )

        run = _for_blocks(n // tg, spec.token_block // tg, token_step, run)
        if smoothing:
            seen_weight = seen_weight + (vg * vb if cw_blk is None else jnp.sum(cw_blk))
        return run, seen_weight

    run = _Running(*(_group(f, 0, tg) for f in _init_running(n, acc, smoothing)))
    run, _ = _for_blocks(v // vg, spec.vocab_block // vg, vocab_step, (run, jnp.zeros((), acc)))
    return _Running(*(_ungroup(f, 0, tg) for f in run))


def _forward(spec: Spec, inp: _Inputs, keep):
    """Per-token losses [N] and gradient coefficients, streaming over the blocks."""
    acc = accumulation_dtype(_compute_dtype(inp))
    cw = None if inp.class_weights is None else inp.class_weights.astype(acc)
    run = _statistics(spec, inp)
    valid = inp.labels >= 0
    return _finish(spec.config, run, inp.labels, valid, _num_classes(spec, inp), cw, keep)


def _num_classes(spec: Spec, inp: _Inputs) -> int:
    return inp.w.shape[1] if spec.num_classes is None else spec.num_classes


# --------------------------------------------------------------------------------------------
# Gradients: one block's dloss/dlogits and its products
# --------------------------------------------------------------------------------------------


def _dlogits(cfg: XentConfig, z, dcap, coefs: _Coefficients, index, cw_blk):
    """``dloss/dlogits`` of one block, already multiplied by each row's cotangent.

    ``index``: each label's column in the block (``_label_column``)."""
    acc = z.dtype
    zero = jnp.zeros((), acc)
    p = jnp.exp((z - coefs.row_max[:, None]) - coefs.lse_rel[:, None])
    dz = coefs.scale[:, None] * p
    if coefs.smooth is not None:
        w_cols = jnp.ones((1, z.shape[-1]), acc) if cw_blk is None else cw_blk[None, :]
        dz = dz - coefs.smooth[:, None] * w_cols
    # A compare-select inside the elementwise pass that builds the block anyway.
    iota = lax.broadcasted_iota(index.dtype, z.shape, 1)
    is_label = iota == index[:, None]
    dz = dz - jnp.where(is_label, coefs.label_coef[:, None], zero)
    if dcap is not None:
        dz = dz * dcap
    return dz


def _scaled(coefs: _Coefficients, g: jax.Array) -> _Coefficients:
    """Coefficients times each row's cotangent ``g``."""
    smooth = None if coefs.smooth is None else coefs.smooth * g
    return _Coefficients(
        coefs.row_max, coefs.lse_rel, coefs.scale * g, coefs.label_coef * g, smooth
    )


class _Wanted(NamedTuple):
    """Which gradients to compute (static)."""

    x: bool
    w: bool
    bias: bool


def _rows_t(a: jax.Array, start, length: int, groups: int) -> jax.Array:
    """``_block(a, start, length, 0, groups).T``, laid out row-major, for ``x.T @ dz``.

    XLA:CPU runs a bfloat16 matrix product in bfloat16 (YNNPACK) only when its left
    operand is row-major; the transpose of a row-major block is a column-major view,
    so ``x.T @ dz`` would convert both operands to float32 (full copies) and multiply
    in float32, several times slower. A transpose inside a conditional branch is
    materialised row-major instead, block by block (a copy of ``length * D``
    elements, negligible beside the product). Other backends (and wider dtypes)
    take the plain transpose, which their matrix products read directly.
    """
    if not _narrow_float(a):
        return _block(a, start, length, 0, groups).T

    def row_major():
        if isinstance(start, int):
            # The barrier keeps XLA from folding the always-true predicate (and
            # inlining the branch, which would bring back the column-major view).
            pred = lax.optimization_barrier(jnp.bool_(True))
        else:
            pred = start >= 0
        t_shape = (a.shape[-1], groups * length)
        block_t = lambda: _block(a, start, length, 0, groups).T  # noqa: E731
        return lax.cond(pred, block_t, lambda: jnp.zeros_like(a, shape=t_shape))

    return lax.platform_dependent(
        cpu=row_major, default=lambda: _block(a, start, length, 0, groups).T
    )


def _block_grads(inp: _Inputs, dz, xt_blk, w_blk, wanted: _Wanted):
    """``(dz @ w_blk.T, xt_blk @ dz)`` (those wanted), accumulated in ``dz``'s dtype.

    ``dz`` is rounded to the inputs' dtype for the products, as the unfused
    computation's gradient of bfloat16 logits would be.
    """
    cdt = _compute_dtype(inp)
    acc = dz.dtype
    dzc = dz.astype(cdt)
    dx = dw = None
    if wanted.x:
        dims = (((1,), (1,)), ((), ()))
        dx = lax.dot_general(dzc, w_blk.astype(cdt), dims, preferred_element_type=acc)
    if wanted.w:
        dw = jnp.matmul(xt_blk.astype(cdt), dzc, preferred_element_type=acc)
    return dx, dw


def _streaming_grads(spec: Spec, inp: _Inputs, coefs: _Coefficients, wanted: _Wanted):
    """``(dx, dw, dbias)`` of ``sum_n loss_n * g_n`` (``g`` folded into ``coefs``)."""
    cfg = spec.config
    (n, d), v = inp.x.shape, inp.w.shape[1]
    tg, vg = spec.token_groups, spec.vocab_groups
    acc = coefs.lse_rel.dtype
    cw = None if inp.class_weights is None else inp.class_weights.astype(acc)
    x, labels = _group(inp.x, 0, tg), _group(inp.labels, 0, tg)
    coefs = _Coefficients(*(_group(f, 0, tg) for f in coefs))
    w = _group(inp.w, 1, vg)
    columns = [_group(a, 0, vg) for a in (inp.bias, cw, inp.real_columns)]

    def vocab_step(v0, vb, carry):
        dx, dw, db = carry
        w_blk = _block(w, v0, vb, 1, vg)
        b_blk, cw_blk, c_blk = (_block(a, v0, vb, 0, vg) for a in columns)
        w_dx = _real_weights(w_blk, c_blk) if wanted.x else w_blk

        def token_step(r0, nb, inner):
            dx, dw_blk, db_blk = inner
            x_blk = _block(x, r0, nb, 0, tg)
            z, dcap = _logits(inp, cfg, x_blk, w_blk, b_blk, c_blk)
            rows = _Coefficients(*(_block(f, r0, nb, 0, tg) for f in coefs))
            index = _label_column(_block(labels, r0, nb, 0, tg), v0, vb, vg, v // vg)
            dz = _dlogits(cfg, z, dcap, rows, index, cw_blk)
            xt_blk = _rows_t(x, r0, nb, tg) if wanted.w else None
            dx_part, dw_part = _block_grads(inp, dz, xt_blk, w_dx, wanted)
            if wanted.x:
                dx = _add_block(dx, dx_part, r0, 0, tg)
            if wanted.w:
                dw_blk = dw_blk + dw_part
            if wanted.bias:
                db_blk = db_blk + jnp.sum(dz, axis=0)
            return dx, dw_blk, db_blk

        inner = (
            dx,
            jnp.zeros((d, vg * vb), acc) if wanted.w else None,
            jnp.zeros((vg * vb,), acc) if wanted.bias else None,
        )
        dx, dw_blk, db_blk = _for_blocks(n // tg, spec.token_block // tg, token_step, inner)
        if wanted.w:
            dw = _put_block(dw, dw_blk.astype(dw.dtype), v0, 1, vg)
        if wanted.bias:
            db = _put_block(db, db_blk.astype(db.dtype), v0, 0, vg)
        return dx, dw, db

    carry = (
        _group(jnp.zeros((n, d), acc), 0, tg) if wanted.x else None,
        _group(jnp.zeros(inp.w.shape, inp.w.dtype), 1, vg) if wanted.w else None,
        _group(jnp.zeros(inp.bias.shape, inp.bias.dtype), 0, vg) if wanted.bias else None,
    )
    dx, dw, db = _for_blocks(v // vg, spec.vocab_block // vg, vocab_step, carry)
    dx, dw, db = _ungroup(dx, 0, tg), _ungroup(dw, 1, vg), _ungroup(db, 0, vg)
    return (None if dx is None else dx.astype(inp.x.dtype)), dw, db


def _single_pass(spec: Spec, inp: _Inputs, keep, wanted: _Wanted):
    """Sum of the per-token losses and its gradients, one pass over token blocks.

    Every block spans the whole vocabulary, so its softmax is final as soon as its
    logits exist: ``dx`` rows are written per block, ``dw`` and ``dbias`` are summed
    over the blocks in the accumulation dtype. Returns them unscaled, in that dtype.
    """
    cfg = spec.config
    (n, d), v = inp.x.shape, inp.w.shape[1]
    tg = spec.token_groups
    acc = accumulation_dtype(_compute_dtype(inp))
    cw = None if inp.class_weights is None else inp.class_weights.astype(acc)
    smoothing = cfg.label_smoothing > 0
    num_classes = _num_classes(spec, inp)
    x, labels, keep = (_group(a, 0, tg) for a in (inp.x, inp.labels, keep))
    # With padding columns, dx's product needs w with its padding zeroed: a copy of w
    # (loop-invariant, made once), beside the [D, V] float32 accumulator of dw.
    w_dx = _real_weights(inp.w, inp.real_columns) if wanted.x else inp.w

    def token_step(r0, nb, carry):
        total, dx, dw, db = carry
        x_blk = _block(x, r0, nb, 0, tg)
        labels_blk = _block(labels, r0, nb, 0, tg)
        z, dcap = _logits(inp, cfg, x_blk, inp.w, inp.bias, inp.real_columns)
        fresh = _init_running(tg * nb, acc, smoothing)
        run = _merge_block(fresh, z, labels_blk, cw, jnp.zeros((), acc))
        valid = labels_blk >= 0
        keep_blk = _block(keep, r0, nb, 0, tg)
        loss, coefs = _finish(cfg, run, labels_blk, valid, num_classes, cw, keep_blk)
        # The block's maximum behind a barrier: otherwise XLA shares z - max between the
        # sum of exponentials above and the softmax below, and materialises it.
        coefs = coefs._replace(row_max=lax.optimization_barrier(coefs.row_max))
        dz = _dlogits(cfg, z, dcap, coefs, labels_blk, cw)
        xt_blk = _rows_t(x, r0, nb, tg) if wanted.w else None
        dx_part, dw_part = _block_grads(inp, dz, xt_blk, w_dx, wanted)
        if wanted.x:
            dx = _put_block(dx, dx_part, r0, 0, tg)
        if wanted.w:
            dw = dw + dw_part
        if wanted.bias:
            db = db + jnp.sum(dz, axis=0)
        return total + jnp.sum(loss), dx, dw, db

    carry = (
        jnp.zeros((), acc),
        _group(jnp.zeros((n, d), acc), 0, tg) if wanted.x else None,
        jnp.zeros((d, v), acc) if wanted.w else None,
        jnp.zeros((v,), acc) if wanted.bias else None,
    )
    total, dx, dw, db = _for_blocks(n // tg, spec.token_block // tg, token_step, carry)
    return total, _ungroup(dx, 0, tg), dw, db


# --------------------------------------------------------------------------------------------
# custom_vjp wrappers
# --------------------------------------------------------------------------------------------


def _unwrap(args):
    """``(values, perturbed flags)`` of the ``CustomVJPPrimal`` arguments of a fwd rule."""
    is_primal = lambda a: isinstance(a, CustomVJPPrimal)  # noqa: E731
    values = jax.tree.map(lambda a: a.value, args, is_leaf=is_primal)
    perturbed = jax.tree.map(lambda a: a.perturbed, args, is_leaf=is_primal)
    return values, perturbed


def _wanted(inp: _Inputs, perturbed) -> _Wanted:
    px, pw, pb = perturbed[:3]
    return _Wanted(bool(px), bool(pw), inp.bias is not None and bool(pb))


def _zero_cotangents(inp: _Inputs):
    return (
        jnp.zeros_like(inp.x),
        jnp.zeros_like(inp.w),
        None if inp.bias is None else jnp.zeros_like(inp.bias),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(spec, x, w, bias, labels, keep, class_weights, real_columns):
    inp = _Inputs(x, w, bias, labels, class_weights, real_columns)
    return _forward(spec, inp, keep)[0]


def _per_token_fwd(spec, *args):
    values, perturbed = _unwrap(args)
    x, w, bias, labels, keep, class_weights, real_columns = values
    inp = _Inputs(x, w, bias, labels, class_weights, real_columns)
    loss, coefs = _forward(spec, inp, keep)
    return loss, (inp, coefs, _wanted(inp, perturbed))


def _per_token_bwd(spec, res, g):
    inp, coefs, wanted = res
    if isinstance(g, SymbolicZero):
        return (*_zero_cotangents(inp), None, None, None, None)
    dx, dw, db = _streaming_grads(spec, inp, _scaled(coefs, g.astype(coefs.lse_rel.dtype)), wanted)
    return (*_fill(inp, (dx, dw, db)), None, None, None, None)


def _fill(inp: _Inputs, grads):
    """Zeros of the right type for the gradients that were not wanted."""
    primals = (inp.x, inp.w, inp.bias)
    return tuple(
        z if gr is None else _sum_to_type(gr, p)
        for gr, z, p in zip(grads, _zero_cotangents(inp), primals, strict=True)
    )


_per_token.defvjp(_per_token_fwd, _per_token_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _summed(spec, x, w, bias, labels, keep, class_weights, real_columns):
    inp = _Inputs(x, w, bias, labels, class_weights, real_columns)
    return jnp.sum(_forward(spec, inp, keep)[0])


def _summed_fwd(spec, *args):
    values, perturbed = _unwrap(args)
    x, w, bias, labels, keep, class_weights, real_columns = values
    inp = _Inputs(x, w, bias, labels, class_weights, real_columns)
    total, dx, dw, db = _single_pass(spec, inp, keep, _wanted(inp, perturbed))
    return total, (inp, dx, dw, db)


def _summed_bwd(spec, res, g):
    inp, dx, dw, db = res
    if isinstance(g, SymbolicZero):
        return (*_zero_cotangents(inp), None, None, None, None)
    grads = tuple(
        None if gr is None else (g.astype(gr.dtype) * gr).astype(like.dtype)
        for gr, like in zip((dx, dw, db), (inp.x, inp.w, inp.bias), strict=True)
    )
    return (*_fill(inp, grads), None, None, None, None)


_summed.defvjp(_summed_fwd, _summed_bwd, symbolic_zeros=True)


def prepare_labels(labels: jax.Array, num_classes: int) -> jax.Array:
    """int32 labels with every label outside ``[0, num_classes)`` replaced by -1.

    Range is checked in the labels' own dtype, so a wide label cannot wrap into range.
    """
    valid = (labels >= 0) & (labels < num_classes)
    return jnp.where(valid, labels, -1).astype(jnp.int32)


def per_token_loss(
    spec: Spec, x, w, bias, labels, keep, class_weights, real_columns=None
) -> jax.Array:
    """Per-token losses [N] (streaming schedule for the gradients). ``labels`` prepared;
    ``real_columns`` as in ``_Inputs`` (with ``spec.num_classes`` for padding columns)."""
    return _per_token(spec, x, w, bias, labels, keep, class_weights, real_columns)


def summed_loss(
    spec: Spec, x, w, bias, labels, keep, class_weights, real_columns=None
) -> jax.Array:
    """``sum_n loss_n`` with the single-pass schedule (``spec.vocab_block >= V``)."""
    return _summed(spec, x, w, bias, labels, keep, class_weights, real_columns)
