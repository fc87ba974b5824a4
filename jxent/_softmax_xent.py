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

The row sums, the logits helpers (soft cap, masks, gathers) and the rows' finish
(:func:`~jxent._softmax.finish_rows`, :class:`~jxent._softmax.RowStats`) come from
``jxent._softmax``; backend-specific forms (the row reductions in pieces, the fusion
barrier) from ``jxent._backend``; the layout and the static options
(:class:`~jxent._layout.XentConfig`) from ``jxent._layout``.

Internal API (``jxent._categorical`` builds on it; users call the public functions
instead): :func:`softmax_xent`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _backend
from jxent._layout import XentConfig, flatten_classes
from jxent._softmax import (
    SHORT_ROW,
    RowStats,
    cap_derivative,
    cap_logits,
    finish_rows,
    finite_parts,
    gather_last,
    log_softmax_from_stats,
    mask_logits,
    row_sums,
    short_row_sums,
    take_along_last,
    take_classes,
)
from jxent._validation import accumulation_dtype

_DEFAULT_CONFIG = XentConfig()


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


def _all_finite(row_sums: jax.Array, short: bool) -> jax.Array:
    """Whether every row's sum of non-negative terms is finite (no -inf or NaN logit).

    For short rows a NaN-propagating max: on XLA:CPU it is one kernel where
    ``all(isfinite(.))`` is three, a fifth of the step at 256 x 10. For long rows XLA:CPU
    fuses that max with the sums' own pass and keeps a [rows, classes] float32 buffer (as
    it does for ``isfinite(sum(.))``), so they take ``all(isfinite(.))``
    (tests/test_categorical.py::test_compiled_temp_memory).
    """
    if short:
        return jnp.isfinite(jnp.max(row_sums, initial=0.0))
    return jnp.all(jnp.isfinite(row_sums))


