"""The single-pass schedule (Liger Kernel's): every block spans the whole vocabulary.

Each token block's logits give its softmax at once, so one pass over the token blocks
computes a summed loss and its gradients together, accumulating ``dw`` in a float32
``[D, V]`` buffer; the backward rule only scales them. Three matrix products (a second
pass reads the block it holds). One device's whole vocabulary only.

Internal API: :func:`loss_and_grads`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jxent import _backend
from jxent._fused import blocks as B
from jxent._fused import filtering, online
from jxent._fused import logits as L
from jxent._fused.contract import Inputs, Spec, View, accumulation, num_columns, vocab_axis
from jxent._fused.plan import Plan


def loss_and_grads(spec: Spec, plan: Plan, inp: Inputs, wanted: online.Wanted):
    """Sum of the per-token losses and its gradients, one pass over token blocks.

    Every block spans the whole vocabulary, so its softmax is final as soon as its
    logits exist: ``dx`` rows are written per block, ``dw`` and ``dbias`` are summed
    over the blocks in the accumulation dtype. Returns them unscaled, in that dtype.
    """
    loss = spec.loss
    (n, d), v, ax = inp.x.shape, num_columns(spec, inp), vocab_axis(spec)
    tg = plan.token_groups
    acc = accumulation(inp)
    x, rows = B.group(inp.x, 0, tg), jax.tree.map(lambda a: B.group(a, 0, tg), inp.rows)
    # With padding columns, dx's product needs w with its padding zeroed: a copy of w
    # (loop-invariant, made once), beside the [D, V] float32 accumulator of dw.
    w_dx = L.real_weights(inp.w, inp.real_columns, ax) if wanted.x else inp.w
    declared = loss.row_sums(inp.columns)
    no_weight = {k: jnp.zeros((), acc) for k in online.gap_totals(declared, v, acc)}
    teacher = L.grouped_teacher(spec, plan, inp.teacher)  # the whole vocabulary in one block

    def token_step(r0, nb, carry):
        total, dx, dw, db = carry
        x_blk = B.block(x, r0, nb, 0, tg)
        rows_blk = jax.tree.map(lambda a: B.block(a, r0, nb, 0, tg), rows)
        z, dcap = L.block_logits(spec, plan, x_blk, inp.w, inp.bias, inp.real_columns)
        t = L.teacher_logits(spec, plan, teacher, r0, nb, tg, inp.real_columns)
        view = View(rows_blk, inp.columns, 0, v, 1, v, teacher=t)
        fresh = online.init_running(loss, tg * nb, acc, inp.columns, t is not None)
        run = online.merge(loss, fresh, z, view, no_weight)
        sums = online.final(run, online.gap_totals(declared, v, acc))
        # A second pass reads the same blocks: the whole vocabulary is here already.
        stats, _ = online.second_stats(loss, sums, rows_blk)
        if stats is not None:
            second = online.second_sums(loss, z, view, stats, inp.real_columns)
            sums = sums._replace(second=second)
        loss_blk, coefs = online.finish(spec, inp, sums, rows_blk)
        # The block's maximum behind a barrier: otherwise XLA:CPU shares z - max between
        # the sum of exponentials above and the softmax below, and materialises it.
        coefs = coefs._replace(row_max=_backend.cpu_barrier(coefs.row_max))
        dz = online.dlogits(spec, z, dcap, coefs, view, inp.real_columns)
        grads = filtering.add_products(
            spec, plan, inp, x, (r0, nb, tg), dz, w_dx, wanted, (dx, dw, db), B.put_block, ax,
            view, coefs, v, filtering.SINGLE_PASS_CHUNK,
        )  # fmt: skip
        return total + jnp.sum(loss_blk), *grads

    carry = (
        jnp.zeros((), acc),
        B.group(jnp.zeros((n, d), acc), 0, tg) if wanted.x else None,
        jnp.zeros(inp.w.shape, acc) if wanted.w else None,
        jnp.zeros((v,), acc) if wanted.bias else None,
    )
    total, dx, dw, db = B.for_blocks(n // tg, plan.token_block // tg, token_step, carry)
    return total, B.ungroup(dx, 0, tg), dw, db
