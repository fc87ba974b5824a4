"""``linear_log_probs`` and ``linear_entropy``: per-token log-probabilities and entropy of
``softmax(x @ w / T)`` without the logits array (for RL trainers: PPO, GRPO)."""

from __future__ import annotations

import jax

from jxent import _docstrings
from jxent._fused.logprobs import entropy, log_probs
from jxent._fused.options import checked_bool, checked_call


@_docstrings.fill
def linear_log_probs(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    logit_soft_cap: float | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    w_layout: str = "dv",
    implementation: str | None = None,
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Per-token log-probability of ``labels`` under ``softmax(x @ w / T)``, fused.

    For policy-gradient trainers (PPO, GRPO): the log-probability of each sampled token
    and, with ``return_entropy=True``, the entropy of the token's distribution (for an
    entropy bonus), from the hidden states, without the ``[tokens, V]`` logits. With
    :math:`z = c \tanh((x W + b) / c) / T` (no cap if ``logit_soft_cap`` is None),

    .. math::
      \log p_y = z_y - \mathrm{lse}(z), \qquad
      H = \mathrm{lse}(z) - \sum_k p_k z_k .

    Both are differentiable in ``x``, ``w`` and ``bias`` (reverse mode), computed with
    the streaming schedule of :func:`jxent.linear_softmax_cross_entropy` (logits in
    float32 blocks, an online log-sum-exp, four matrix products of the size of ``x @ w``
    when differentiated). ``log_probs`` equals ``-linear_softmax_cross_entropy(x, w / T,
    labels, reduction="none")`` and ``jax.nn.log_softmax(x @ w / T)[label]``.

    Args:
      x: hidden states ``[..., D]``, floating.
      w: the output projection ``[D, V]``.
      labels: integer token ids of shape ``x.shape[:-1]``.
      temperature: :math:`T > 0`, a static Python number (sampling temperature).
      return_entropy: also return the per-token entropy :math:`H`.
      bias: optional ``[V]`` bias.
      where: optional boolean mask of shape ``x.shape[:-1]``: False gives 0 (and zero
        gradient) for that token, e.g. the prompt or padding.
      logit_soft_cap: :math:`c > 0` to soft-cap the logits before the temperature, or
        ``None``.
      chunk_size: blocks as in :func:`jxent.linear_softmax_cross_entropy`.
      num_classes: the number of real classes when ``w`` has padding columns after
        them (they take no part and get zero gradient).
      <w_layout>
      <implementation>
      <precision>
      <filter_eps>

    Returns:
      ``log_probs`` of shape ``x.shape[:-1]`` in float32 (float64 for float64 inputs),
      or ``(log_probs, entropy)``. A token kept by ``where`` whose label is outside
      ``[0, num_classes)`` gets NaN.

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_softmax_cross_entropy`, and for a
        ``temperature`` that is not a positive number.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jxent
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> labels = jnp.array([1, 0])
      >>> log_p, h = jxent.linear_log_probs(x, w, labels, temperature=0.7,
      ...                                   return_entropy=True)
      >>> want = jnp.take_along_axis(jax.nn.log_softmax(x @ w / 0.7), labels[:, None], -1)
      >>> bool(jnp.allclose(log_p, want[:, 0], atol=1e-6))
      True
      >>> p = jax.nn.softmax(x @ w / 0.7)
      >>> bool(jnp.allclose(h, -jnp.sum(p * jnp.log(p), -1), atol=1e-6))
      True

    References:
      Schulman et al., `Proximal Policy Optimization Algorithms
      <https://arxiv.org/abs/1707.06347>`_, 2017.
      Shao et al., `DeepSeekMath (GRPO) <https://arxiv.org/abs/2402.03300>`_, 2024.
    """
    if labels is None:
        raise TypeError("labels must be an integer array of shape x.shape[:-1], got None.")
    return_entropy = checked_bool("return_entropy", return_entropy)
    call = checked_call(
        x,
        w,
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
    )
    outputs = log_probs(call, return_entropy)
    return outputs if return_entropy else outputs[0]


@_docstrings.fill
def linear_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    token_weights: jax.typing.ArrayLike | None = None,
    normalizer: jax.typing.ArrayLike | None = None,
    logit_soft_cap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    w_layout: str = "dv",
    implementation: str | None = None,
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
) -> jax.Array:
    r"""The entropy of ``softmax(x @ w / T)``, fused (no ``[tokens, V]`` logits): its mean
    over the kept tokens (the default, as every fused loss), or per token.

    .. math::
      H = \mathrm{lse}(z) - \sum_k p_k z_k = -\sum_k p_k \log p_k,
      \qquad z = c \tanh((x W + b) / c) / T, \quad p = \mathrm{softmax}(z),

    computed as :math:`\log s + \sum_k e^{z_k - m} (m - z_k) / s` (every term
    non-negative: no cancellation), with gradient
    :math:`\partial H / \partial z_k = -p_k (\log p_k + H)`. Equals
    :func:`jxent.entropy` of the logits.

    Args:
      x: hidden states ``[..., D]``, floating.
      w: the output projection ``[D, V]``.
      temperature: :math:`T > 0`, a static Python number.
      bias: optional ``[V]`` bias.
      where: optional boolean mask of shape ``x.shape[:-1]``; False drops a token.
      token_weights: optional float weights of shape ``x.shape[:-1]`` (constants)
        multiplying each token's entropy; ``"mean"`` divides by their sum over the
        kept tokens.
      <normalizer>
      logit_soft_cap: :math:`c > 0` to soft-cap the logits, or ``None``.
      reduction: ``"mean"`` (default: over the kept tokens, as every fused loss of
        hidden states), ``"sum"``, or ``"none"`` (per token).
      chunk_size: blocks as in :func:`jxent.linear_softmax_cross_entropy`.
      num_classes: the number of real classes when ``w`` has padding columns.
      <w_layout>
      <implementation>
      <precision>
      <filter_eps>

    Returns:
      float32 entropies (float64 for float64 inputs) of shape ``x.shape[:-1]``, or
      their sum or mean.

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_log_probs`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jxent
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> h = jxent.linear_entropy(x, w, reduction="none")
      >>> bool(jnp.allclose(h, jxent.entropy(x @ w), atol=1e-6))
      True
      >>> bool(jnp.allclose(jxent.linear_entropy(x, w), h.mean()))
      True

    References:
      Mnih et al., `Asynchronous Methods for Deep Reinforcement Learning
      <https://arxiv.org/abs/1602.01783>`_, 2016 (the entropy bonus).
    """
    call = checked_call(
        x,
        w,
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
    )
    return entropy(call)