def _smoothing_sums(x, row_max, class_weights, exp_term, short, masked_smoothing_sums):
    """The sum of exponentials and ``(n, sum_k w_k, sum_k w_k (max - x_k) / 2)`` over the
    finite classes of each row, and whether every logit of the batch is finite.

    The common case, every logit finite, needs one sum of ``w_k (max - x_k) / 2``: a sum
    of non-negative terms, exact to a few ulps for logits of any offset (the shorter
    ``max * sum(w) - x @ w`` cancels: 5e-5 relative error at an offset of 1e4). A batch
    with any ``-inf`` (or overflowing) logit makes that sum non-finite and takes the
    masked path instead; under ``vmap`` the ``cond`` becomes a select and both paths run.

    Short rows take both sums in one plain variadic reduction; on XLA:CPU (jax 0.10.2)
    a third output (the count of finite classes) costs a fifth of the whole step at 256 x
    10. Longer rows take them as separate reductions, each blocked and vectorised.
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
    # Halved so that a sum of gaps near the float32 maximum does not overflow.
    if short:
        sums = short_row_sums(
            {"sum_exp": exp_term(x, row_max[..., None]), "gap": term(*arrays, row_max[..., None])}
        )
        gap_sum = sums.pop("gap")
    else:
        sums = {"sum_exp": _backend.reduce_rows(jnp.sum, exp_term, (x,), (row_max,))}
        # The barrier keeps XLA:CPU from sharing the float32 conversion of bfloat16 logits
        # between this sum and the sum of exponentials (a shared conversion is materialised).
        arrays = (_backend.cpu_barrier(arrays[0]),) + arrays[1:]
        gap_sum = _backend.reduce_rows(jnp.sum, term, arrays, (row_max,))

    def unmasked_sums():
        # Built from the sum over x so both branches have its type, sharding included
        # (and, inside shard_map, the same varying mesh axes).
        n = jnp.full_like(gap_sum, x.shape[-1])
        return n, jnp.zeros_like(gap_sum) + sum_w, gap_sum

    ok = _all_finite(gap_sum, short)
    n, sum_w, w_gap = lax.cond(ok, unmasked_sums, masked_smoothing_sums)
    return {**sums, "n": n, "w": sum_w, "w_gap": w_gap}, ok


def _dense_sums(x, targets, row_max, exp_term, dense_terms, acc, short):
    """The dense target's row sums without a class mask (no label smoothing).

    On XLA:CPU a variadic reduction runs as a scalar loop (jax 0.10.2: four sums at
    1024x1000 float32 in 4.4 ms, 0.8 ms as four single reductions), so there the sums
    are separate single reductions, each vectorised and accurate to about an ulp; short
    rows take three in one plain variadic reduction (the fourth, the target on ``-inf``
    logits, cost a third of the step at 256x10). The common case, every logit finite,
    needs no mask: ``t (max - z) / 2`` is then finite, and a batch with a ``-inf`` (or
    NaN) logit makes its sum non-finite and takes the masked variadic path instead (the
    one other platforms take).
    """
    sum_rows = short_row_sums if short else row_sums

    def masked():
        # Converted inside the branch: a converted copy passed into the cond is materialised.
        z = x.astype(acc)
        return sum_rows({"sum_exp": exp_term(x, row_max[..., None]), **dense_terms(z)})

    def gap(x, t, m):
        return t.astype(acc) * (0.5 * m - 0.5 * x.astype(acc))

    def separate():
        if short:
            m = row_max[..., None]
            sums = short_row_sums(
                {"sum_exp": exp_term(x, m), "t": targets.astype(acc), "t_gap": gap(x, targets, m)}
            )
        else:
            sums = {"sum_exp": _backend.reduce_rows(jnp.sum, exp_term, (x,), (row_max,))}
            # Each sum converts a 16-bit x or t itself: a conversion shared with another
            # pass (the other sum, poly-1's) is materialised.
            sums["t"] = _backend.reduce_rows(
                jnp.sum, lambda t: t.astype(acc), (_backend.cpu_barrier(targets),)
            )
            sums["t_gap"] = _backend.reduce_rows(
                jnp.sum, gap, _backend.cpu_barrier((x, targets)), (row_max,)
            )
        ok = _all_finite(sums["t_gap"], short)

        def unmasked():
            return {**sums, "t_on_inf": jnp.zeros_like(sums["t_gap"])}

        return lax.cond(ok, unmasked, masked)

    if not _backend.single_device():
        # Under GSPMD the cond's branches keep a [rows, V_local] float32 buffer per device
        # (tests/parallel_checks.py's HLO check): several devices take the masked path.
        return masked(), None
    return _backend.on_cpu(separate, masked), None


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

    def exp_term(x, m):
        return jnp.exp(cap_logits(x, cfg.soft_cap, acc) - m)

    exp_shifted = exp_term(x, row_max[..., None])
    if class_mask is not None:
        exp_shifted = jnp.where(class_mask, exp_shifted, zero)
    terms = {"sum_exp": exp_shifted}
    short = x.shape[-1] <= SHORT_ROW  # every sum in one plain pass, masked forms included

    def finite_and_half_gap(z=z):
        finite, z_floor = finite_parts(z)
        if class_mask is not None:
            finite = jnp.where(class_mask, finite, zero)
        # (max - z) / 2 on finite classes: >= 0, never overflows, and 0 * it is 0 on -inf.
        return finite, finite * (0.5 * row_max[..., None] - 0.5 * z_floor)

    def dense_terms(z):
        finite, gaps = finite_and_half_gap(z)
        t = targets.astype(acc)
        if class_mask is not None:
            t = jnp.where(class_mask, t, zero)
        return {"t": t, "t_gap": t * gaps, "t_on_inf": t * (1 - finite)}

    if labels is None:
        terms.update(dense_terms(z))
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
            sums = short_row_sums(terms) if short else row_sums(terms)
        else:

            def masked_smoothing_sums():
                # Converted here, inside the branch: a converted copy of x passed into
                # the cond would be materialised.
                s = row_sums(smoothing_terms(cap_logits(x, cfg.soft_cap, acc)), blocked=False)
                return s["n"], s["w"], s["w_gap"]

            sums, all_finite = _smoothing_sums(
                x, row_max, class_weights, exp_term, short, masked_smoothing_sums
            )
    elif labels is None and class_mask is None and cfg.soft_cap is None:
        sums, all_finite = _dense_sums(x, targets, row_max, exp_term, dense_terms, acc, short)
    elif short:
        sums = short_row_sums(terms)
    elif labels is not None and class_mask is None:
        # The common case: one reduction, cut into pieces for long rows on CPU.
        sums = {"sum_exp": _backend.reduce_rows(jnp.sum, exp_term, (x,), (row_max,))}
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
    x = mask_logits(x, class_mask)
    acc = stats.lse_rel.dtype
    zero = jnp.zeros((), acc)

    # The gradient is factor * exp(z - max) - c with factor = scale / sum exp(z - max), a
    # per-row number (exp(z - max) times a factor is more accurate than exp(z - max -
    # log sum) for small probabilities: no rounded log-sum in the exponent). The tangent
    # is written as factor * sum(e x_dot) - sum(c x_dot), so that the transposed pass reads
    # three per-row numbers (max, and the cotangent times factor and times c's row
    # coefficient). exp(z - max) is the forward pass's own expression: for 32/64-bit
    # logits the checkpoint lets XLA share it (see _xent_jvp).
    factor = stats.scale * jnp.exp(-stats.lse_rel)  # 0 where scale is 0: only -c is left
    z = cap_logits(x, cfg.soft_cap, acc)
    e = jnp.exp(z - stats.row_max[..., None])  # 0 on -inf logits
    if class_mask is not None:
        e = jnp.where(class_mask, e, zero)
    dz = cap_derivative(x, cfg.soft_cap, acc)
    x_dot = x_dot.astype(acc)
    if dz is not None:
        x_dot = x_dot * dz
    out = factor * jnp.sum(e * x_dot, axis=-1)
    coef = None  # c without the label's term, as [..., K] or None
    if labels is None:
        t = targets.astype(acc)
        if class_mask is not None:
            t = jnp.where(class_mask, t, zero)
        coef = (1 - cfg.label_smoothing) * t
    if stats.smooth_coef is not None:
        smooth = stats.smooth_coef[..., None]
        if class_weights is not None:
            smooth = smooth * jnp.expand_dims(class_weights.astype(acc), tuple(range(x.ndim - 1)))
        # No smoothing mass on -inf logits. all_finite is one flag for the whole batch:
        # the select then costs nothing in the common case (the loop is unswitched).
        finite = _class_mask(x, class_mask)
        if stats.all_finite is not None:
            finite = stats.all_finite | finite
        smooth = jnp.where(finite, smooth, zero)
        coef = smooth if coef is None else coef + smooth
    # XLA:CPU upcasts a scatter into a 16-bit gradient to float32 (a full copy), so
    # for bfloat16/float16 the label's term is a compare-select in the same
    # elementwise pass instead; so it is for short rows, where that compare costs less
    # than the scatter's own kernels (three on XLA:CPU).
    label_in_pass = labels is not None and (x.dtype.itemsize < 4 or x.shape[-1] <= SHORT_ROW)
    if label_in_pass:
        # Laid out like x: an iota with no sharding would not match an explicitly sharded x.
        sharding = jax.typeof(x).sharding if _class_axis_sharded(x) else None
        iota = lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1, out_sharding=sharding)
        label = jnp.where(iota == labels[..., None], stats.label_coef[..., None], zero)
        coef = label if coef is None else coef + label
    if coef is not None:
        out = out - jnp.sum(coef * x_dot, axis=-1)
    if labels is not None and not label_in_pass:
        index = jnp.clip(labels, 0, x.shape[-1] - 1)
        # x_dot is already times the soft cap's derivative.
        out = out - stats.label_coef * _take_last(take_along_last, x_dot, index)
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
    # The exponentials of a 16-bit x are not shared: a float32 copy would be materialised;
    # nor over several devices, where GSPMD keeps them as a [rows, V_local] temporary
    # (tests/parallel_checks.py's HLO check).
    share = jnp.dtype(x.dtype).itemsize >= 4 and _backend.single_device()
    tangent = jax.checkpoint(functools.partial(_tangent, cfg), prevent_cse=not share)(
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
