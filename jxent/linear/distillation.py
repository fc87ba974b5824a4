"""``linear_softmax_kl_divergence``, ``linear_distillation_loss`` and
``linear_softmax_jensen_shannon_divergence``: knowledge distillation from the student's
hidden states, with the teacher's top-k log-probabilities or the teacher's own hidden
states and weight, without either's ``[tokens, V]`` logits."""

from __future__ import annotations

import jax

from jxent import _docstrings
from jxent import _validation as v
from jxent._fused import options
from jxent._fused.distill import distillation, from_teacher, jensen_shannon
from jxent._fused.options import checked_call


@_docstrings.fill
def linear_softmax_kl_divergence(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    teacher: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike],
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
    schedule: str = "auto",
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
) -> jax.Array:
    r"""Distillation loss from the student's hidden states: KL(teacher || student), fused.

    The teacher is given by its top-k classes and their log-probabilities (the form
    distillation data is stored in offline), or by its own hidden states and output
    weight; the student's logits :math:`z = c \tanh((x W + b)/c) / T` are never
    materialised, nor the teacher's. Per token, with :math:`q = \mathrm{softmax}(z)`
    normalised over the whole vocabulary and the teacher's
    :math:`p_k = \exp(\text{log\_probs}_k)` on its classes :math:`K`,

    .. math::
      \ell = T^2 \sum_{k \in K} p_k \left(\log p_k - \log q_k\right),

    the sum over the ``k`` given classes (all of them if the teacher's full distribution
    is passed as ``k = V``). Computed as
    :math:`T^2 [\sum_k p_k \log p_k + \sum_k p_k (m - z_k) + P \log s]` with
    :math:`m` the row maximum, :math:`s = \sum_j e^{z_j - m}` and :math:`P = \sum_k p_k`
    (no ``exp`` of the difference of logs); classes with :math:`p_k = 0`
    (``log_probs = -inf``) contribute exactly 0. The gradient,
    :math:`\partial \ell / \partial z_j = T^2 (P q_j - p_j [j \in K])` (then through
    the temperature and the cap), flows to ``x``, ``w`` and ``bias``; the teacher is a
    constant. Memory and schedules as :func:`jxent.linear_softmax_cross_entropy`.

    With the teacher as hidden states ``(x_t, w_t[, bias_t])``, :math:`p =
    \mathrm{softmax}(t)` over the whole vocabulary, :math:`t = c \tanh((x_t W_t +
    b_t)/c) / T` (the same cap and temperature as the student's), and the sum runs over
    every class. Each vocabulary block's teacher logits are made beside the student's
    (a second matrix product per block, forward and backward) with their own online
    log-sum-exp :math:`\mathrm{lse}_t`, and the divergence is
    :math:`T^2 [\sum_j p_j (t_j - z_j) - \mathrm{lse}_t + \mathrm{lse}]`; its gradient,
    :math:`T^2 (q_j - p_j)`, recomputes :math:`p` block by block. A class the teacher
    rules out (a ``-inf`` logit, e.g. from ``bias_t``) contributes exactly 0.

    Args:
      x: the student's hidden states ``[..., D]``, floating.
      w: the student's output projection ``[D, V]``.
      teacher: ``(indices, log_probs)``, each of shape ``x.shape[:-1] + (k,)``: the
        teacher's classes (integers; ``-1`` or any index outside ``[0, V)`` may pad
        the top-k where its log-probability is ``-inf``) and its log-probabilities.
        Or ``(x_t, w_t)`` / ``(x_t, w_t, bias_t)``: the teacher's hidden states
        ``x.shape[:-1] + (D_t,)`` (any ``D_t``), its output projection over the same
        columns as ``w`` (``[D_t, V]``, or ``[V, D_t]`` with ``w_layout="vd"``) and an
        optional ``[V]`` bias, floating, accumulating in the student's dtype (float32
        for float32/bfloat16/float16, float64 for float64).
      <temperature_teacher>
      bias: optional ``[V]`` bias.
      where: optional boolean mask of shape ``x.shape[:-1]``; False drops a token.
      <token_weights_teacher>
      <normalizer>
      logit_soft_cap: :math:`c > 0` to soft-cap the student's logits, or ``None``.
      reduction: ``"mean"`` (default: over the kept tokens), ``"sum"`` or ``"none"``.
      chunk_size: blocks as in :func:`jxent.linear_softmax_cross_entropy`.
      num_classes: the number of real classes when ``w`` has padding columns.
      <w_layout>
      <implementation>
      <schedule>
      <precision>
      <filter_eps>

    Returns:
      The loss in float32 (float64 for float64 inputs): a scalar, or per token with
      ``reduction="none"``. A kept token whose teacher puts probability on a class
      outside ``[0, V)`` gets NaN.

    Raises:
      TypeError: non-floating ``x``/``w``/``bias``/``log_probs``, non-integer
        ``indices``, a bad option type.
      ValueError: shapes that do not match, an option out of range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jxent
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2, 0.1], [1.5, 0.3, -0.7, 0.0]])
      >>> teacher_logits = jnp.array([[2.0, 0.5, -1.0, 0.0], [0.1, 1.0, 0.3, -2.0]])
      >>> top = jax.lax.top_k(jax.nn.log_softmax(teacher_logits), 4)[::-1]
      >>> loss = jxent.linear_softmax_kl_divergence(x, w, top)
      >>> want = jxent.softmax_kl_divergence(x @ w, teacher_logits).mean()
      >>> bool(jnp.allclose(loss, want, atol=1e-6))
      True
      >>> # The teacher as hidden states and weight: its logits are never formed either.
      >>> x_t = jnp.array([[0.5, 2.0, -1.0], [1.0, 0.0, 0.5]])
      >>> w_t = jnp.array([[1.0, 0.5, -0.5, 0.0], [0.2, -0.3, 0.8, 0.1],
      ...                  [-0.4, 0.6, 0.0, 1.2]])
      >>> loss = jxent.linear_softmax_kl_divergence(x, w, (x_t, w_t), temperature=2.0)
      >>> want = jxent.softmax_kl_divergence(x @ w, x_t @ w_t, temperature=2.0).mean()
      >>> bool(jnp.allclose(loss, want, atol=1e-6))
      True

    References:
      Hinton, Vinyals & Dean, `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015.
      Hsu et al., `Liger Kernel <https://arxiv.org/abs/2410.10989>`_, 2024 (fused
      distillation losses).
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
        schedule=schedule,
    )
    return from_teacher(call, teacher, lambda k, t: distillation(t, 0.0, k))


@_docstrings.fill
def linear_distillation_loss(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    teacher: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike],
    *,
    alpha: float = 0.5,
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
    schedule: str = "auto",
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
) -> jax.Array:
    r"""Hard-label cross-entropy mixed with distillation, in one fused pass.

    .. math::
      \ell = \alpha\, \mathrm{CE}(z_1, y) + (1 - \alpha)\, T^2\, \mathrm{KL}(p \,\|\,
      \mathrm{softmax}(z_1 / T)),

    with :math:`z_1` the student's (soft-capped) logits ``x @ w + bias`` at
    temperature 1, :math:`y` the label and the KL term exactly that of
    :func:`jxent.linear_softmax_kl_divergence` (from the teacher's top-k or its hidden
    states). Each vocabulary block is read once for
    both terms: the engine keeps the log-sum-exp at temperature :math:`T` and, for the
    cross-entropy, the sum of :math:`e^{T(z_j - m)}` beside it.

    Args:
      x: the student's hidden states ``[..., D]``, floating.
      w: the student's output projection ``[D, V]``.
      labels: integer class indices of shape ``x.shape[:-1]`` (the data's labels).
      teacher: ``(indices, log_probs)`` of the teacher's top-k, or its hidden states
        and weight ``(x_t, w_t[, bias_t])`` (its logits at temperature :math:`T`, capped
        as the student's), as :func:`jxent.linear_softmax_kl_divergence`.
      alpha: :math:`\alpha \in [0, 1]`, the cross-entropy's share (static).
      <temperature_teacher>
      bias: optional ``[V]`` bias.
      where: optional boolean mask of shape ``x.shape[:-1]``; False drops a token.
      <token_weights_teacher>
      <normalizer>
      logit_soft_cap: :math:`c > 0` to soft-cap the student's logits, or ``None``.
      reduction: ``"mean"`` (default: over the kept tokens), ``"sum"`` or ``"none"``.
      chunk_size: blocks as in :func:`jxent.linear_softmax_cross_entropy`.
      num_classes: the number of real classes when ``w`` has padding columns.
      <w_layout>
      <implementation>
      <schedule>
      <precision>
      <filter_eps>

    Returns:
      The loss in float32 (float64 for float64 inputs): a scalar, or per token with
      ``reduction="none"``. A kept token with a label outside ``[0, V)`` gets NaN.

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_softmax_kl_divergence`, and for
        non-integer ``labels`` or their shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jxent
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2, 0.1], [1.5, 0.3, -0.7, 0.0]])
      >>> labels = jnp.array([0, 2])
      >>> teacher_logits = jnp.array([[2.0, 0.5, -1.0, 0.0], [0.1, 1.0, 0.3, -2.0]])
      >>> top = jax.lax.top_k(jax.nn.log_softmax(teacher_logits / 2.0), 2)[::-1]
      >>> loss = jxent.linear_distillation_loss(x, w, labels, top, alpha=0.3,
      ...                                       temperature=2.0)
      >>> loss.shape
      ()

    References:
      Hinton, Vinyals & Dean, `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015.
    """
    alpha = v.static_number("alpha", alpha, lo=0, hi=1)
    if labels is None:
        raise TypeError("labels must be an integer array of shape x.shape[:-1], got None.")
    call = checked_call(
        x,
        w,
        labels,
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
        schedule=schedule,
    )
    return from_teacher(call, teacher, lambda k, t: distillation(t, alpha, k))


@_docstrings.fill
def linear_softmax_jensen_shannon_divergence(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    teacher: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike],
    *,
    beta: float = 0.5,
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
    schedule: str = "auto",
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
) -> jax.Array:
    r"""Generalised Jensen-Shannon divergence from the student's hidden states, fused.

    :func:`jxent.softmax_jensen_shannon_divergence` of the teacher's distribution
    :math:`p` and the student's :math:`q = \mathrm{softmax}(z)`,
    :math:`z = c \tanh((x W + b)/c) / T`, without the student's logits array: with
    :math:`m = \beta p + (1 - \beta) q`,

    .. math::
      \ell = \beta\, \mathrm{KL}(p \,\|\, m) + (1 - \beta)\, \mathrm{KL}(q \,\|\, m),

    and at the ends the two KL divergences it interpolates (Liger Kernel's convention):
    :math:`\beta = 0` the forward :math:`\mathrm{KL}(p \,\|\, q)`, :math:`\beta = 1`
    the reverse :math:`\mathrm{KL}(q \,\|\, p)`. Not scaled by :math:`T^2`. The
    teacher is a constant. Memory and schedules as
    :func:`jxent.linear_softmax_cross_entropy`.

    The teacher's top-k ``(indices, log_probs)``: :math:`p` is 0 off its classes
    :math:`K`, where :math:`m_j = (1 - \beta) q_j`, so the student's mass there enters in
    closed form, :math:`-(1 - Q) \log(1 - \beta)` with :math:`Q = \sum_K q_k`: the loss
    needs only the student's logits at :math:`K` and its log-sum-exp (Agarwal et al.'s
    GKD objective with a top-k teacher); :math:`\beta < 1` (the reverse KL is infinite
    for a top-k teacher: the student's mass off the top-k has no teacher mass to be
    compared with).

    The teacher's hidden states ``(x_t, w_t[, bias_t])``: :math:`p =
    \mathrm{softmax}(t)` over the whole vocabulary, :math:`t = c \tanh((x_t W_t +
    b_t)/c) / T` (the student's cap and temperature), made block by block beside the
    student's logits as in :func:`jxent.linear_softmax_kl_divergence`; :math:`\beta \in
    [0, 1]`. :math:`\log m_j` needs both normalised distributions at every class: a
    first pass over the blocks gives both log-sum-exps, a second one (the blocks made
    again: two more matrix products) the per-token sums
    :math:`\ell = \sum_j [\beta p_j (\log p_j - \log m_j) + (1 - \beta) q_j (\log q_j
    - \log m_j)]` (each term :math:`\ge 0`) and :math:`S = \mathrm{KL}(q \,\|\, m)`,
    with :math:`\log m` a ``logaddexp`` of the two log-probabilities. The gradient,
    :math:`\partial \ell / \partial z_j = (1 - \beta)\, q_j [(\log q_j - \log m_j) -
    S]` (factor 1 at :math:`\beta = 1`, where :math:`m = p`), recomputes both
    distributions block by block. :math:`\beta = 0` takes one pass (the KL's). A class
    the teacher rules out (a ``-inf`` logit, e.g. from ``bias_t``, uncapped) has
    :math:`p = 0` and contributes exactly 0 to the teacher's terms; with
    :math:`\beta = 1` it makes the loss :math:`+\infty`.

    Args:
      x: the student's hidden states ``[..., D]``, floating.
      w: the student's output projection ``[D, V]``.
      teacher: ``(indices, log_probs)`` of the teacher's top-k, each of shape
        ``x.shape[:-1] + (k,)``, the classes with a finite log-probability distinct
        within a token (as ``jax.lax.top_k`` gives them); entries with log-probability
        ``-inf`` may hold any index. Or ``(x_t, w_t)`` / ``(x_t, w_t, bias_t)``: the
        teacher's hidden states, output projection and optional bias, as
        :func:`jxent.linear_softmax_kl_divergence` takes them.
      beta: :math:`\beta`, a static Python number: in ``[0, 1)`` with a top-k teacher,
        ``[0, 1]`` with its hidden states.
      temperature: :math:`T > 0`, a static Python number: the student's logits (and a
        hidden-state teacher's) are divided by it; a top-k teacher's log-probabilities
        are taken as given.
      bias: optional ``[V]`` bias.
      where: optional boolean mask of shape ``x.shape[:-1]``; False drops a token.
      <token_weights_teacher>
      <normalizer>
      logit_soft_cap: :math:`c > 0` to soft-cap the student's logits (and a hidden-state
        teacher's), or ``None``.
      reduction: ``"mean"`` (default: over the kept tokens), ``"sum"`` or ``"none"``.
      chunk_size: blocks as in :func:`jxent.linear_softmax_cross_entropy`.
      num_classes: the number of real classes when ``w`` has padding columns.
      w_layout: ``"dv"`` (default, ``w`` is ``[D, V]``) or ``"vd"`` (``[V, D]``, a tied
        embedding table, read in place; a teacher's ``w_t`` in the same layout).
      <implementation>
      <schedule>
      <precision>
      <filter_eps>

    Returns:
      The loss in float32 (float64 for float64 inputs): a scalar, or per token with
      ``reduction="none"``. A kept token whose top-k teacher puts probability on a class
      outside ``[0, V)`` gets NaN (its gradient too).

    Raises:
      TypeError, ValueError: as :func:`jxent.linear_softmax_kl_divergence`, and for
        ``beta`` outside ``[0, 1]`` (``[0, 1)`` with a top-k teacher).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jxent
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8]])
      >>> w = jnp.array([[0.5, -1.0, 0.2, 0.1], [1.5, 0.3, -0.7, 0.0]])
      >>> teacher_logits = jnp.array([[2.0, 0.5, -1.0, 0.0], [0.1, 1.0, 0.3, -2.0]])
      >>> top = jax.lax.top_k(jax.nn.log_softmax(teacher_logits), 4)[::-1]  # all classes
      >>> loss = jxent.linear_softmax_jensen_shannon_divergence(x, w, top, beta=0.3)
      >>> want = jxent.softmax_jensen_shannon_divergence(
      ...     x @ w, teacher_logits, beta=0.3).mean()
      >>> bool(jnp.allclose(loss, want, atol=1e-6))
      True
      >>> # The teacher as hidden states and weight (two passes; its logits never formed).
      >>> x_t = jnp.array([[0.5, 2.0, -1.0], [1.0, 0.0, 0.5]])
      >>> w_t = jnp.array([[1.0, 0.5, -0.5, 0.0], [0.2, -0.3, 0.8, 0.1],
      ...                  [-0.4, 0.6, 0.0, 1.2]])
      >>> for beta in (0.0, 0.5, 1.0):  # forward KL, symmetric JSD, reverse KL
      ...     loss = jxent.linear_softmax_jensen_shannon_divergence(
      ...         x, w, (x_t, w_t), beta=beta, temperature=2.0)
      ...     want = jxent.softmax_jensen_shannon_divergence(
      ...         x @ w, x_t @ w_t, beta=beta, temperature=2.0).mean()
      ...     print(beta, bool(jnp.allclose(loss, want, atol=1e-6)))
      0.0 True
      0.5 True
      1.0 True

    References:
      Agarwal et al., `On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes <https://arxiv.org/abs/2306.13649>`_, 2024.
      Hsu et al., `Liger Kernel <https://arxiv.org/abs/2410.10989>`_, 2024 (fused JSD).
    """
    beta = options.jensen_shannon_beta(beta, teacher)
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
        schedule=schedule,
    )
    return from_teacher(call, teacher, lambda k, t: jensen_shannon(beta, k))
