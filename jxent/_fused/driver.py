"""One run of any fused loss, on one device's ``w`` or a vocabulary split over a mesh
axis: plans, the engine's spec, the schedule, and the reduction.

A loss (``xent``, ``logprobs``, ``distill``) takes a checked :class:`~jxent._fused.
options.Call`, builds its loss object and per-token inputs (reading its labels' or a
teacher's classes with :func:`class_columns`), and calls :func:`run`; :func:`reduce`
turns what ``run`` returned into the ``reduction`` the caller asked for (over every
device of ``batch_axis_name`` when the tokens are split).

* **One device** (``Options.split`` None): grouped blocks (GSPMD partitions them under
  ``jax.jit``), and the single pass when the plan takes it (a summed or averaged loss
  with a small ``[D, V]``).
* **A vocabulary split** (``Options.split``, inside ``shard_map``): the streaming
  schedule with contiguous blocks (this shard's columns are its own already), the
  engine's combine across the shards (``Spec.axis_name``), the padding columns of the
  last shard marked.

A symbolic number of tokens (``jax.export`` with ``symbolic_shape("n, D")``, one
device): the plan's token block depends on ``D`` and ``V`` alone
(``jxent._fused.plan``), and :func:`run` pads the tokens (``x``, the loss's per-token
inputs, a teacher's hidden states) with zeros to a multiple of it, marks the padded
tokens dropped (the ``keep`` field of the loss's rows: loss 0, gradient 0), and slices
the per-token results back (:func:`pad_tokens`, :func:`unpad_tokens`). A static number
of tokens is never padded.

Internal API: :func:`run`, :func:`reduce`, :func:`real_columns`, :func:`class_columns`,
:func:`flat`,
:func:`weighted_denominator`, :func:`pad_tokens`, :func:`unpad_tokens`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jxent._fused import contract, engine, plan
from jxent._fused.logits import compute_dtype
from jxent._fused.options import Call
from jxent._reduction import reduce_across, safe_divide
from jxent._split import local_labels
from jxent._split import real_columns as split_real_columns


def run(loss: contract.FusedLoss, call: Call, rows, columns=None, teacher=None, *, per_token=False):
    """``(result, summed)``: the loss's per-token output(s) ``[N]`` from the streaming
    schedule, or, when the plan takes the single pass (one device's summed or averaged
    loss with a small ``[D, V]``; never with ``per_token``), their sum over the tokens
    with ``summed=True``. ``rows``/``columns``: the loss's per-token / per-column inputs;
    ``teacher``: ``(x_t [N, D_t], w_t, bias_t)`` with ``w_t`` in ``w``'s layout over the
    same columns, a second logits stream (a constant), or None."""
    opts = call.options
    n, d = math.prod(call.batch_shape), call.x.shape[-1]
    x = call.x.reshape(n, d)
    cols = call.columns
    cdt = compute_dtype(call.x, call.w, call.bias)
    one_device = opts.split is None
    # Per token when asked, when split (the single pass needs the whole vocabulary's
    # softmax per block), and when the tokens are split (the mean's sums cross devices).
    per_token = per_token or not one_device or opts.batch_axis_name is not None
    if per_token and opts.schedule == "single_pass":
        raise ValueError(
            'schedule="single_pass" computes the loss summed over the tokens, on one '
            "device's whole vocabulary: not with per-token outputs (return_lse), a split "
            'vocabulary or tokens split over devices; use schedule="auto" there.'
        )
    plans, single_pass = plan.plans(
        n,
        d,
        cols,
        "none" if per_token else opts.reduction,
        opts.chunk_size,
        jnp.dtype(call.acc).itemsize,
        # A split's shard holds its own columns: contiguous blocks.
        grouped=one_device,
        float32=cdt == jnp.float32,
        # A teacher's logits block sits beside the student's: smaller panels, as for a
        # loss that scatters into its block.
        scatters=getattr(loss, "scatters", False) or teacher is not None,
        schedule=opts.schedule,
        precision=opts.precision,
    )
    if one_device:
        num_classes = None if opts.num_classes == cols else opts.num_classes
    else:
        num_classes = opts.split.num_classes
    spec = contract.Spec(
        loss,
        plans,
        opts.soft_cap,
        num_classes,
        None if one_device else opts.split.axis_name,
        temperature=opts.temperature,
        w_layout=opts.w_layout,
        filter_eps=opts.filter_eps,
    )
    spec = spec._replace(implementation=engine.choose(opts.implementation, spec))
    x, rows, teacher = pad_tokens(plans, x, rows, teacher)
    args = (x, call.w, call.bias, rows, columns, real_columns(call), teacher)
    if single_pass:
        return engine.summed_loss(spec, *args), True
    return unpad_tokens(engine.per_token_loss(spec, *args), n), False


def real_columns(call: Call) -> jax.Array | None:
    """bool ``[columns]``: False on ``w``'s padding columns (this shard's, when split), or
    None when every column is a class."""
    opts = call.options
    if opts.split is not None:
        return split_real_columns(opts.split)
    return jnp.arange(call.columns) < opts.num_classes if opts.num_classes < call.columns else None


def class_columns(call: Call, index: jax.Array, *, known: bool = False):
    """``(column, known)`` of global class ids ``index`` (``[N]`` or ``[N, k]``): each
    one's column in this device's ``w`` as int32, -1 where it is not a class or lies on
    another shard; and whether it is one of the real classes (bool), which on one
    device is None unless ``known`` (``column >= 0`` says it there). Range is checked
    in the ids' own dtype, so a wide id cannot wrap into range."""
    opts = call.options
    is_class = (index >= 0) & (index < opts.num_classes)
    if opts.split is None:
        return jnp.where(is_class, index, -1).astype(jnp.int32), (is_class if known else None)
    flat = index if index.dtype == jnp.int64 else index.astype(jnp.int32)
    here, _ = local_labels(opts.split, flat)
    return here, is_class


