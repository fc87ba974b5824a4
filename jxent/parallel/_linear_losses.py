"""The fused log-probabilities and entropy with the output weight split over a mesh axis
(inside ``jax.shard_map``): each shard runs the blocked engine on its own columns of
``w``, and the engine's vocabulary-parallel combine gives every shard the whole
vocabulary's per-token numbers (one ``pmax``, one ``psum``). The layout is that of
:func:`jxent.parallel.linear_softmax_cross_entropy`; labels are global class ids, split
over the tokens only. The signatures and documentation; the arguments are checked by
``jxent._fused.options.checked_call`` and the losses are ``jxent._fused.logprobs``'s.
"""

from __future__ import annotations

import jax

from jxent import _docstrings
from jxent._fused.logprobs import entropy, log_probs
from jxent._fused.options import checked_bool, checked_call
from jxent._split import AxisName


@_docstrings.fill
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
    implementation: str | None = None,
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
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
      <w_layout_split>
      <implementation>
      <precision>
      <filter_eps>

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
    return_entropy = checked_bool("return_entropy", return_entropy)
    call = checked_call(
        x,
        local_w,
        labels,
        bias=bias,
        where=where,
        reduction="none",
        chunk_size=chunk_size,
        logit_soft_cap=logit_soft_cap,
        temperature=temperature,
        num_classes=num_classes,
        w_layout=w_layout,
        implementation=implementation,
        precision=precision,
        filter_eps=filter_eps,
        axis_name=axis_name,
    )
    outputs = log_probs(call, return_entropy)
    return outputs if return_entropy else outputs[0]


@_docstrings.fill
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
    implementation: str | None = None,
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
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
      <normalizer_split>
      logit_soft_cap: :math:`c > 0`, or ``None``.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per token); over this
        device's tokens, or over every device of ``batch_axis_name`` if given.
      num_classes: the true vocabulary size when the last shard is padded.
      batch_axis_name: the data-parallel mesh axis (or axes) for a global reduction.
      chunk_size: blocks on each shard.
      <w_layout_split>
      <implementation>
      <precision>
      <filter_eps>

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
    call = checked_call(
        x,
        local_w,
        bias=bias,
        where=where,
        token_weights=token_weights,
        normalizer=normalizer,
        reduction=reduction,
        chunk_size=chunk_size,
        logit_soft_cap=logit_soft_cap,
        temperature=temperature,
        num_classes=num_classes,
        w_layout=w_layout,
        implementation=implementation,
        precision=precision,
        filter_eps=filter_eps,
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
    )
    return entropy(call)
