"""The fused distillation and Jensen-Shannon losses with the output weight split over a
mesh axis (inside ``jax.shard_map``), in the layout of
:func:`jxent.parallel.linear_softmax_cross_entropy`: the teacher's top-k indices and
labels are global class ids, split over the tokens only; a teacher given as hidden
states has its weight split as the student's.
"""

from __future__ import annotations

import jax

from jxent import _docstrings
from jxent import _validation as v
from jxent._fused import options
from jxent._fused.distill import distillation, from_teacher, jensen_shannon
from jxent._fused.options import checked_call
from jxent._split import AxisName


@_docstrings.fill
def linear_distillation_loss(
    x: jax.typing.ArrayLike,
    local_w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike | None,
    teacher: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike],
    *,
    axis_name: AxisName,
    alpha: float = 0.5,
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
    r""":func:`jxent.linear_distillation_loss` (``alpha > 0``, with ``labels``) or
    :func:`jxent.linear_softmax_kl_divergence` (``labels=None``, ``alpha=0``) with the
    output weight split over ``axis_name``, inside ``jax.shard_map``.

    The teacher's top-k ``(indices, log_probs)`` (global class ids) are split over
    the tokens as ``x`` (not over ``axis_name``); each shard reads the student's
    logits at the indices it owns, and the combine sums them. A teacher given as
    ``(x_t, local_w_t[, local_bias_t])`` has ``x_t`` laid out as ``x`` and its weight's
    columns split over ``axis_name`` as ``local_w``'s.

    Args:
      x: the student's hidden states ``[..., D]``.
      local_w: this shard's ``[D, V_local]`` columns of the student's projection.
      labels: integer global class ids of shape ``x.shape[:-1]``, or ``None`` with
        ``alpha=0`` (the KL divergence alone).
      teacher: ``(indices, log_probs)`` of shape ``x.shape[:-1] + (k,)``, or the
        teacher's hidden states and this shard's columns of its weight, ``(x_t
        [..., D_t], local_w_t [D_t, V_local])`` (optionally a third entry, its bias's
        ``[V_local]`` slice).
      axis_name: the mesh axis (or axes) the vocabulary is split over.
      alpha: the cross-entropy's share in ``[0, 1]`` (static).
      temperature: :math:`T > 0` (static).
      bias: this shard's ``[V_local]`` slice of the bias, or ``None``.
      where: boolean mask of shape ``x.shape[:-1]``; False drops a token.
      <token_weights_teacher_split>
      <normalizer_split>
      logit_soft_cap: :math:`c > 0`, or ``None``.
      <reduction_split>
      num_classes: the true vocabulary size when the last shard is padded.
      batch_axis_name: the data-parallel mesh axis (or axes) for a global reduction.
      chunk_size: blocks on each shard.
      <w_layout_teacher_split>
      <implementation>
      <precision>
      <filter_eps>

    Returns:
      <returns_split>

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_distillation_loss` and
        :func:`jxent.parallel.linear_softmax_cross_entropy`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import jxent
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> top = jax.lax.top_k(jax.nn.log_softmax(jnp.array([[1.0, 0.0, -1.0],
      ...                                                    [0.0, 2.0, 0.5]])), 2)[::-1]
      >>> fn = jax.shard_map(
      ...     lambda x, w, i, l: jxent.parallel.linear_distillation_loss(
      ...         x, w, None, (i, l), axis_name="model", alpha=0.0),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P(), P()), out_specs=P())
      >>> put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      >>> got = jax.jit(fn)(put(x), put(w, None, "model"), put(top[0]), put(top[1]))
      >>> bool(jnp.allclose(got, jxent.linear_softmax_kl_divergence(x, w, top)))
      True

    References:
      Hinton, Vinyals & Dean, `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015.
    """
    alpha = v.static_number("alpha", alpha, lo=0, hi=1)
    if alpha > 0 and labels is None:
        raise TypeError("labels must be given (integer class ids) when alpha > 0, got None.")
    call = checked_call(
        x,
        local_w,
        labels if alpha > 0 else None,
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
    return from_teacher(call, teacher, lambda k, t: distillation(t, alpha, k))


@_docstrings.fill
def linear_softmax_jensen_shannon_divergence(
    x: jax.typing.ArrayLike,
    local_w: jax.typing.ArrayLike,
    teacher: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike],
    *,
    axis_name: AxisName,
    beta: float = 0.5,
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
    r""":func:`jxent.linear_softmax_jensen_shannon_divergence` with the output weight split
    over ``axis_name``, inside ``jax.shard_map``.

    The teacher's top-k ``(indices, log_probs)`` (global class ids) are split over the
    tokens as ``x``; each shard reads the student's logits at the classes it owns, and
    the combine sums them with the log-sum-exp's numbers (one ``pmax``, one ``psum``).
    A teacher given as ``(x_t, local_w_t[, local_bias_t])`` has its weight split as
    ``local_w``: the log-sum-exps combine as above, then the second pass's sums over each
    shard's columns in one more ``psum``.

    Args:
      x: the student's hidden states ``[..., D]``.
      local_w: this shard's ``[D, V_local]`` columns of the student's projection.
      teacher: ``(indices, log_probs)`` of shape ``x.shape[:-1] + (k,)``, the classes
        with a finite log-probability distinct within a token; or the teacher's hidden
        states and this shard's columns of its weight, ``(x_t [..., D_t], local_w_t
        [D_t, V_local])`` (optionally a third entry, its bias's ``[V_local]`` slice).
      axis_name: the mesh axis (or axes) the vocabulary is split over.
      beta: :math:`\beta` (static): in ``[0, 1)`` with a top-k teacher, ``[0, 1]`` with
        its hidden states.
      temperature: :math:`T > 0` (static; divides the student's logits, and a
        hidden-state teacher's).
      bias: this shard's ``[V_local]`` slice of the bias, or ``None``.
      where: boolean mask of shape ``x.shape[:-1]``; False drops a token.
      <token_weights_teacher_split>
      <normalizer_split>
      logit_soft_cap: :math:`c > 0`, or ``None``.
      <reduction_split>
      num_classes: the true vocabulary size when the last shard is padded.
      batch_axis_name: the data-parallel mesh axis (or axes) for a global reduction.
      chunk_size: blocks on each shard.
      <w_layout_teacher_split>
      <implementation>
      <precision>
      <filter_eps>

    Returns:
      <returns_split>

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_softmax_jensen_shannon_divergence`
        and :func:`jxent.parallel.linear_softmax_cross_entropy`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import jxent
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> top = jax.lax.top_k(jax.nn.log_softmax(jnp.array([[1.0, 0.0, -1.0],
      ...                                                    [0.0, 2.0, 0.5]])), 2)[::-1]
      >>> fn = jax.shard_map(
      ...     lambda x, w, i, l: jxent.parallel.linear_softmax_jensen_shannon_divergence(
      ...         x, w, (i, l), axis_name="model", beta=0.3),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P(), P()), out_specs=P())
      >>> put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      >>> got = jax.jit(fn)(put(x), put(w, None, "model"), put(top[0]), put(top[1]))
      >>> want = jxent.linear_softmax_jensen_shannon_divergence(x, w, top, beta=0.3)
      >>> bool(jnp.allclose(got, want))
      True

    References:
      Agarwal et al., `On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes <https://arxiv.org/abs/2306.13649>`_, 2024.
    """
    beta = options.jensen_shannon_beta(beta, teacher)
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
    return from_teacher(call, teacher, lambda k, t: jensen_shannon(beta, k))
