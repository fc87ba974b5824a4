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
so nothing a target carries is lost): an ``[n, D]`` gather of ``w``'s target columns
for ``dx`` and a scatter into ``dw``'s, ``O(n k D)`` work instead of ``O(n width D)``.
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

The loss itself is never filtered: the forward pass is the same program.

Internal API: :func:`add_products`, :func:`auto_eps`, :func:`skipped_blocks`,
:data:`SINGLE_PASS_CHUNK`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

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


def _targets(spec: Spec, view: View, dz: jax.Array):
    """The loss's target columns as positions in the block ``[n, k]`` (any value outside
    ``[0, width)`` where the block does not hold one), or None (no targets)."""
    targets = getattr(spec.loss, "targets", lambda view: None)(view)
    if targets is None:
        return None
    pos = view.column_of(targets)
    return pos[:, None] if pos.ndim == 1 else pos


def _off_target_mass(dz: jax.Array, pos) -> jax.Array:
    """``sum_k |dz_nk|`` over the columns that are not the token's targets ``[n]``."""
    mag = jnp.abs(dz)
    if pos is not None and pos.shape[1] <= _SELECTS:
        # Compare-selects inside the reduction's fusion: |dz| is never materialised.
        col = lax.broadcasted_iota(pos.dtype, dz.shape, 1)
        target = functools.reduce(
            jnp.logical_or, [col == pos[:, j : j + 1] for j in range(pos.shape[1])]
        )
        mag = jnp.where(target, jnp.zeros((), mag.dtype), mag)
    elif pos is not None:
        rows = lax.broadcasted_iota(pos.dtype, pos.shape, 0)
        held = jnp.where((pos >= 0) & (pos < dz.shape[1]), pos, dz.shape[1])
        mag = mag.at[rows, held].set(jnp.zeros((), mag.dtype), mode="drop")
    return jnp.sum(mag, axis=1)


def _skips(dz_chunk, pos, unit, eps: float, columns) -> jax.Array:
    """The rule: whether a chunk of ``dz`` (a block's columns, ``pos`` the targets'
    positions in it) is skipped, every token's off-target mass within its share
    ``eps * unit * width / columns``."""
    share = (eps * unit) / jnp.asarray(columns).astype(unit.dtype)
    return jnp.all(_off_target_mass(dz_chunk, pos) <= share * dz_chunk.shape[1])


def _target_products(x_blk, dz, pos, w_blk, wanted: online.Wanted, grads, c0, ax):
    """``(dx_part, dw, db)`` plus the products of ``dz``'s target entries only (``dz``
    read at ``pos``; columns from ``c0`` in ``dw`` and ``db``)."""
    dx_part, dw, db = grads
    width = dz.shape[1]
    here = (pos >= 0) & (pos < width)
    safe = jnp.clip(pos, 0, width - 1)
    values = jnp.where(here, jnp.take_along_axis(dz, safe, axis=1), jnp.zeros((), dz.dtype))
    # Outside dw's columns where the block does not hold the target: dropped.
    outside = dw.shape[ax] if wanted.w else (db.shape[0] if wanted.bias else 0)
    column = jnp.where(here, safe + c0, outside)

    def one_target(j, carry):
        dx_part, dw, db = carry
        v, s, c = (
            lax.dynamic_index_in_dim(a, j, 1, keepdims=False) for a in (values, safe, column)
        )
        if wanted.x:
            w_cols = jnp.take(w_blk, s, axis=ax).astype(dz.dtype)  # [D, n] or [n, D]
            dx_part = dx_part + v[:, None] * (w_cols.T if ax == 1 else w_cols)
        if wanted.w:
            update = v[:, None] * x_blk.astype(dz.dtype)  # [n, D]
            if ax == 1:
                dw = dw.at[:, c].add(update.T.astype(dw.dtype), mode="drop")
            else:
                dw = dw.at[c].add(update.astype(dw.dtype), mode="drop")
        if wanted.bias:
            db = db.at[c].add(v.astype(db.dtype), mode="drop")
        return dx_part, dw, db

    carry = (dx_part, dw, db)
    # Inside shard_map the carry must vary over the mesh axes the body's results do.
    carry = vary_like(carry, jax.eval_shape(functools.partial(one_target, 0), carry))
    return lax.fori_loop(0, pos.shape[1], one_target, carry)


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
    pos = _targets(spec, view, dz)
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
            return _target_products(x_blk, dz_c, pos_c, w_c, wanted, carry, c0, ax)

        return lax.cond(skip, targets_only, full, (dx_part, dw, db))

    acc = dz.dtype
    dx_part = jnp.zeros((dz.shape[0], x.shape[-1]), acc) if wanted.x else None
    dx_part, dw, db = B.for_blocks(width, chunk, chunk_step, (dx_part, dw, db))
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
