"""``linear_softmax_cross_entropy``: the signature and the documentation; the arguments
are checked by ``jxent._fused.options.checked_call`` and the loss is
``jxent._fused.xent.cross_entropy`` (arrays typed with ``Explicit`` mesh axes run it
under ``shard_map``; under ``jax.jit`` with ``Auto`` mesh axes GSPMD partitions its
grouped blocks).
"""

from __future__ import annotations

import jax

from jxent import _docstrings
from jxent._fused.options import checked_bool, checked_call
from jxent._fused.xent import cross_entropy
from jxent._layout import xent_config


@_docstrings.fill
def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    chunk_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    token_weights: jax.typing.ArrayLike | None = None,
    normalizer: jax.typing.ArrayLike | None = None,
    return_lse: bool = False,
    w_layout: str = "dv",
    implementation: str | None = None,
    schedule: str = "auto",
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Softmax cross-entropy of a linear layer's output, without materialising the logits.

    Computes exactly
    ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)``
    (same options, same results to float32 round-off) for the output layer of a
    language model, where the ``[tokens, V]`` logits are the largest array of the
    whole training step. With :math:`z = x W + b` (soft-capped to
    :math:`c \tanh(z / c)` if ``logit_soft_cap=c``), label :math:`y`, class weights
    :math:`w` and label smoothing :math:`\alpha` over all :math:`V` classes,

    .. math::
      \ell = (1 - \alpha)\, w_y \big(\mathrm{lse}(z) - z_y\big)
             + \frac{\alpha}{V} \sum_k w_k \big(\mathrm{lse}(z) - z_k\big)
             + \lambda_z\, \mathrm{lse}(z)^2 .

    The logits are formed one ``[token_block, vocab_block]`` block at a time, in
    float32 (matrix products accumulate in float32 for bfloat16/float16 inputs), and
    reduced on the spot under a ``jax.custom_vjp``:

    * streaming (vocabulary blocks narrower than ``V``; the default for large
      ``D * V`` as in language models, and for ``reduction="none"``): an online
      log-sum-exp keeps a few numbers per token; the backward pass recomputes each
      block's logits and writes its columns of the weight gradient. Temporary
      memory does not grow with ``tokens * V``; four matrix products of the size
      of ``x @ w`` instead of the unfused three;
    * single pass (blocks spanning the whole vocabulary, with ``reduction="sum"``
      or ``"mean"``): one pass over token blocks computes the loss and, when
      differentiated, the gradients too, into a float32 ``[D, V]`` accumulator.
      Three matrix products: the fastest schedule, chosen by default when that
      accumulator takes at most 256 MiB. ``schedule="single_pass"`` takes it at any
      size (trading that accumulator's memory for a quarter of the products),
      ``schedule="streaming"`` never.

    Gradients flow to ``x``, ``w`` and ``bias`` and come back in their dtypes; only
    those being differentiated are computed. ``class_weights`` is treated as a
    constant: no gradient flows to it (nor through the ``"mean"``'s denominator).
    Composes with ``jit``, ``vmap``, ``grad`` and ``jax.checkpoint``; forward-mode
    differentiation is not supported.

    Args:
      x: hidden states ``[..., D]``, floating.
      w: the output projection ``[D, V]`` (a Flax ``Dense`` kernel; for tied
        embeddings pass ``embedding.T``).
      labels: integer class indices of shape ``x.shape[:-1]``.
      bias: optional ``[V]`` bias (one per column of ``w``, padding included).
      ignore_index: tokens whose label equals it are dropped (e.g. ``-100``).
      where: optional boolean mask of shape ``x.shape[:-1]``; False drops a token.
      label_smoothing: :math:`\alpha \in [0, 1]`, a static Python number.
      z_loss: :math:`\lambda_z \ge 0`, a static Python number.
      logit_soft_cap: :math:`c > 0` to soft-cap the logits (Gemma 2), or ``None``.
      class_weights: ``[V]`` non-negative weights (PyTorch's ``weight``), one per column
        of ``w``; constants (no gradient flows to them); any values on padding columns.
      reduction: ``"mean"`` (default: over the kept tokens, weighted by
        :math:`w_y` with class weights; 0 if none), ``"sum"`` or ``"none"``.
      chunk_size: ``None`` to choose from the shapes (see Notes); an int ``c``:
        vocabulary blocks of ``c`` columns (tokens blocked as by default); a pair
        ``(t, c)``: blocks of ``t`` tokens by ``c`` vocabulary columns. A block as
        wide as the vocabulary with a summed/averaged loss selects the single pass.
        Neither needs to divide the number of tokens or ``V``.
      num_classes: the number of classes when ``w`` has padding columns after them
        (any values in ``w``, ``bias`` and ``class_weights``, ``inf`` and ``NaN``
        included: they are selected away before they are read; e.g. ``V`` padded to
        a multiple of the devices the vocabulary is sharded over): they take no part
        in the loss and get exactly zero gradient; a label
        ``>= num_classes`` is out of range. ``None`` (default): every column is a class.
      token_weights: optional float weights of shape ``x.shape[:-1]`` (constants: no
        gradient flows to them), multiplying each token's loss; ``"mean"`` then divides
        by their sum over the kept tokens (times :math:`w_y` with class weights).
      <normalizer>
      return_lse: also return each token's log-sum-exp :math:`\mathrm{lse}(z)` (to
        monitor, or to reuse in an auxiliary loss: it is differentiable). The loss then
        takes the streaming schedule.
      w_layout: ``"dv"`` (default): ``w`` is ``[D, V]``; ``"vd"``: ``w`` is ``[V, D]``,
        e.g. a tied embedding table, read in place (no transposed copy; its gradient
        comes back ``[V, D]``).
      implementation: which implementation runs the loss: ``None`` or ``"auto"``
        (default: the first of the library's implementations that supports the call),
        or a name, ``"xla"`` (the blocked loops, compiled by XLA on every platform;
        what ``"auto"`` takes) or ``"pallas_tpu"`` (Pallas kernels for TPU: no
        temporary memory, five products to ``"xla"``'s four; Pallas' interpreter
        elsewhere; not with ``filter_eps``).
      <schedule>
      <precision>
      <filter_eps>

    Returns:
      The loss in float32 (float64 for float64 inputs): a scalar, or of shape
      ``x.shape[:-1]`` with ``reduction="none"``. A token with a label outside
      ``[0, V)`` that is not ``ignore_index`` gets a NaN loss. With ``return_lse``:
      ``(loss, lse)``, ``lse`` of shape ``x.shape[:-1]``.

    Raises:
      TypeError: non-floating ``x``/``w``/``bias``/``class_weights``, non-integer
        ``labels``, a non-boolean ``where``, a ``chunk_size`` or ``num_classes`` that
        is not an int.
      ValueError: ``w`` not ``[x.shape[-1], V]``, ``bias`` or ``class_weights`` not
        ``[V]``, ``labels`` or ``where`` not of shape ``x.shape[:-1]``, a
        non-positive ``chunk_size``, ``num_classes`` not in ``[1, V]``, an option out
        of range, an unknown reduction.

    Notes:
      Default blocks (``chunk_size=None``): the single pass when the loss is summed
      or averaged and the float32 ``[D, V]`` accumulator is at most 256 MiB, with
      token blocks of about ``2 D`` tokens on CPU (fewer on GPU and TPU, whose
      logits block is capped at 128 and 64 MiB); otherwise vocabulary streaming with
      panels (logits block, ``dx`` rows, ``dw`` columns) of at most 32 MiB each on
      CPU and GPU (11 MiB on CPU for float32 inputs), 128 MiB on TPU. See
      :func:`jxent._fused.plan.plan_blocks` for the exact rule.

      Padding columns (``num_classes`` below ``w.shape[1]``): their logits are
      selected to a large negative number block by block, and ``dx``'s product reads
      ``w`` with them zeroed (``0 * inf`` would be NaN): a ``[D, vocab_block]`` copy per
      vocabulary block when streaming; in the single pass one copy of ``w`` (beside its
      float32 ``[D, V]`` accumulator).

      Sharded arrays: under ``jax.jit`` with ``w`` sharded over its columns (the
      vocabulary) and ``x`` over its tokens on ``Auto`` mesh axes (a plain
      ``NamedSharding``, GSPMD), each device computes its own columns and tokens of
      every block; only per-token numbers and partial sums of ``dx``/``dw`` cross
      devices. Each block takes a slice of every one of ``G`` groups of the vocabulary
      (and of the tokens), ``G`` the largest power of two up to 64 dividing both the
      axis and its block, and for the vocabulary at most ``block / 128``
      (:func:`jxent._fused.plan.block_groups`): a shard count that divides ``G`` (or an
      axis not looped over) never gathers ``w`` or ``x``; another one gathers them,
      with the same results. With the default blocks ``G`` is 8 to 32 for the usual
      vocabulary sizes; a larger ``chunk_size`` allows more. With ``Explicit`` mesh axes the loss
      runs per device under ``jax.shard_map``
      (:func:`jxent.parallel.linear_softmax_cross_entropy`). When ``V`` does not
      divide by the shard count, pad ``w`` (and ``bias``, ``class_weights``) with
      columns at the end to a multiple of it and pass ``num_classes=V``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jxent
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]], dtype=jnp.float32)
      >>> w = jnp.array([[0.5, -1.0, 0.2, 0.0], [1.5, 0.3, -0.7, 0.1]], dtype=jnp.float32)
      >>> labels = jnp.array([1, 0, -100])
      >>> loss = jxent.linear_softmax_cross_entropy(x, w, labels, ignore_index=-100)
      >>> loss.round(4)
      Array(1.4999, dtype=float32)
      >>> logits = x @ w
      >>> jxent.softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, ignore_index=-100, reduction="mean").round(4)
      Array(1.4999, dtype=float32)
      >>> dx, dw = jax.grad(jxent.linear_softmax_cross_entropy, argnums=(0, 1))(
      ...     x, w, labels, ignore_index=-100)
      >>> dx.shape, dw.shape
      ((3, 2), (2, 4))

    References:
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024 (Cut Cross-Entropy).
      Hsu et al., `Liger Kernel: Efficient Triton Kernels for LLM Training
      <https://arxiv.org/abs/2410.10989>`_, 2024 (fused linear cross-entropy).
      Milakov & Gimelshein, `Online normalizer calculation for softmax
      <https://arxiv.org/abs/1805.02867>`_, 2018.
    """
    call = checked_call(
        x,
        w,
        labels,
        bias=bias,
        class_weights=class_weights,
        where=where,
        token_weights=token_weights,
        normalizer=normalizer,
        reduction=reduction,
        chunk_size=chunk_size,
        logit_soft_cap=logit_soft_cap,
        num_classes=num_classes,
        w_layout=w_layout,
        implementation=implementation,
        precision=precision,
        filter_eps=filter_eps,
        schedule=schedule,
    )
    config = xent_config(label_smoothing, z_loss)
    return cross_entropy(call, config, ignore_index, checked_bool("return_lse", return_lse))
