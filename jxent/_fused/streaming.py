"""The streaming schedule (Cut Cross-Entropy's): vocabulary blocks narrower than the
vocabulary.

The forward pass folds every block into the online statistics (vocabulary blocks
outer, token blocks inner) and saves only the per-token numbers; the backward pass
recomputes each block's logits, forms its ``dloss/dlogits``, adds ``dz @ w_blk.T`` to
a float32 ``dx`` and, once all token blocks of a vocabulary block are done, writes
that block's ``dw`` columns in place. Four matrix products of the size of ``x @ w`` in
all (five with a second pass, which makes every block again once the first pass's
numbers are final). With gradient filtering, for a loss of the softmax form, the forward
pass also records what decides each block's filtering (``filtering.Ahead``), so that a
skipped block's logits are not made again.

**Vocabulary-parallel** (``Spec.axis_name``, inside ``shard_map`` with ``w`` split
over its columns): each shard runs the forward pass on its columns, then one ``pmax``
of ``m`` and one ``psum`` of the re-centred per-token numbers (and of the gap totals)
give every shard the whole vocabulary's (a second pass's sums: one more ``psum``); the
backward pass is each shard's own, with ``dx`` summed over the shards
(``_rules.sum_to_type``, in :mod:`jxent._fused.rules`).

Internal API: :func:`forward`, :func:`backward`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jxent._fused import blocks as B
from jxent._fused import filtering, online
from jxent._fused import logits as L
from jxent._fused.contract import (
    Inputs,
    RowSums,
    Spec,
    View,
    accumulation,
    num_columns,
    vocab_axis,
)
from jxent._fused.plan import Plan


def _view(inp_rows, columns, start, width, groups, group_length, teacher=None) -> View:
    return View(inp_rows, columns, start, width, groups, group_length, teacher=teacher)


def _sweep(spec: Spec, plan: Plan, inp: Inputs, state, fold, seen: dict, const=None):
    """``state`` (a pytree of per-token ``[N, ...]`` numbers) folded over every block of the
    logits, vocabulary blocks outer: ``fold(sub, z, view, seen, real_blk, const_blk)``
    gives a token block's numbers from its previous ones ``sub``, the block's logits
    ``z`` and view (with the teacher's block), each gap sum's total weight ``seen`` over
    the vocabulary blocks already folded, the block's padding mask and the token block's
    share of ``const`` (per-token constants). Returns ``(state, seen)`` after the last."""
    loss = spec.loss
    n, v, ax = inp.x.shape[0], num_columns(spec, inp), vocab_axis(spec)
    tg, vg = plan.token_groups, plan.vocab_groups
    acc = accumulation(inp)
    x, rows = B.group(inp.x, 0, tg), jax.tree.map(lambda a: B.group(a, 0, tg), inp.rows)
    w = B.group(inp.w, ax, vg)
    bias, real = (B.group(a, 0, vg) for a in (inp.bias, inp.real_columns))
    columns = jax.tree.map(lambda a: B.group(a, 0, vg), inp.columns)
    teacher = L.grouped_teacher(spec, plan, inp.teacher)
    const = jax.tree.map(lambda f: B.group(f, 0, tg), const)

    def vocab_step(v0, vb, carry):
        state, seen = carry
        w_blk = B.block(w, v0, vb, ax, vg)
        b_blk, c_blk = (B.block(a, v0, vb, 0, vg) for a in (bias, real))
        cols = jax.tree.map(lambda a: B.block(a, v0, vb, 0, vg), columns)
        t_cols = L.teacher_columns(spec, teacher, v0, vb, vg)

        def token_step(r0, nb, state):
            z, _ = L.block_logits(spec, plan, B.block(x, r0, nb, 0, tg), w_blk, b_blk, c_blk)
            t = L.teacher_logits(spec, plan, t_cols, r0, nb, tg, c_blk)
            sub, const_blk, rows_blk = (
                jax.tree.map(lambda f: B.block(f, r0, nb, 0, tg), a) for a in (state, const, rows)
            )
            view = _view(rows_blk, cols, v0, vb, vg, v // vg, t)
            sub = fold(sub, z, view, seen, c_blk, const_blk)
            return jax.tree.map(lambda a, f: B.put_block(a, f, r0, 0, tg), state, sub)

        state = B.for_blocks(n // tg, plan.token_block // tg, token_step, state)
        if seen:
            blk_totals = online.gap_totals(loss.row_sums(cols), vg * vb, acc)
            seen = {k: seen[k] + blk_totals[k] for k in seen}
        return state, seen

    state = jax.tree.map(lambda f: B.group(f, 0, tg), state)
    state, seen = B.for_blocks(v // vg, plan.vocab_block // vg, vocab_step, (state, seen))
    return jax.tree.map(lambda f: B.ungroup(f, 0, tg), state), seen


def _statistics(spec: Spec, plan: Plan, inp: Inputs):
    """Per-token running statistics over every vocabulary block (streaming), each gap's
    total weight, and what gradient filtering decides ahead from (``filtering.Ahead``,
    or None)."""
    loss, acc = spec.loss, accumulation(inp)
    run = online.init_running(loss, inp.x.shape[0], acc, inp.columns, inp.teacher is not None)
    seen = {k: jnp.zeros((), acc) for k in online.gap_totals(loss.row_sums(inp.columns), 1, acc)}
    if not filtering.ahead(spec):
        fold = lambda sub, z, view, seen, real_blk, const_blk: online.merge(  # noqa: E731
            loss, sub, z, view, seen
        )
        run, seen = _sweep(spec, plan, inp, run, fold, seen)
        return run, seen, None
    v, size = num_columns(spec, inp), plan.vocab_block // plan.vocab_groups
    whole = _view(inp.rows, inp.columns, 0, v, 1, v)
    rec = filtering.init_ahead(spec, inp, whole, v, acc)

    def fold_ahead(sub, z, view, seen, real_blk, const_blk):
        run, rec = sub
        run = online.merge(loss, run, z, view, seen)
        return run, filtering.record(spec, rec, z, view, run.m, view.start // size)

    (run, rec), seen = _sweep(spec, plan, inp, (run, rec), fold_ahead, seen)
    return run, seen, rec


def _combine(spec: Spec, inp: Inputs, run: online.Running, totals: dict):
    """The whole vocabulary's per-token numbers from every shard's (``spec.axis_name``).

    Every shard holds at least one real class, so every local maximum is finite."""
    if spec.axis_name is None:
        return run, totals
    m = lax.pmax(run.m, spec.axis_name)
    mt = t_scale = None
    if run.mt is not None:
        mt = lax.pmax(run.mt, spec.axis_name)
        t_scale = online.rescale(run.mt, mt)
    declared = spec.loss.row_sums(inp.columns)
    sums = online.recentred(declared, run.sums, run.m, m, totals, t_scale)
    st = None if run.st is None else run.st * t_scale
    s, sums, picks, totals, st = lax.psum(
        (run.s * jnp.exp(run.m - m), sums, run.picks, totals, st), spec.axis_name
    )
    return online.Running(m, s, sums, picks, mt, st), totals


def _second_pass(spec: Spec, plan: Plan, inp: Inputs, sums: RowSums) -> RowSums:
    """``sums`` with the second pass's row sums (every block made again, streaming; summed
    over the shards of ``spec.axis_name``), or as they are for a loss without one."""
    stats, names = online.second_stats(spec.loss, sums, inp.rows)
    if stats is None:
        return sums

    def fold(sub, z, view, seen, real_blk, stats_blk):
        add = online.second_sums(spec.loss, z, view, stats_blk, real_blk)
        return {k: sub[k] + add[k] for k in sub}

    zeros = {k: jnp.zeros_like(sums.lse_rel) for k in names}
    second, _ = _sweep(spec, plan, inp, zeros, fold, {}, stats)
    if spec.axis_name is not None:
        second = lax.psum(second, spec.axis_name)
    return sums._replace(second=second)


def forward(spec: Spec, plan: Plan, inp: Inputs):
    """Per-token losses [N] and gradient coefficients, streaming over the blocks."""
    run, totals, rec = _statistics(spec, plan, inp)
    sums = _second_pass(spec, plan, inp, online.final(*_combine(spec, inp, run, totals)))
    loss, coefs = online.finish(spec, inp, sums, inp.rows)
    return loss, coefs._replace(ahead=rec)


def backward(
    spec: Spec, plan: Plan, inp: Inputs, coefs: online.Coefficients, wanted: online.Wanted
):
    """``(dx, dw, dbias)`` of ``sum_n loss_n * g_n`` (``g`` folded into ``coefs``)."""
    (n, d), v, ax = inp.x.shape, num_columns(spec, inp), vocab_axis(spec)
    tg, vg = plan.token_groups, plan.vocab_groups
    acc = coefs.lse_rel.dtype
    x, rows = B.group(inp.x, 0, tg), jax.tree.map(lambda a: B.group(a, 0, tg), inp.rows)
    coefs = jax.tree.map(lambda f: B.group(f, 0, tg), coefs)
    w = B.group(inp.w, ax, vg)
    bias, real = (B.group(a, 0, vg) for a in (inp.bias, inp.real_columns))
    columns = jax.tree.map(lambda a: B.group(a, 0, vg), inp.columns)
    teacher = L.grouped_teacher(spec, plan, inp.teacher)
    total = v if spec.axis_name is None else v * lax.psum(1, spec.axis_name)
    ahead, size = filtering.ahead(spec), plan.vocab_block // vg

    def vocab_step(v0, vb, carry):
        dx, dw, db = carry
        w_blk = B.block(w, v0, vb, ax, vg)
        b_blk, c_blk = (B.block(a, v0, vb, 0, vg) for a in (bias, real))
        cols = jax.tree.map(lambda a: B.block(a, v0, vb, 0, vg), columns)
        w_dx = L.real_weights(w_blk, c_blk, ax) if wanted.x else w_blk
        t_cols = L.teacher_columns(spec, teacher, v0, vb, vg)

        def token_step(r0, nb, inner):
            sub = jax.tree.map(lambda f: B.block(f, r0, nb, 0, tg), coefs)
            rows_blk = jax.tree.map(lambda a: B.block(a, r0, nb, 0, tg), rows)
            view = _view(rows_blk, cols, v0, vb, vg, v // vg)

            def make_dz():
                z, dcap = L.block_logits(spec, plan, B.block(x, r0, nb, 0, tg), w_blk, b_blk, c_blk)
                t = L.teacher_logits(spec, plan, t_cols, r0, nb, tg, c_blk)
                return online.dlogits(spec, z, dcap, sub, view._replace(teacher=t), c_blk)

            if ahead:
                return filtering.products_ahead(
                    spec, plan, inp, x, (r0, nb, tg), make_dz, w_dx, wanted, inner, B.add_block,
                    ax, view, sub, total, v0 // size,
                )  # fmt: skip
            return filtering.add_products(
                spec, plan, inp, x, (r0, nb, tg), make_dz(), w_dx, wanted, inner, B.add_block,
                ax, view, sub, total,
            )  # fmt: skip

        inner = (
            dx,
            jnp.zeros((d, vg * vb) if ax == 1 else (vg * vb, d), acc) if wanted.w else None,
            jnp.zeros((vg * vb,), acc) if wanted.bias else None,
        )
        dx, dw_blk, db_blk = B.for_blocks(n // tg, plan.token_block // tg, token_step, inner)
        if wanted.w:
            dw = B.put_block(dw, dw_blk.astype(dw.dtype), v0, ax, vg)
        if wanted.bias:
            db = B.put_block(db, db_blk.astype(db.dtype), v0, 0, vg)
        return dx, dw, db

    carry = (
        B.group(jnp.zeros((n, d), acc), 0, tg) if wanted.x else None,
        B.group(jnp.zeros(inp.w.shape, inp.w.dtype), ax, vg) if wanted.w else None,
        B.group(jnp.zeros(inp.bias.shape, inp.bias.dtype), 0, vg) if wanted.bias else None,
    )
    dx, dw, db = B.for_blocks(v // vg, plan.vocab_block // vg, vocab_step, carry)
    dx, dw, db = B.ungroup(dx, 0, tg), B.ungroup(dw, ax, vg), B.ungroup(db, 0, vg)
    return (None if dx is None else dx.astype(inp.x.dtype)), dw, db
