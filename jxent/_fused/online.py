"""The engine's per-block arithmetic, shared by both schedules.

The online statistics (:class:`Running`: the running maximum, the sum of exponentials,
the loss's row sums and picks) and how one logits block is folded into them
(:func:`merge`, re-centring every sum exactly when the maximum moves: :func:`recentred`);
the final per-token numbers (:func:`final`) and the loss's coefficients
(:func:`finish`, :class:`Coefficients`); a second pass's sums of one block
(:func:`second_stats`, :func:`second_sums`); and the backward pass of one block:
``dloss/dlogits`` from the recomputed softmax (:func:`dlogits`)
and its two matrix products (:func:`add_products`).

Internal API: :class:`Running`, :func:`init_running`, :func:`rescale`,
:func:`gap_totals`, :func:`recentred`, :func:`merge`, :class:`Coefficients`,
:func:`final`, :func:`finish`, :func:`second_stats`,
:func:`second_sums`, :func:`dlogits`, :func:`scaled`, :class:`Wanted`,
:func:`block_products`, :func:`product_rows`, :func:`add_products`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jxent import _backend
from jxent._fused import blocks as B
from jxent._fused.contract import (
    FusedLoss,
    Inputs,
    RowSum,
    RowSums,
    Spec,
    View,
    class_count,
    row_scale,
)
from jxent._fused.logits import compute_dtype, round_to_bfloat16
from jxent._fused.plan import Plan
from jxent._softmax import row_sums


class Running(NamedTuple):
    """Per-token running statistics over the vocabulary blocks seen so far, all [N]."""

    m: jax.Array  # running maximum of z
    s: jax.Array  # sum_k exp(z_k - m)
    sums: dict  # name -> the loss's row sum relative to m (and "name/exp" partners)
    picks: dict  # name -> picked value (0 until its block is seen)
    mt: jax.Array | None = None  # with a teacher: the running maximum of its logits t
    st: jax.Array | None = None  # sum_k exp(t_k - mt)


#: The name of the teacher's sum of exponentials among a block's row sums.
_TEACHER_EXP = "/teacher"


def _partner(name: str) -> str:
    """The name of the "exp" sum the engine keeps beside the "exp_gap" sum ``name``."""
    return name + "/exp"


def _sum_names(declared: dict[str, RowSum]) -> list[str]:
    names = []
    for name, spec in declared.items():
        names += [name, _partner(name)] if spec.kind == "exp_gap" else [name]
    return names


def init_running(loss: FusedLoss, n: int, acc, columns, teacher: bool = False) -> Running:
    zeros = jnp.zeros((n,), acc)
    lowest = jnp.full((n,), -jnp.inf, acc)
    return Running(
        lowest,
        zeros,
        {k: zeros for k in _sum_names(loss.row_sums(columns))},
        {k: jnp.zeros((n, *shape), acc) for k, shape in loss.pick_shapes(columns).items()},
        lowest if teacher else None,
        zeros if teacher else None,
    )


def rescale(m_old: jax.Array, m_new: jax.Array) -> jax.Array:
    """``exp(m_old - m_new)``, 0 where nothing was seen (``m_old = -inf``, even when
    ``m_new`` is ``-inf`` too: a teacher row masked so far)."""
    seen = m_old > -jnp.inf
    return jnp.where(seen, jnp.exp(jnp.where(seen, m_old - m_new, 0)), 0)


def _total(c: jax.Array | None, width: int, acc) -> jax.Array:
    """``sum_k c_k`` over a block of ``width`` columns."""
    return jnp.asarray(width, acc) if c is None else jnp.sum(c.astype(acc))


def gap_totals(declared: dict[str, RowSum], width: int, acc) -> dict:
    return {k: _total(s.weights, width, acc) for k, s in declared.items() if s.kind == "gap"}


def _block_terms(declared: dict[str, RowSum], z, m_blk, t=None, mt_blk=None) -> dict:
    """The elementwise terms of a block's row sums, relative to the block's maximum (and,
    with a teacher's block ``t``, the teacher's exponentials relative to its maximum)."""
    gap = m_blk[:, None] - z
    e = jnp.exp(-gap)
    terms = {"": e}
    if t is not None:
        # A row of the teacher masked to -inf has no finite maximum: its terms are 0.
        e_t = jnp.exp(t - jnp.where(mt_blk > -jnp.inf, mt_blk, 0)[:, None])
        terms[_TEACHER_EXP] = e_t
    for name, spec in declared.items():
        c = None if spec.weights is None else spec.weights[None, :]
        weighted = (lambda a: a) if c is None else (lambda a, c=c: a * c)
        r = spec.power
        e_r = e if r == 1 else jnp.exp(-r * gap)
        if spec.kind == "gap":
            terms[name] = weighted(gap)
        elif spec.kind == "exp":
            terms[name] = weighted(e_r)
        elif spec.kind == "exp_gap":
            terms[name] = weighted(e_r * (gap if r == 1 else r * gap))
            terms[_partner(name)] = weighted(e_r)
        elif spec.kind == "cross" and t is not None:
            # 0 * inf never forms: a class the teacher masks (t = -inf) adds 0, one the
            # student masks where the teacher does not adds +inf (the divergence is).
            zero = jnp.zeros((), z.dtype)
            terms[name] = weighted(jnp.where(e_t > 0, e_t * (t - z), zero))
        else:
            raise ValueError(f"unknown kind of row sum {spec.kind!r} for {name!r}")
    return terms


def recentred(
    declared: dict[str, RowSum], sums: dict, m_old, m_new, totals: dict, teacher_scale=None
) -> dict:
    """Row sums relative to ``m_old`` made relative to ``m_new >= m_old``, exactly (only
    non-negative terms are added). Where ``m_old`` is ``-inf`` nothing was seen (every
    sum is 0) and 0 is kept, without forming ``inf * 0``. A cross sum is relative to the
    teacher's maximum: ``teacher_scale`` is ``exp`` of its move."""
    seen = m_old > -jnp.inf
    d = jnp.where(seen, m_new - m_old, jnp.zeros((), m_new.dtype))
    out = {}
    for name, spec in declared.items():
        r = spec.power
        scale = jnp.exp(r * (m_old - m_new))
        if spec.kind == "gap":
            out[name] = sums[name] + d * totals[name]
        elif spec.kind == "exp":
            out[name] = sums[name] * scale
        elif spec.kind == "cross":
            out[name] = sums[name] * teacher_scale
        else:
            e = sums[_partner(name)]
            out[name] = (sums[name] + (d if r == 1 else r * d) * e) * scale
            out[_partner(name)] = e * scale
    return out


