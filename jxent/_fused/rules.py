"""The ``jax.custom_vjp`` rules of the XLA implementation: a per-token loss on the
streaming schedule (:func:`per_token_loss`) and a summed one on the single pass
(:func:`summed_loss`).

Only the gradients being differentiated are computed (``CustomVJPPrimal.perturbed``),
a symbolic-zero cotangent computes nothing, and every gradient comes back in its
primal's dtype and type (summed over the mesh axes its primal does not vary over).

Internal API: :func:`per_token_loss`, :func:`summed_loss`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jxent import _backend
from jxent._fused import online, single_pass, streaming
from jxent._fused.contract import Inputs, Spec
from jxent._rules import sum_to_type


def _on_platform(spec: Spec, fn):
    """``fn(plan)`` with the lowering platform's plan."""
    return _backend.per_platform(fn, dict(spec.plans))


def _unwrap(args):
    """``(values, perturbed flags)`` of the ``CustomVJPPrimal`` arguments of a fwd rule."""
    is_primal = lambda a: isinstance(a, CustomVJPPrimal)  # noqa: E731
    values = jax.tree.map(lambda a: a.value, args, is_leaf=is_primal)
    perturbed = jax.tree.map(lambda a: a.perturbed, args, is_leaf=is_primal)
    return values, perturbed


def _wanted(inp: Inputs, perturbed) -> online.Wanted:
    px, pw, pb = perturbed[:3]
    return online.Wanted(bool(px), bool(pw), inp.bias is not None and bool(pb))


def _zero_cotangents(inp: Inputs):
    return (
        jnp.zeros_like(inp.x),
        jnp.zeros_like(inp.w),
        None if inp.bias is None else jnp.zeros_like(inp.bias),
    )


def _fill(inp: Inputs, grads):
    """Zeros of the right type for the gradients that were not wanted; the others summed
    over the mesh axes their primals do not vary over (``dx`` over the vocabulary shards,
    ``dw`` over the data shards)."""
    primals = (inp.x, inp.w, inp.bias)
    return tuple(
        z if gr is None else sum_to_type(gr, p)
        for gr, z, p in zip(grads, _zero_cotangents(inp), primals, strict=True)
    )


_NO_GRADS = (None, None, None, None)  # rows, columns, real_columns, teacher: constants


def _is_zero(a) -> bool:
    return isinstance(a, SymbolicZero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(spec, x, w, bias, rows, columns, real_columns, teacher):
    inp = Inputs(x, w, bias, rows, columns, real_columns, teacher)
    return _on_platform(spec, lambda plan: streaming.forward(spec, plan, inp)[0])


def _per_token_fwd(spec, *args):
    values, perturbed = _unwrap(args)
    inp = Inputs(*values)
    loss, coefs = _on_platform(spec, lambda plan: streaming.forward(spec, plan, inp))
    return loss, (inp, coefs, _wanted(inp, perturbed))


def _per_token_bwd(spec, res, g):
    inp, coefs, wanted = res
    if all(isinstance(gi, SymbolicZero) for gi in jax.tree.leaves(g, is_leaf=_is_zero)):
        return (*_zero_cotangents(inp), *_NO_GRADS)
    scaled = online.scaled(coefs, g if isinstance(g, tuple) else g.astype(coefs.lse_rel.dtype))
    grads = _on_platform(spec, lambda plan: streaming.backward(spec, plan, inp, scaled, wanted))
    return (*_fill(inp, grads), *_NO_GRADS)


_per_token.defvjp(_per_token_fwd, _per_token_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _summed(spec, x, w, bias, rows, columns, real_columns, teacher):
    inp = Inputs(x, w, bias, rows, columns, real_columns, teacher)
    return jnp.sum(_on_platform(spec, lambda plan: streaming.forward(spec, plan, inp)[0]))


def _summed_fwd(spec, *args):
    values, perturbed = _unwrap(args)
    inp = Inputs(*values)
    wanted = _wanted(inp, perturbed)
    total, dx, dw, db = _on_platform(
        spec, lambda plan: single_pass.loss_and_grads(spec, plan, inp, wanted)
    )
    return total, (inp, dx, dw, db)


def _summed_bwd(spec, res, g):
    inp, dx, dw, db = res
    if isinstance(g, SymbolicZero):
        return (*_zero_cotangents(inp), *_NO_GRADS)
    grads = tuple(
        None if gr is None else (g.astype(gr.dtype) * gr).astype(like.dtype)
        for gr, like in zip((dx, dw, db), (inp.x, inp.w, inp.bias), strict=True)
    )
    return (*_fill(inp, grads), *_NO_GRADS)


_summed.defvjp(_summed_fwd, _summed_bwd, symbolic_zeros=True)


def per_token_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """Per-token losses ``[N]`` of ``x [N, D] @ w [D, V] (+ bias [V])``, streaming schedule.

    ``rows``/``columns``: the loss's per-token / per-column inputs (pytrees of ``[N]`` /
    ``[V]`` arrays, constants); ``real_columns``: bool ``[V]``, False on padding columns
    (with ``spec.num_classes``), or None; ``teacher``: ``(x_t [N, D_t], w_t, bias_t)``
    (``w_t`` in ``w``'s layout, ``bias_t`` or None), a second logits stream, or None.
    Differentiable in ``x``, ``w`` and ``bias`` (the teacher is a constant).
    """
    return _per_token(spec, x, w, bias, rows, columns, real_columns, teacher)


def summed_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """``sum_n loss_n`` with the single-pass schedule (every plan's ``vocab_block >= V``;
    one device's whole vocabulary)."""
    return _summed(spec, x, w, bias, rows, columns, real_columns, teacher)
