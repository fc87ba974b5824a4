"""One block of the engine's logits: the student's ``z`` and a teacher's ``t``.

``z = soft_cap(x_blk @ w_blk + b_blk) / temperature``, made in the accumulation dtype
(float32 for float32/bfloat16/float16 products, float64 for float64) from ``w``'s block
read in place in either layout (``[D, vb]`` or ``[vb, D]``), with its padding columns
*selected* to a large finite negative number before anything reads them (whatever ``w``
and ``bias`` hold there). A teacher's logits stream (``x_t``, ``w_t``, ``bias_t``: a
constant) is made the same way beside it, block by block: same cap, temperature and
padding, ``w_t`` in ``w``'s layout and grouping.

The functions take the call's static choices as ``spec`` (``contract.Spec``: its
``soft_cap``, ``temperature`` and ``w_layout``) and a block plan (``plan.Plan``).

Internal API: :data:`PADDING_LOGIT`, :func:`compute_dtype`, :func:`round_to_bfloat16`,
:func:`vocab_axis`, :func:`block_logits`, :class:`Teacher`, :func:`grouped_teacher`,
:func:`teacher_columns`, :func:`teacher_logits`, :func:`real_weights`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent._fused import blocks as B
from jxent._fused.plan import Plan
from jxent._validation import accumulation_dtype

#: The logit of a padding column, as a fraction of the accumulation dtype's largest value:
#: far below any real logit, and ``m - z`` of it cannot overflow in the gap sums.
PADDING_LOGIT = -0.25


def compute_dtype(*arrays) -> jnp.dtype:
    """The dtype the products run in: the promotion of ``x``, ``w`` (and ``bias``)."""
    return functools.reduce(jnp.promote_types, [a.dtype for a in arrays if a is not None])


def round_to_bfloat16(a: jax.Array) -> jax.Array:
    """float32 ``a`` rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), as
    ``a.astype(jnp.bfloat16)`` but through the bits: integer arithmetic on the block, which
    XLA:TPU does not turn into a conversion of the whole array it was sliced from
    (``_backend.BFLOAT16_BLOCKS``)."""
    bits = lax.bitcast_convert_type(a, jnp.uint32)
    odd = (bits >> 16) & jnp.uint32(1)
    rounded = ((bits + jnp.uint32(0x7FFF) + odd) >> 16).astype(jnp.uint16)
    out = lax.bitcast_convert_type(rounded, jnp.bfloat16)
    return jnp.where(jnp.isnan(a), jnp.asarray(jnp.nan, jnp.bfloat16), out)


def vocab_axis(w_layout: str) -> int:
    """The axis of ``w`` that runs over the vocabulary in ``w_layout``."""
    return 0 if w_layout == "vd" else 1


def block_logits(spec, plan: Plan, x_blk, w_blk, b_blk, real_blk=None):
    """One block's logits in the accumulation dtype, soft-capped: ``(z, dz/dlogits)``."""
    cdt = compute_dtype(x_blk, w_blk, b_blk)
    acc = accumulation_dtype(cdt)
    # x [n, D] times w's block, [D, vb] or [vb, D]: contract D either way (no transpose).
    dims = (((1,), (vocab_axis(spec.w_layout) ^ 1,)), ((), ()))
    x_blk, w_blk = x_blk.astype(cdt), w_blk.astype(cdt)
    if plan.bfloat16_blocks and cdt == jnp.float32:
        x_blk, w_blk = x_blk.astype(jnp.bfloat16), round_to_bfloat16(w_blk)
    logits = lax.dot_general(
        x_blk,
        w_blk,
        dims,
        precision=plan.precision,
        preferred_element_type=acc,
    )
    if b_blk is not None:
        logits = logits + b_blk.astype(acc)[None, :]
    dcap = None
    if spec.soft_cap is not None:
        t = jnp.tanh(logits / spec.soft_cap)
        logits, dcap = spec.soft_cap * t, 1 - t * t
    if spec.temperature is not None and spec.temperature != 1:
        inv = 1 / spec.temperature
        logits = logits * jnp.asarray(inv, acc)
        dcap = jnp.full((), inv, acc) if dcap is None else dcap * jnp.asarray(inv, acc)
    if real_blk is not None:
        real = real_blk[None, :]
        logits = jnp.where(real, logits, jnp.asarray(PADDING_LOGIT * jnp.finfo(acc).max, acc))
        if dcap is not None:
            dcap = jnp.where(real, jnp.broadcast_to(dcap, logits.shape), jnp.zeros((), acc))
    return logits, dcap


class Teacher(NamedTuple):
    """A teacher's operands in the loops' grouped views (``x_t`` by tokens, ``w_t`` and
    its bias by columns), or one vocabulary block's columns of them."""

    x: jax.Array | None
    w: jax.Array
    bias: jax.Array | None


def grouped_teacher(spec, plan: Plan, teacher) -> Teacher | None:
    """The teacher ``(x_t, w_t, bias_t)`` (or None) in the plan's grouped views."""
    if teacher is None:
        return None
    xt, wt, bt = teacher
    tg, vg = plan.token_groups, plan.vocab_groups
    wt = B.group(wt, vocab_axis(spec.w_layout), vg)
    return Teacher(B.group(xt, 0, tg), wt, B.group(bt, 0, vg))


def teacher_columns(spec, teacher: Teacher | None, v0, vb, vg) -> Teacher | None:
    """The teacher's ``w`` (and bias) block of the vocabulary block ``(v0, vb)``."""
    if teacher is None:
        return None
    w_blk = B.block(teacher.w, v0, vb, vocab_axis(spec.w_layout), vg)
    return Teacher(teacher.x, w_blk, B.block(teacher.bias, v0, vb, 0, vg))


def teacher_logits(spec, plan: Plan, teacher: Teacher | None, r0, nb, tg, real_blk):
    """The teacher's logits block (tokens ``(r0, nb)``, the columns of ``teacher``)."""
    if teacher is None:
        return None
    x_blk = B.block(teacher.x, r0, nb, 0, tg)
    return block_logits(spec, plan, x_blk, teacher.w, teacher.bias, real_blk)[0]


def real_weights(w_blk: jax.Array, real_blk: jax.Array | None, axis: int) -> jax.Array:
    """``w_blk`` with its padding columns zeroed, for ``dx = dz @ w.T``.

    ``dz`` is exactly 0 on the padding, but ``0 * inf`` and ``0 * NaN`` are NaN: a padding
    column holding either would spread into every entry of ``dx``. Only when padded and
    ``dx`` is wanted; the select is of a block (or, in the single pass, of ``w``).
    """
    if real_blk is None:
        return w_blk
    real = real_blk[None, :] if axis == 1 else real_blk[:, None]
    return jnp.where(real, w_blk, jnp.zeros((), w_blk.dtype))
