"""Gradient filtering: a block's two gradient products skipped where its ``dloss/dz`` is
negligible (Cut Cross-Entropy's idea, with a bound on what is dropped).

A trained model's softmax puts almost all of a token's mass on a few classes; far
from them, a block of ``dloss/dz`` holds numbers too small to matter, yet the backward
pass multiplies it by ``w`` and by ``x`` like any other (two of the streaming
schedule's four products, two of the single pass's three). With ``Spec.filter_eps =
eps`` the backward pass measures each block (a column chunk of it in the single pass)
before its products and, under a ``lax.cond`` (XLA then runs one branch), replaces
them when

    for every token n of the block:
        sum_{k in block, k not a target of n} |dloss/dz_nk|  <=  eps * u_n * width / C

by the products of the block's *target* entries only (the loss's
``FusedLoss.targets``: a label, a teacher's top-k classes; each read at its column,
so nothing a target carries is lost): a column of ``w`` and a row of ``x`` per target,
``O(n k D)`` work at most instead of ``O(n width D)``.
``u_n`` is the token's gradient scale, the sum of the magnitudes of its coefficients
(``dloss/dz`` is linear in them): for the plain cross-entropy ``2 |g_n|``, with ``g_n``
the token's cotangent times its weight (``dloss/dz_n = g_n (p_n - onehot(y_n))``, whose
``L1`` mass is at most that); with label smoothing ``a``, class weights ``c`` and a
z-loss, ``|g_n| (|s_n| + (1 - a) c_y + a / V)``, ``s_n = (1 - a) c_y + a sum(c) / V + 2
z_loss lse_n``. ``width`` is the block's columns and ``C`` all the columns (every
shard's). So each token loses at most ``eps * u_n`` of ``L1`` mass of its
``dloss/dz``, over all the blocks together, whatever their number:

    |dx_n - dx_n^filtered|_inf <= eps * u_n * max_k |w_k|_inf
    |dw - dw^filtered|_F       <= eps * sum_n u_n |x_n|_2
    |dbias - dbias^filtered|_1 <= eps * sum_n u_n

The loss itself is never filtered: the forward pass computes the same numbers.

**Deciding ahead (streaming).** The streaming backward pass makes each block's logits
again before its two gradient products, so a block skipped after that still costs one
product of its size. For a loss whose ``dloss/dz`` off its targets is ``a_n p_nk``
(``FusedLoss.softmax_form``: the plain cross-entropy, ``a_n`` its softmax
coefficient), the forward pass records per token and vocabulary block the log of the
block's off-target softmax numerator, ``log sum_{k off targets} exp(z_nk)``, and the
logits at the targets (:class:`Ahead`, ``[N, blocks]`` and ``[N, k]``: a residual of
``4 N (blocks + k)`` bytes). The off-target mass of the rule is then
``|a_n| exp(off_lse_n - lse_n)`` and a target's entry ``a_n p_t - b_n``, both known
before the block's logits, so the conditional holds all three of its products: a
skipped block costs ``O(D)`` per target it holds, nothing per column. The rule and its
bound are the same.

Internal API: :func:`add_products`, :func:`auto_eps`, :func:`skipped_blocks`,
:data:`SINGLE_PASS_CHUNK`; deciding ahead (streaming): :class:`Ahead`, :func:`ahead`,
:func:`init_ahead`, :func:`record`, :func:`products_ahead`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _backend
from jxent._fused import blocks as B
from jxent._fused import online
from jxent._fused.contract import Inputs, Spec, View
from jxent._fused.plan import Plan
from jxent._rules import vary_like

#: ``filter_eps="auto"``: the unit roundoff of the inputs' dtype. The unfused loss
#: rounds ``dloss/dz`` to that dtype before its products, which moves each token's
#: ``L1`` mass by up to this fraction of it; filtering drops no more than that.
_AUTO = {
    jnp.dtype(jnp.bfloat16): 2.0**-8,
    jnp.dtype(jnp.float16): 2.0**-11,
    jnp.dtype(jnp.float32): 2.0**-24,
    jnp.dtype(jnp.float64): 2.0**-53,
}


#: The single pass's column chunks (its blocks span the whole vocabulary): each chunk is
#: filtered on its own, and its two products stay large enough to run at full speed.
SINGLE_PASS_CHUNK = 4096


#: Targets per token up to which the off-target mass is a compare-select per target
#: (fused into the sum), beyond which a scatter (a teacher's top-k).
_SELECTS = 4


def auto_eps(dtype) -> float:
    """``filter_eps="auto"`` for inputs of ``dtype``: its unit roundoff (see ``_AUTO``)."""
    return _AUTO[jnp.dtype(dtype)]


def _unit(coefs: online.Coefficients) -> jax.Array:
    """Each token's gradient scale ``u_n``: its coefficients' magnitudes summed ``[n]``."""
    parts = [jnp.abs(c).reshape(c.shape[0], -1).sum(axis=1) for c in jax.tree.leaves(coefs.loss)]
    return sum(parts[1:], parts[0])


def _targets(spec: Spec, view: View):
    """The loss's target columns as positions in the block ``[n, k]`` (any value outside
    ``[0, width)`` where the block does not hold one), or None (no targets)."""
    targets = getattr(spec.loss, "targets", lambda view: None)(view)
    if targets is None:
        return None
    pos = view.column_of(targets)
    return pos[:, None] if pos.ndim == 1 else pos


def _off_targets(a: jax.Array, pos, fill) -> jax.Array:
    """``a [n, width]`` with ``fill`` at the token's targets (positions ``pos [n, k]``, or
    None: no targets)."""
    fill = jnp.asarray(fill, a.dtype)
    if pos is not None and pos.shape[1] <= _SELECTS:
        # Compare-selects inside the consumer's fusion: the result is never materialised.
        col = lax.broadcasted_iota(pos.dtype, a.shape, 1)
        target = functools.reduce(
            jnp.logical_or, [col == pos[:, j : j + 1] for j in range(pos.shape[1])]
        )
        return jnp.where(target, fill, a)
    if pos is not None:
        rows = lax.broadcasted_iota(pos.dtype, pos.shape, 0)
        held = jnp.where((pos >= 0) & (pos < a.shape[1]), pos, a.shape[1])
        return a.at[rows, held].set(fill, mode="drop")
    return a


def _off_target_mass(dz: jax.Array, pos) -> jax.Array:
    """``sum_k |dz_nk|`` over the columns that are not the token's targets ``[n]``."""
    return jnp.sum(_off_targets(jnp.abs(dz), pos, 0), axis=1)