def merge(loss: FusedLoss, run: Running, z, view: View, seen: dict) -> Running:
    """Folds one logits block ``z [n, vb]`` into ``run``; ``seen``: each gap sum's total
    weight of the blocks already folded."""
    acc = z.dtype
    m_blk = _backend.reduce_rows(jnp.max, lambda z: z, (z,))
    declared = loss.row_sums(view.columns)
    t = view.teacher
    mt_blk = mt = old_t = new_t = st = None
    if t is not None:
        mt_blk = _backend.reduce_rows(jnp.max, lambda t: t, (t,))
    if not declared and t is None:
        # One reduction: in pieces for blocks wider than XLA:CPU's fast row length.
        s_blk = _backend.reduce_rows(jnp.sum, lambda z, m: jnp.exp(z - m), (z,), (m_blk,))
        sums_blk = {}
    else:
        # Every sum in one variadic reduction: the block is read once.
        sums_blk = row_sums(_block_terms(declared, z, m_blk, t, mt_blk))
        s_blk = sums_blk.pop("")
    if t is not None:
        mt = jnp.maximum(run.mt, mt_blk)
        old_t, new_t = rescale(run.mt, mt), rescale(mt_blk, mt)
        st = run.st * old_t + sums_blk.pop(_TEACHER_EXP) * new_t
    m = jnp.maximum(run.m, m_blk)
    s = run.s * jnp.exp(run.m - m) + s_blk * jnp.exp(m_blk - m)
    old = recentred(declared, run.sums, run.m, m, seen, old_t)
    totals = gap_totals(declared, z.shape[-1], acc)
    new = recentred(declared, sums_blk, m_blk, m, totals, new_t)
    sums = {k: old[k] + new[k] for k in old}
    picks = {k: run.picks[k] + v for k, v in loss.picks(z, view).items()}
    return Running(m, s, sums, picks, mt, st)