def flat(a: jax.Array | None) -> jax.Array | None:
    """A per-token array ``[N]`` from its batch shape (None stays None)."""
    return None if a is None else a.reshape(-1)


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


def reduce(call: Call, result, summed: bool, weight):
    """The loss of ``run``'s ``(result, summed)`` under the call's reduction: per token
    (of the batch shape), the sum, or the mean over the normalizer if given, else over
    the sum of the per-token ``weight`` (None: every token counts once; 0 if none
    counts); summed over the devices of ``batch_axis_name`` when the tokens are split."""
    opts, batch_shape = call.options, call.batch_shape
    if opts.split is not None or opts.batch_axis_name is not None:
        loss = result.reshape(batch_shape)
        return reduce_across(loss, opts.reduction, weight, opts.batch_axis_name, call.normalizer)
    if not summed:
        per_token = result.reshape(batch_shape)
        if opts.reduction == "none":
            return per_token
        result = jnp.sum(per_token)
    if opts.reduction == "sum":
        return result
    if call.normalizer is not None:
        return result / call.normalizer.astype(result.dtype)
    if weight is None:
        return result / max(math.prod(batch_shape), 1)
    return safe_divide(result, jnp.sum(weight.astype(result.dtype)))


def weighted_denominator(call: Call, weight):
    """The ``"mean"``'s per-token denominator terms with the call's token weights:
    ``weight`` (a token mask, the labels' class weights, or None for every token once)
    times the token weights; a dropped token's weight is selected away."""
    if call.token_weights is None:
        return weight
    tw = call.token_weights.reshape(call.batch_shape)
    if weight is None:
        return tw
    if weight.dtype == jnp.bool_:
        return jnp.where(weight, tw, jnp.zeros((), tw.dtype))
    return weight.astype(tw.dtype) * tw