def _within_share(mass, unit, eps: float, width: int, columns) -> jax.Array:
    """The rule: every token's off-target mass ``[n]`` (over ``width`` of the
    ``columns``) within its share ``eps * unit * width / columns``."""
    share = (eps * unit) / jnp.asarray(columns).astype(unit.dtype)
    return jnp.all(mass <= share * width)


def _skips(dz_chunk, pos, unit, eps: float, columns) -> jax.Array:
    """Whether a chunk of ``dz`` (a block's columns, ``pos`` the targets' positions in
    it) is skipped (:func:`_within_share`)."""
    mass = _off_target_mass(dz_chunk, pos)
    return _within_share(mass, unit, eps, dz_chunk.shape[1], columns)


def _at_targets(a: jax.Array, pos) -> jax.Array:
    """``a [n, width]`` read at the targets' positions ``pos [n, k]``, 0 where the block
    does not hold them."""
    here = (pos >= 0) & (pos < a.shape[1])
    picked = jnp.take_along_axis(a, jnp.clip(pos, 0, a.shape[1] - 1), axis=1)
    return jnp.where(here, picked, jnp.zeros((), a.dtype))


def _target_products(values, pos, w_blk, wanted: online.Wanted, grads, c0, ax, x_row, x_blk=None):
    """``grads = (dx_part, dw, db)`` plus the products of the block's target entries only:
    ``values [n, k]`` of ``dz`` at the positions ``pos [n, k]`` (0 where the block does not
    hold them; columns from ``c0`` in ``dw`` and ``db``); ``x_row(r)``: the block's row
    ``r`` of ``x``.

    Streaming: one iteration per target the block holds, ``O(D)`` work each (over a
    whole pass each target is held by one block). With ``x_blk``, the token block of
    ``x`` (the single pass, whose ``dw`` is the whole ``[D, V]`` accumulator): one
    iteration per target slot over every token, an ``[n, D]`` gather of ``w``'s columns
    and a scatter into ``dw``'s. A loop of data-dependent length there, inside each
    chunk's conditional, makes XLA:CPU copy the accumulator (compiled temporary memory
    176 -> 236 MiB at 2048 x 512 x 32768 float32)."""
    n, k = pos.shape
    width = w_blk.shape[ax]
    here = (pos >= 0) & (pos < width)
    safe = jnp.clip(pos, 0, width - 1)
    if x_blk is not None:
        # Outside dw's columns where the block does not hold the target: dropped.
        outside = grads[1].shape[ax] if wanted.w else (grads[2].shape[0] if wanted.bias else 0)
        column = jnp.where(here, safe + c0, outside)

        def one_slot(j, carry):
            dx_part, dw, db = carry
            v, s, c = (
                lax.dynamic_index_in_dim(a, j, 1, keepdims=False) for a in (values, safe, column)
            )
            if wanted.x:
                w_cols = jnp.take(w_blk, s, axis=ax).astype(values.dtype)  # [D, n] or [n, D]
                dx_part = dx_part + v[:, None] * (w_cols.T if ax == 1 else w_cols)
            if wanted.w:
                update = v[:, None] * x_blk.astype(values.dtype)  # [n, D]
                if ax == 1:
                    dw = dw.at[:, c].add(update.T.astype(dw.dtype), mode="drop")
                else:
                    dw = dw.at[c].add(update.astype(dw.dtype), mode="drop")
            if wanted.bias:
                db = db.at[c].add(v.astype(db.dtype), mode="drop")
            return dx_part, dw, db

        body, trips = one_slot, k
    else:
        flat, flat_values = safe.reshape(-1), values.reshape(-1)
        hits = jnp.nonzero(here.reshape(-1), size=n * k, fill_value=0)[0].astype(jnp.int32)

        def one_target(i, carry):
            dx, dw, db = carry
            f = hits[i]
            c, v, r = flat[f], flat_values[f], f // k
            if wanted.x:
                w_col = _backend.index_bits(w_blk, c, ax)  # [D]
                dx = dx.at[r].add(v * w_col.astype(v.dtype))
            if wanted.w:
                update = (v * x_row(r).astype(v.dtype)).astype(dw.dtype)
                dw = dw.at[:, c0 + c].add(update) if ax == 1 else dw.at[c0 + c].add(update)
            if wanted.bias:
                db = db.at[c0 + c].add(v.astype(db.dtype))
            return dx, dw, db

        body, trips = one_target, jnp.sum(here, dtype=jnp.int32)
    # Inside shard_map the carry must vary over the mesh axes the body's results do.
    grads = vary_like(grads, jax.eval_shape(functools.partial(body, 0), grads))
    return lax.fori_loop(0, trips, body, grads)