class Coefficients(NamedTuple):
    """Per-token coefficients of the backward pass: the softmax's row statistics (as
    ``lse = row_max + lse_rel``, so that ``exp((z - row_max) - lse_rel)`` is accurate for
    logits of any magnitude) and the loss's own, which scale with the cotangent."""

    row_max: jax.Array
    lse_rel: jax.Array
    loss: Any
    fixed: Any = None  # the loss's unscaled numbers (View.fixed)
    # Gradient filtering's numbers from the forward pass (filtering.Ahead), or None.
    ahead: Any = None


def final(run: Running, totals: dict) -> RowSums:
    """The first pass's per-token numbers for ``finish`` (or a second pass)."""
    lse_rel = jnp.log(run.s)  # lse - m >= 0
    lse_t = None if run.st is None else jnp.log(run.st)
    return RowSums(run.m, lse_rel, run.sums, totals, run.picks, run.mt, lse_t)


def finish(spec: Spec, inp: Inputs, sums: RowSums, rows):
    loss, coefs, *fixed = spec.loss.finish(sums, rows, class_count(spec, inp))
    return loss, Coefficients(sums.row_max, sums.lse_rel, coefs, fixed[0] if fixed else None)


def second_stats(loss: FusedLoss, sums: RowSums, rows):
    """``(stats, names)`` of the loss's second pass: the softmax's final statistics with
    ``SecondPass.fixed`` as ``fixed``, and the row sums' names; ``(None, ())`` without."""
    second = getattr(loss, "second_pass", lambda sums, rows: None)(sums, rows)
    if second is None:
        return None, ()
    return Coefficients(sums.row_max, sums.lse_rel, None, second.fixed), second.names


def _log_softmax(z, stats: Coefficients):
    """``log softmax(z)`` of a block from the row's final statistics (numerical rule 1)."""
    return (z - stats.row_max[:, None]) - stats.lse_rel[:, None]


def second_sums(loss: FusedLoss, z, view: View, stats: Coefficients, real_blk) -> dict:
    """One block's share of the second pass's row sums (``[n]`` each)."""
    log_p = _log_softmax(z, stats)
    terms = loss.second_terms(jnp.exp(log_p), log_p, view._replace(fixed=stats.fixed))
    if real_blk is not None:
        zero = jnp.zeros((), z.dtype)
        terms = {k: jnp.where(real_blk[None, :], a, zero) for k, a in terms.items()}
    return row_sums(terms)


def dlogits(spec: Spec, z, dcap, coefs: Coefficients, view: View, real_blk=None):
    log_p = _log_softmax(z, coefs)
    dz = spec.loss.dlogits(jnp.exp(log_p), log_p, coefs.loss, view._replace(fixed=coefs.fixed))
    dz = dz if dcap is None else dz * dcap
    if real_blk is not None:
        # A NaN token's coefficients (a label that is not a class) times p = 0 would make
        # the padding's gradient NaN: it is exactly 0 whatever the token.
        dz = jnp.where(real_blk[None, :], dz, jnp.zeros((), dz.dtype))
    return dz


