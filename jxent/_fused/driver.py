"""One device's run of a fused loss: plans, the schedule, and the reduction.

Every public fused loss validates its arguments, builds its loss object and per-token
inputs, and calls :func:`run`; :func:`reduce` turns what ``run`` returned into the
``reduction`` the caller asked for.

A symbolic number of tokens (``jax.export`` with ``symbolic_shape("n, D")``): the plan's
token block depends on ``D`` and ``V`` alone (``jxent._fused.plan``), and :func:`run`
pads the tokens (``x``, the loss's per-token inputs, a teacher's hidden states) with
zeros to a multiple of it, marks the padded tokens dropped (the ``keep`` field of the
loss's rows: loss 0, gradient 0), and slices the per-token results back
(:func:`pad_tokens`, :func:`unpad_tokens`, for any caller of the engine). A static
number of tokens is never padded.

Internal API: :func:`run`, :func:`reduce`, :func:`token_weights`,
:func:`weighted_denominator`, :func:`pad_tokens`,
:func:`unpad_tokens`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jxent import _validation as v
from jxent._fused import contract, engine, plan
from jxent._fused.logits import compute_dtype
from jxent._reduction import safe_divide


def run(
    loss: contract.FusedLoss,
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    rows,
    columns,
    *,
    num_classes: int,
    reduction: str,
    chunk_size,
    soft_cap: float | None = None,
    temperature: float | None = None,
    per_token: bool = False,
    w_layout: str = "dv",
    teacher=None,
):
    """``(result, summed)`` for ``x [N, D] @ w [D, V]``: the loss's per-token output(s)
    ``[N]`` (``w`` is ``[D, V]``, or ``[V, D]`` with ``w_layout="vd"``) from the streaming
    schedule, or, when the plan takes the single pass (a
    summed or averaged loss with a small ``[D, V]``; never with ``per_token``), their
    sum over the tokens with ``summed=True``. Padding columns (``num_classes < V``) are
    marked for the engine here. ``teacher``: ``(x_t [N, D_t], w_t, bias_t)`` with ``w_t``
    in ``w``'s layout over the same columns, a second logits stream for losses that
    compare the student with a teacher's full distribution (a constant), or None.

    ``N`` may be symbolic (shape polymorphism): see the module docstring."""
    n, d = x.shape
    cols = w.shape[1 if w_layout == "dv" else 0]
    cdt = compute_dtype(x, w, bias)
    acc = v.accumulation_dtype(cdt)
    plans, single_pass = plan.plans(
        n,
        d,
        cols,
        "none" if per_token else reduction,
        chunk_size,
        jnp.dtype(acc).itemsize,
        float32=cdt == jnp.float32,
        # A teacher's logits block sits beside the student's: smaller panels, as for a
        # loss that scatters into its block.
        scatters=getattr(loss, "scatters", False) or teacher is not None,
    )
    spec = contract.Spec(
        loss,
        plans,
        soft_cap,
        None if num_classes == cols else num_classes,
        temperature=temperature,
        w_layout=w_layout,
    )
    real = jnp.arange(cols) < num_classes if num_classes < cols else None
    x, rows, teacher = pad_tokens(plans, x, rows, teacher)
    args = (x, w, bias, rows, columns, real, teacher)
    if single_pass:
        return engine.summed_loss(spec, *args), True
    return unpad_tokens(engine.per_token_loss(spec, *args), n), False


def pad_tokens(plans, x, rows, teacher=None):
    """``(x, rows, teacher)`` for the engine with the ``plans`` of ``plan.plans``: as given
    for a static number of tokens ``N = x.shape[0]``; for a symbolic one, ``x``, the
    per-token ``rows`` (a NamedTuple with a ``keep`` field) and ``teacher``'s hidden
    states padded with zeros to a multiple of every plan's token block, the padded
    tokens dropped (``rows.keep`` False there: they give loss 0 and gradient 0, and
    their zero rows of ``x`` add nothing to ``dw``). :func:`unpad_tokens` takes the
    per-token results back to ``N``."""
    n = x.shape[0]
    if isinstance(n, int):
        return x, rows, teacher
    if not hasattr(rows, "_replace") or "keep" not in rows._fields:
        raise NotImplementedError(
            f"a symbolic number of tokens needs per-token inputs with a keep mask; "
            f"{type(rows).__name__} has none"
        )
    block = math.lcm(*(p.token_block for _, p in plans))
    padded = block * ((n + block - 1) // block)

    def pad(a):
        if a is None:
            return None
        zeros = jnp.zeros((padded - n, *a.shape[1:]), a.dtype)
        return jnp.concatenate([a, zeros], axis=0)

    keep = rows.keep
    if keep is None:
        keep = jnp.ones((n,), jnp.bool_)
    rows = jax.tree.map(pad, rows._replace(keep=keep))
    if teacher is not None:
        teacher = (pad(teacher[0]), *teacher[1:])
    return pad(x), rows, teacher


def unpad_tokens(result, n):
    """The engine's per-token ``result`` (an array or a tuple of them) for the first
    ``n`` tokens of :func:`pad_tokens`'s padded ones (unchanged for a static ``n``)."""
    if isinstance(n, int):
        return result
    return jax.tree.map(lambda a: a[:n], result)


def reduce(result, summed: bool, batch_shape, reduction: str, weight, normalizer=None):
    """The loss of ``run``'s ``(result, summed)`` under ``reduction``: per token (of
    ``batch_shape``), the sum, or the mean over ``normalizer`` if given, else over the
    sum of the per-token ``weight`` (None: every token counts once; 0 if none counts)."""
    if not summed:
        per_token = result.reshape(batch_shape)
        if reduction == "none":
            return per_token
        result = jnp.sum(per_token)
    if reduction == "sum":
        return result
    if normalizer is not None:
        return result / normalizer.astype(result.dtype)
    if weight is None:
        return result / max(math.prod(batch_shape), 1)
    return safe_divide(result, jnp.sum(weight.astype(result.dtype)))


def token_weights(weights, batch_shape, acc, *, name: str = "token_weights"):
    """Checked per-token float weights in ``acc`` (``[N]``), or None."""
    if weights is None:
        return None
    weights = v.as_array(name, weights)
    v.check_floating(name, weights)
    v.check_shape(name, weights, batch_shape, "x.shape[:-1]: one weight per token")
    return jax.lax.stop_gradient(weights.astype(acc).reshape(-1))


def weighted_denominator(weight, weights, batch_shape):
    """The ``"mean"``'s per-token denominator terms with token ``weights`` (``[N]`` or
    None): ``weight`` (a token mask, the labels' class weights, or None for every token
    once) times the token weights; a dropped token's weight is selected away."""
    if weights is None:
        return weight
    tw = weights.reshape(batch_shape)
    if weight is None:
        return tw
    if weight.dtype == jnp.bool_:
        return jnp.where(weight, tw, jnp.zeros((), tw.dtype))
    return weight.astype(tw.dtype) * tw