def add_products(
    spec: Spec,
    plan: Plan,
    inp: Inputs,
    x,
    rows_blk,
    dz,
    w_blk,
    wanted: online.Wanted,
    grads,
    write_dx,
    ax: int,
    view: View,
    coefs: online.Coefficients,
    columns: int,
    chunk: int | None = None,
):
    """:func:`jxent._fused.online.add_products` (same arguments first), each column chunk
    of ``chunk`` columns (None: the whole block) filtered as the module docstring says:
    ``view`` and ``coefs`` are the block's, ``columns`` the whole vocabulary's count
    ``C`` (every shard's). Without ``spec.filter_eps``, the plain products."""
    if spec.filter_eps is None:
        return online.add_products(plan, inp, x, rows_blk, dz, w_blk, wanted, grads, write_dx, ax)
    dx, dw, db = grads
    start, length, groups = rows_blk
    x_blk = B.block(x, start, length, 0, groups)
    xt_blk = online.product_rows(x, rows_blk, wanted, ax)
    pos = _targets(spec, view)
    unit = _unit(coefs)
    width = dz.shape[1]
    chunk = width if chunk is None else min(chunk, width)

    def chunk_step(c0, cw, carry):
        dx_part, dw, db = carry
        dz_c = B.block(dz, c0, cw, 1, 1)
        w_c = B.block(w_blk, c0, cw, ax, 1)
        pos_c = None if pos is None else pos - c0
        skip = _skips(dz_c, pos_c, unit, spec.filter_eps, columns)

        def full(carry):
            dx_part, dw, db = carry
            dxp, dwp = online.block_products(plan, inp, dz_c, xt_blk, w_c, wanted, ax)
            dx_part = dx_part + dxp if wanted.x else None
            dw = B.add_block(dw, dwp, c0, ax, 1) if wanted.w else None
            db = B.add_block(db, jnp.sum(dz_c, axis=0), c0, 0, 1) if wanted.bias else None
            return dx_part, dw, db

        def targets_only(carry):
            if pos_c is None:
                return carry
            values = _at_targets(dz_c, pos_c)
            return _target_products(values, pos_c, w_c, wanted, carry, c0, ax, None, x_blk)

        return lax.cond(skip, targets_only, full, (dx_part, dw, db))

    # Every chunk's products run in the chunk's conditional, even where none is skipped
    # (the copies of its columns of dz and w cost 7% at 4096 x 1024 x 32000 float32). Run
    # whole in that case, a block's products take one more [D, V] float32 temporary
    # (compiled temporary memory 176 -> 264 MiB at 2048 x 512 x 32768 float32) for 0.7%.
    acc = dz.dtype
    dx_part = jnp.zeros((dz.shape[0], x.shape[-1]), acc) if wanted.x else None
    dx_part, dw, db = B.for_blocks(width, chunk, chunk_step, (dx_part, dw, db))
    if wanted.x:
        dx = write_dx(dx, dx_part, start, 0, groups)
    return dx, dw, db


