"""The fused log-probabilities and entropy with the output weight split over a mesh axis
(inside ``jax.shard_map``): each shard runs the blocked engine on its own columns of
``w``, and the engine's vocabulary-parallel combine gives every shard the whole
vocabulary's per-token numbers (one ``pmax``, one ``psum``). The layout is that of
:func:`jxent.parallel.linear_softmax_cross_entropy`; labels are global class ids, split
over the tokens only.

Internal API (``jxent.parallel._linear_distillation`` builds on these):
:func:`split_inputs`, :func:`split_labels`, :func:`run_split`, :func:`static_options`,
``TOKENS_SPEC``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jxent import _validation as v
from jxent._fused import contract, driver, engine, plan
from jxent._fused.logits import compute_dtype
from jxent._fused.logprobs import LabelRows, LogProbs
from jxent._reduction import reduce_across
from jxent.parallel._split import (
    AxisName,
    Layout,
    check_split,
    check_unsplit,
    local_labels,
    real_columns,
    vocab_layout,
)

TOKENS_SPEC = 'P("data") as x\'s tokens'


def split_inputs(x, local_w, labels, bias, where, axis_name, num_classes, w_layout):
    """Checked arrays, the split, and the token mask (flattened later)."""
    x, w, labels, bias, _, row_mask = v.linear_inputs(
        x,
        local_w,
        labels,
        bias,
        None,
        where,
        w_name="local_w",
        w_shape="(D, V_local) = ({D}, columns on this shard)",
        per_column="this shard's slice of the columns",
        w_layout=w_layout,
    )
    v.check_dtypes(x, w, bias)
    split = vocab_layout(axis_name, w.shape[1 if w_layout == "dv" else 0], num_classes)
    check_split("local_w", w, split)
    check_unsplit("x", x, split, 'P("data", None) for x beside local_w in P(None, "model")')
    check_unsplit("labels", labels, split, TOKENS_SPEC)
    check_unsplit("where", row_mask, split, TOKENS_SPEC)
    return x, w, labels, bias, row_mask, split


def split_labels(split: Layout, labels, n):
    """``(local column or -1, the label is a class)`` of global labels, ``[N]``."""
    if labels is None:
        return None, None
    flat = labels.reshape(n)
    if flat.dtype != jnp.int64:
        flat = flat.astype(jnp.int32)
    here, _ = local_labels(split, flat)
    return here, (flat >= 0) & (flat < split.num_classes)


def run_split(
    loss, x, w, bias, rows, split: Layout, *, chunk_size, soft_cap, temperature, w_layout,
    teacher=None,
):  # fmt: skip
    """Per-token output(s) ``[N]`` of ``loss`` over the whole (split) vocabulary."""
    n, d = math.prod(x.shape[:-1]), x.shape[-1]
    cdt = compute_dtype(x, w, bias)
    acc = v.accumulation_dtype(cdt)
    # The streaming schedule with contiguous blocks: this shard's columns are its own.
    plans, _ = plan.plans(
        n,
        d,
        w.shape[1 if w_layout == "dv" else 0],
        "none",
        chunk_size,
        jnp.dtype(acc).itemsize,
        grouped=False,
        float32=cdt == jnp.float32,
        scatters=getattr(loss, "scatters", False) or teacher is not None,
    )
    spec = contract.Spec(
        loss,
        plans,
        soft_cap,
        split.num_classes,
        split.axis_name,
        temperature=None if temperature == 1 else temperature,
        w_layout=w_layout,
    )
    real = real_columns(split)
    return engine.per_token_loss(spec, x.reshape(n, d), w, bias, rows, None, real, teacher)


def static_options(temperature, logit_soft_cap):
    temperature = v.static_number("temperature", temperature, lo=0, lo_open=True)
    if logit_soft_cap is not None:
        logit_soft_cap = v.static_number("logit_soft_cap", logit_soft_cap, lo=0, lo_open=True)
    return temperature, logit_soft_cap


def linear_log_probs(
    x: jax.typing.ArrayLike,
    local_w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis_name: AxisName,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    logit_soft_cap: float | None = None,
    num_classes: int | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    w_layout: str = "dv",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r""":func:`jxent.linear_log_probs` with the output weight split over ``axis_name``.

    Call it inside ``jax.shard_map`` with the layout of
    :func:`jxent.parallel.linear_softmax_cross_entropy`: ``x`` and ``labels`` (global
    token ids) the same on every shard of ``axis_name``, ``local_w`` this shard's
    ``[D, V_local]`` columns (padded at the end to equal shards, with ``num_classes``).
    The result (and the entropy) is the whole vocabulary's, equal on every shard; the
    backward pass sums ``dx`` over ``axis_name``.

    Args:
      x: hidden states ``[..., D]``.
      local_w: this shard's ``[D, V_local]`` columns of the output projection.
      labels: integer global token ids of shape ``x.shape[:-1]``.
      axis_name: the mesh axis (or axes) the vocabulary is split over.
      temperature: :math:`T > 0` (static).
      return_entropy: also return the per-token entropy.
      bias: this shard's ``[V_local]`` slice of the bias, or ``None``.
      where: boolean mask of shape ``x.shape[:-1]``; False gives 0.
      logit_soft_cap: :math:`c > 0`, or ``None``.
      num_classes: the true vocabulary size when the last shard is padded.
      chunk_size: blocks on each shard, as :func:`jxent.linear_softmax_cross_entropy`.
      w_layout: ``"dv"`` (default): ``local_w`` is ``[D, V_local]`` (and a teacher's
        ``local_w_t`` ``[D_t, V_local]``); ``"vd"``: this shard's ``[V_local, D]`` rows of
        a tied embedding table, read in place.

    Returns:
      ``log_probs`` of shape ``x.shape[:-1]`` (float32; float64 for float64 inputs), or
      ``(log_probs, entropy)``.

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_log_probs` and
        :func:`jxent.parallel.linear_softmax_cross_entropy`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import jxent
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> labels = jnp.array([1, 0])
      >>> fn = jax.shard_map(
      ...     lambda x, w, y: jxent.parallel.linear_log_probs(x, w, y, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P())
      >>> put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      >>> got = jax.jit(fn)(put(x), put(w, None, "model"), put(labels))
      >>> bool(jnp.allclose(got, jxent.linear_log_probs(x, w, labels)))
      True

    References:
      Shoeybi et al., `Megatron-LM <https://arxiv.org/abs/1909.08053>`_, 2019.
    """
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}.")
    outputs, _ = _log_probs(
        x,
        local_w,
        labels,
        return_entropy,
        axis_name=axis_name,
        temperature=temperature,
        bias=bias,
        where=where,
        logit_soft_cap=logit_soft_cap,
        num_classes=num_classes,
        chunk_size=chunk_size,
        w_layout=w_layout,
    )
    return outputs if return_entropy else outputs[0]


def _log_probs(
    x, local_w, labels, entropy, *, axis_name, temperature, bias, where, logit_soft_cap,
    num_classes, chunk_size, w_layout,
):  # fmt: skip
    """:class:`LogProbs`'s outputs (``log p_y`` with ``labels``, then ``H`` with
    ``entropy``), shaped as the tokens, and the token mask."""
    x, w, labels, bias, row_mask, split = split_inputs(
        x, local_w, labels, bias, where, axis_name, num_classes, w_layout
    )
    temperature, soft_cap = static_options(temperature, logit_soft_cap)
    batch_shape = x.shape[:-1]
    n = math.prod(batch_shape)
    here, valid = split_labels(split, labels, n)
    keep = None if row_mask is None else row_mask.reshape(n)
    outputs = run_split(
        LogProbs(label=labels is not None, entropy=entropy),
        x,
        w,
        bias,
        LabelRows(here, valid, keep),
        split,
        chunk_size=chunk_size,
        soft_cap=soft_cap,
        temperature=temperature,
        w_layout=w_layout,
    )
    return tuple(o.reshape(batch_shape) for o in outputs), row_mask


def linear_entropy(
    x: jax.typing.ArrayLike,
    local_w: jax.typing.ArrayLike,
    *,
    axis_name: AxisName,
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    token_weights: jax.typing.ArrayLike | None = None,
    normalizer: jax.typing.ArrayLike | None = None,
    logit_soft_cap: float | None = None,
    reduction: str = "mean",
    num_classes: int | None = None,
    batch_axis_name: AxisName | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    w_layout: str = "dv",
) -> jax.Array:
    r""":func:`jxent.linear_entropy` with the output weight split over ``axis_name``,
    inside ``jax.shard_map`` (the layout of
    :func:`jxent.parallel.linear_softmax_cross_entropy`).

    Args:
      x: hidden states ``[..., D]``.
      local_w: this shard's ``[D, V_local]`` columns of the output projection.
      axis_name: the mesh axis (or axes) the vocabulary is split over.
      temperature: :math:`T > 0` (static).
      bias: this shard's ``[V_local]`` slice of the bias, or ``None``.
      where: boolean mask of shape ``x.shape[:-1]``; False drops a token.
      token_weights: float per-token weights (constants) multiplying each entropy;
        ``"mean"`` divides by their sum over the kept tokens.
      normalizer: a scalar to divide the ``"mean"``'s sum (over every device of
        ``batch_axis_name`` if given) by instead, e.g. the global token count of the
        whole batch; a constant. Only with ``reduction="mean"``.
      logit_soft_cap: :math:`c > 0`, or ``None``.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per token); over this
        device's tokens, or over every device of ``batch_axis_name`` if given.
      num_classes: the true vocabulary size when the last shard is padded.
      batch_axis_name: the data-parallel mesh axis (or axes) for a global reduction.
      chunk_size: blocks on each shard.
      w_layout: ``"dv"`` (default): ``local_w`` is ``[D, V_local]`` (and a teacher's
        ``local_w_t`` ``[D_t, V_local]``); ``"vd"``: this shard's ``[V_local, D]`` rows of
        a tied embedding table, read in place.

    Returns:
      float32 entropies (float64 for float64 inputs) of shape ``x.shape[:-1]``, or
      their sum or mean; equal on every shard of ``axis_name``.

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_entropy` and
        :func:`jxent.parallel.linear_softmax_cross_entropy`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import jxent
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> fn = jax.shard_map(
      ...     lambda x, w: jxent.parallel.linear_entropy(x, w, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model")), out_specs=P())
      >>> put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      >>> got = jax.jit(fn)(put(x), put(w, None, "model"))
      >>> bool(jnp.allclose(got, jxent.linear_entropy(x, w)))
      True

    References:
      Mnih et al., `Asynchronous Methods for Deep Reinforcement Learning
      <https://arxiv.org/abs/1602.01783>`_, 2016 (the entropy bonus).
    """
    v.check_reduction(reduction)
    (h,), row_mask = _log_probs(
        x,
        local_w,
        None,
        True,
        axis_name=axis_name,
        temperature=temperature,
        bias=bias,
        where=where,
        logit_soft_cap=logit_soft_cap,
        num_classes=num_classes,
        chunk_size=chunk_size,
        w_layout=w_layout,
    )
    weights = driver.token_weights(token_weights, h.shape, h.dtype)
    if weights is not None:
        h = h * weights.reshape(h.shape)
    weight = driver.weighted_denominator(row_mask, weights, h.shape)
    normalizer = v.checked_normalizer(normalizer, reduction, h.dtype)
    return reduce_across(h, reduction, weight, batch_axis_name, normalizer)