def scaled(coefs: Coefficients, g) -> Coefficients:
    """Coefficients times each row's cotangent ``g`` (a tuple of them for a loss with
    several outputs, each scaling its own coefficients; a symbolic zero drops them)."""
    if not isinstance(g, tuple):
        return coefs._replace(loss=jax.tree.map(lambda c: c * row_scale(g, c), coefs.loss))
    acc = coefs.lse_rel.dtype

    def times(part, gi):
        if isinstance(gi, SymbolicZero):
            return jax.tree.map(jnp.zeros_like, part)
        return jax.tree.map(lambda c: c * row_scale(gi.astype(acc), c), part)

    scaled = tuple(times(part, gi) for part, gi in zip(coefs.loss, g, strict=True))
    return coefs._replace(loss=scaled)


class Wanted(NamedTuple):
    """Which gradients to compute (static)."""

    x: bool
    w: bool
    bias: bool


def block_products(plan: Plan, inp: Inputs, dz, xt_blk, w_blk, wanted: Wanted, ax: int):
    """``(dz @ w_blk.T, xt_blk @ dz)`` (those wanted), accumulated in ``dz``'s dtype; with
    ``w`` as ``[V, D]`` (``ax = 0``): ``(dz @ w_blk, dz.T @ x_blk)``, ``xt_blk`` then
    being the block of ``x`` itself.

    ``dz`` is rounded to the inputs' dtype for the products, as the unfused
    computation's gradient of bfloat16 logits would be.
    """
    cdt = compute_dtype(inp.x, inp.w, inp.bias)
    acc = dz.dtype
    dzc = dz.astype(cdt)
    w_blk = w_blk.astype(cdt)
    if plan.bfloat16_blocks and cdt == jnp.float32:
        # One bfloat16 pass, as XLA:TPU's default precision, without its copy of w.
        dzc, w_blk = dzc.astype(jnp.bfloat16), round_to_bfloat16(w_blk)
        cdt = jnp.bfloat16
    dx = dw = None
    if wanted.x:
        dims = (((1,), (ax,)), ((), ()))
        dx = lax.dot_general(
            dzc, w_blk.astype(cdt), dims, precision=plan.precision, preferred_element_type=acc
        )
    if wanted.w and ax == 1:
        dw = jnp.matmul(
            xt_blk.astype(cdt), dzc, precision=plan.precision, preferred_element_type=acc
        )
    elif wanted.w:
        dims = (((0,), (0,)), ((), ()))
        # dz first here: a caller's pair (x's, then the other operand's) swapped to match.
        pair = isinstance(plan.precision, tuple)
        precision = plan.precision[::-1] if pair else plan.precision
        dw = lax.dot_general(
            dzc, xt_blk.astype(cdt), dims, precision=precision, preferred_element_type=acc
        )
    return dx, dw


def product_rows(x, rows_blk, wanted: Wanted, ax: int):
    """The token block ``rows_blk = (start, length, groups)`` of ``x`` as
    :func:`block_products` takes it (transposed for ``w`` as ``[D, V]``), or None when
    ``dw`` is not wanted."""
    if not wanted.w:
        return None
    start, length, groups = rows_blk
    if ax == 1:
        return B.transposed_block(x, start, length, groups)
    return B.block(x, start, length, 0, groups)


def add_products(
    plan: Plan, inp: Inputs, x, rows_blk, dz, w_blk, wanted: Wanted, grads, write_dx, ax
):
    """``grads = (dx, dw, db)`` plus one block's products: ``dz @ w_blk.T`` written into
    ``dx``'s rows of the token block ``rows_blk = (start, length, groups)`` with
    ``write_dx`` (added, or put when the block's rows are final), ``x_blk.T @ dz`` added to
    ``dw`` and ``dz``'s column sums to ``db``."""
    dx, dw, db = grads
    start, length, groups = rows_blk
    xt_blk = product_rows(x, rows_blk, wanted, ax)
    dx_part, dw_part = block_products(plan, inp, dz, xt_blk, w_blk, wanted, ax)
    if wanted.x:
        dx = write_dx(dx, dx_part, start, 0, groups)
    if wanted.w:
        dw = dw + dw_part
    if wanted.bias:
        db = db + jnp.sum(dz, axis=0)
    return dx, dw, db
