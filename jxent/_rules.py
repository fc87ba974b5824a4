"""The custom-derivative pattern every loss family shares, and ``shard_map`` typing.

:func:`custom_jvp_loss` is how a logits loss is written (the binary, divergence and poly
families; the categorical core follows the same pattern with its own config): a forward
pass that returns the loss and a few per-row statistics, and a tangent rule linear in
the inputs' tangents, checkpointed so that reverse mode keeps only the inputs and those
statistics and recomputes everything else in the transposed pass.

:func:`varying`, :func:`vary_like` and :func:`sum_to_type` read and fix the mesh axes a
value varies over inside ``jax.shard_map`` (``check_vma=True``): the fused losses'
loops and the ``jxent.parallel`` rules need them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def custom_jvp_loss(forward, tangent):
    """A ``custom_jvp`` loss ``f(cfg, *arrays)`` from a forward and a tangent rule.

    ``forward(cfg, *arrays) -> (loss, stats)``; ``tangent(cfg, arrays, stats, dots)``
    is linear in ``dots`` (one per array, ``None`` where the input is not
    perturbed: a symbolic zero, so an input that is not differentiated costs
    nothing). The tangent is checkpointed, so the transposed rule recomputes what
    it needs from ``arrays`` and the per-row ``stats``.
    """

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def f(cfg, *arrays):
        return forward(cfg, *arrays)[0]

    def jvp(cfg, primals, tangents):
        loss, stats = forward(cfg, *primals)
        dots = tuple(None if type(d) is SymbolicZero else d for d in tangents)
        if all(d is None for d in dots):
            return loss, jnp.zeros_like(loss)
        out = jax.checkpoint(functools.partial(tangent, cfg))(primals, stats, dots)
        return loss, out

    f.defjvp(jvp, symbolic_zeros=True)
    return f


def varying(a) -> frozenset:
    """The mesh axes a value (or an abstract value) varies over inside ``shard_map``."""
    # Abstract values and jax.eval_shape's results carry the type; arrays and tracers
    # give it through jax.typeof.
    aval = a if hasattr(a, "manual_axis_type") else jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset() if manual is None else frozenset(manual.varying)


def vary_like(carry, out):
    """``carry``, cast to vary over every mesh axis the matching leaf of ``out`` varies over.

    Inside ``shard_map`` a loop needs carries of equal types, and zeros made before it
    vary over no axis while the body's results vary with its operands.
    """

    def cast(c, o):
        missing = tuple(sorted(varying(o) - varying(c)))
        return lax.pcast(c, missing, to="varying") if missing else c

    return jax.tree.map(cast, carry, out)


def sum_to_type(ct: jax.Array | None, primal: jax.Array | None) -> jax.Array | None:
    """A cotangent summed over the mesh axes it varies over but its primal does not.

    This is the sum autodiff would insert where a replicated value meets a sharded
    one (``x`` replicated over the vocabulary axis feeds every shard's logits: ``dx``
    is summed over that axis; ``w`` replicated over the data axis meets every data
    shard's tokens: ``dw`` is summed over it). Outside ``shard_map``, or with
    ``check_vma=False``, nothing varies and nothing is summed here.
    """
    if ct is None or primal is None:
        return ct
    extra = tuple(sorted(varying(ct) - varying(primal)))
    return lax.psum(ct, extra) if extra else ct