class Ahead(NamedTuple):
    """What the streaming forward pass records for deciding a block ahead: per token and
    vocabulary block, ``log sum exp(z_k)`` over the block's columns that are not the
    token's targets ``[N, blocks]`` (``-inf``: none, or all underflowing), and the
    token's logits at its targets ``[N, k]``."""

    off_lse: jax.Array
    target_z: jax.Array


def ahead(spec: Spec) -> bool:
    """Whether the streaming schedule decides its blocks ahead (static): with filtering,
    for a loss of the softmax form (``FusedLoss.softmax_form``), without a soft cap
    (its derivative scales ``dloss/dz`` at every column: no longer a multiple of ``p``)."""
    form = getattr(spec.loss, "softmax_form", lambda: None)
    return spec.filter_eps is not None and spec.soft_cap is None and form() is not None


def init_ahead(spec: Spec, inp: Inputs, view: View, columns: int, acc) -> Ahead:
    """An empty :class:`Ahead` for ``columns`` columns (this device's); ``view``: any view
    of the whole token range (the targets' shape). Its blocks are the most that any
    platform's plan makes: the forward pass's residuals have one shape on every
    platform (``Spec.plans``), each using its own first ones."""
    n = inp.x.shape[0]
    targets = spec.loss.targets(view)
    k = 1 if targets.ndim == 1 else targets.shape[1]
    blocks = max(-(-(columns // p.vocab_groups) // (p.vocab_block // p.vocab_groups))
                 for _, p in spec.plans)  # fmt: skip
    return Ahead(jnp.full((n, blocks), -jnp.inf, acc), jnp.zeros((n, k), acc))


def record(spec: Spec, rec: Ahead, z: jax.Array, view: View, m: jax.Array, index) -> Ahead:
    """``rec`` (a token block's) with vocabulary block ``index``'s numbers: its logits
    ``z`` and view, ``m`` the running maximum including it (``exp(z - m)`` cannot
    overflow; a column that underflows there holds ``p < 2^-149``, far below any
    share of the bound)."""
    pos = _targets(spec, view)
    off = _off_targets(z, pos, -jnp.inf)
    s = jnp.sum(jnp.exp(off - m[:, None]), axis=1)
    off_lse = lax.dynamic_update_index_in_dim(rec.off_lse, m + jnp.log(s), index, axis=1)
    return Ahead(off_lse, rec.target_z + _at_targets(z, pos))


def _form(spec: Spec, coefs: online.Coefficients):
    """``(a [n], b [n, k])`` of the loss's softmax form, times ``dz/dlogits`` (the
    temperature's ``1 / T``; ``ahead`` excludes a soft cap)."""
    a, b = spec.loss.softmax_form()(coefs.loss)
    if spec.temperature is not None and spec.temperature != 1:
        inv = 1 / spec.temperature
        a, b = a * inv, b * inv
    return a, b


def products_ahead(
    spec: Spec,
    plan: Plan,
    inp: Inputs,
    x,
    rows_blk,
    make_dz,
    w_blk,
    wanted: online.Wanted,
    grads,
    write_dx,
    ax: int,
    view: View,
    coefs: online.Coefficients,
    columns: int,
    index,
):
    """:func:`add_products` for a streaming block decided before its logits are made
    again (:func:`ahead`): ``make_dz()`` makes the block's ``dloss/dz``, ``index`` is the
    vocabulary block's (``coefs.ahead``'s column). The rule is :func:`add_products`'s
    with the block's off-target mass read from the forward pass,
    ``|a_n| exp(off_lse_n - lse_n)`` (``a_n p`` is all of ``dloss/dz`` there); a skipped
    block's target entries are ``a_n p_t - b_n`` from the targets' logits. So XLA runs
    one ``O(D)`` update per target a skipped block holds, instead of three products of
    the block's size (its logits again, and the two gradient products).

    ``off_lse`` is one rounded number, ``m + log s``: its absolute rounding, a few ulps of
    the row's maximum, is a relative error of ``exp(off_lse - lse)``. The mass is taken
    that much larger, so the rule drops no more than documented whatever the logits'
    magnitude."""
    start, length, groups = rows_blk
    xt_blk = online.product_rows(x, rows_blk, wanted, ax)
    a, b = _form(spec, coefs)
    rec = coefs.ahead
    lse_rel = coefs.lse_rel
    off = lax.dynamic_index_in_dim(rec.off_lse, index, axis=1, keepdims=False)
    mass = jnp.abs(a) * jnp.exp((off - coefs.row_max) - lse_rel)
    rounding = 4 * jnp.finfo(lse_rel.dtype).eps * (jnp.abs(coefs.row_max) + lse_rel + 1)
    mass = mass * (1 + rounding)
    skip = _within_share(mass, _unit(coefs), spec.filter_eps, w_blk.shape[ax], columns)
    pos = _targets(spec, view)
    p_t = jnp.exp((rec.target_z - coefs.row_max[:, None]) - lse_rel[:, None])
    values = a[:, None] * p_t - b

    def full(carry):
        dw, db = carry
        dz = make_dz()
        dx_part, dw_part = online.block_products(plan, inp, dz, xt_blk, w_blk, wanted, ax)
        dw = dw + dw_part if wanted.w else None
        db = db + jnp.sum(dz, axis=0) if wanted.bias else None
        return dx_part, dw, db

    def x_row(r):
        # The block's row r, read from x's grouped view (jxent._fused.blocks).
        if groups == 1:
            return _backend.index_bits(x, start + r, 0)
        return _backend.index_bits(_backend.index_bits(x, r // length, 0), start + r % length, 0)

    def targets_only(carry):
        dx_part = jnp.zeros((groups * length, x.shape[-1]), lse_rel.dtype) if wanted.x else None
        return _target_products(values, pos, w_blk, wanted, (dx_part, *carry), 0, ax, x_row)

    # dx outside the conditional: through it, XLA:CPU copies the whole of dx each time.
    dx, dw, db = grads
    dx_part, dw, db = lax.cond(skip, targets_only, full, (dw, db))
    if wanted.x:
        dx = write_dx(dx, dx_part, start, 0, groups)
    return dx, dw, db


def skipped_blocks(dz, targets, unit, eps: float, chunk: int) -> jax.Array:
    """Which column chunks of ``dz [n, V]`` (a whole token block) the filter skips, bool
    ``[V // chunk]``, for measurements (``benchmarks/``): the same rule as
    :func:`add_products` with targets ``[n, k]`` (vocabulary indices) and gradient scales
    ``unit [n]``."""
    v = dz.shape[1]
    chunks = range(0, v, chunk)
    return jnp.stack([_skips(dz[:, c0 : c0 + chunk], targets - c0, unit, eps, v) for c0 in chunks])
