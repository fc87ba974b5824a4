"""The fused linear cross-entropy with the output weight split over a mesh axis.

Each shard runs the blocked engine (``jxent._fused.engine``) on its own columns of
``w``; the engine's vocabulary-parallel combine (one ``pmax`` and one ``psum`` of
per-token numbers) makes every shard's loss the whole vocabulary's, and its backward
pass sums ``dx`` over the shards.
"""

from __future__ import annotations

import jax

from jxent import _docstrings
from jxent._fused.options import checked_bool, checked_call
from jxent._fused.xent import cross_entropy
from jxent._layout import xent_config
from jxent._split import AxisName


@_docstrings.fill
def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    local_w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis_name: AxisName,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    num_classes: int | None = None,
    batch_axis_name: AxisName | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    token_weights: jax.typing.ArrayLike | None = None,
    normalizer: jax.typing.ArrayLike | None = None,
    return_lse: bool = False,
    w_layout: str = "dv",
    implementation: str | None = None,
    precision: str | jax.lax.Precision | tuple | None = None,
    filter_eps: float | str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""The fused linear softmax cross-entropy with the output weight split over devices.

    Call it inside ``jax.shard_map``. It computes
    :func:`jxent.linear_softmax_cross_entropy` ``(x, w, labels, ...)`` where ``w`` is
    the concatenation of every shard's ``local_w`` along its columns: each shard forms
    its own logits ``x @ local_w`` block by block (never the whole ``[tokens, V_local]``
    array) with the blocked loss's streaming schedule, then the shards combine per-token
    numbers: one ``pmax`` of the maxima and one ``psum`` of the sum-exp, the label's
    logit (found on the shard that owns it) and the smoothing sums. The backward pass
    recomputes each block's logits, keeps ``d local_w`` on its shard and sums
    ``dx`` over the shards: a ``[tokens, D]`` all-reduce, the one collective that the
    math needs (``x`` feeds every shard's logits). Reverse mode only.

    Layout on a 2-D ``("data", "model")`` mesh: ``x`` in ``P("data", None)`` (tokens
    split over ``data``, hidden size whole), ``local_w`` from ``w`` in
    ``P(None, "model")`` (vocabulary columns split over ``model``), ``labels`` in
    ``P("data")`` (global class indices), ``bias`` and ``class_weights`` in
    ``P("model")``. Shard ``s`` owns the classes ``[s * V_local, (s + 1) * V_local)``.
    If ``V`` is not a multiple of the model-axis size ``n``, pad ``w`` (and ``bias``,
    ``class_weights``) with columns at the end to ``n * ceil(V / n)`` (any values,
    ``inf`` and ``NaN`` included) and pass ``num_classes=V``: the padding takes no part
    (its logits and weights are selected away) and its gradient is exactly 0.

    ``class_weights`` is treated as a constant: no gradient flows to it (nor through
    the ``"mean"``'s denominator).

    Args:
      x: hidden states ``[..., D]``, the same on every shard of ``axis_name`` (not
        split over it: checked from ``shard_map``'s types).
      local_w: this device's ``[D, V_local]`` columns of the output projection.
      labels: integer global class indices of shape ``x.shape[:-1]``, not split over
        ``axis_name`` (as ``x``).
      axis_name: the mesh axis (or tuple of axes) the vocabulary is split over.
      bias: this device's ``[V_local]`` slice of the bias, or ``None``.
      ignore_index: tokens whose label equals it are dropped.
      where: boolean mask of shape ``x.shape[:-1]``; False drops a token. Not split
        over ``axis_name`` (as ``x``).
      label_smoothing: :math:`\alpha \in [0, 1]` over the ``V`` real classes.
      z_loss: :math:`\lambda_z \ge 0`.
      logit_soft_cap: :math:`c > 0` to use :math:`c \tanh(z / c)`, or ``None``.
      class_weights: this device's ``[V_local]`` slice of the class weights
        (constants: no gradient flows to them; any values on the padding).
      reduction: ``"mean"`` (default, as :func:`jxent.linear_softmax_cross_entropy`),
        ``"sum"`` or ``"none"``; over this device's tokens, or over every device of
        ``batch_axis_name`` if given.
      num_classes: the true vocabulary size ``V`` when the last shard is padded.
      batch_axis_name: the data-parallel mesh axis (or axes) for a global
        ``"sum"``/``"mean"``.
      chunk_size: vocabulary columns per block on each shard, or a pair (tokens,
        columns); ``None`` chooses as :func:`jxent.linear_softmax_cross_entropy`
        does for per-token losses (its streaming schedule).
      token_weights: optional float weights of shape ``x.shape[:-1]``, split as
        ``x``'s tokens (not over ``axis_name``; constants: no gradient flows to them),
        multiplying each token's loss; ``"mean"`` then divides by their sum over the
        kept tokens (times :math:`w_y` with class weights), over every device of
        ``batch_axis_name`` if given.
      <normalizer_split>
      return_lse: also return each token's log-sum-exp over the whole vocabulary
        (differentiable).
      w_layout: ``"dv"`` (default): ``local_w`` is ``[D, V_local]``; ``"vd"``:
        ``local_w`` is this shard's ``[V_local, D]`` rows of a ``[V, D]`` table (a tied
        embedding, split in ``P("model", None)``), read in place (its gradient comes
        back ``[V_local, D]``).
      <implementation>
      <precision>
      <filter_eps>

    Returns:
      float32 losses (float64 for float64 inputs): of shape ``x.shape[:-1]`` for
      ``"none"``, else a scalar; equal on every device of ``axis_name``. With
      ``return_lse``: ``(loss, lse)``, ``lse`` of shape ``x.shape[:-1]``.

    Raises:
      TypeError: non-floating ``x``/``local_w``/``bias``/``class_weights``/
        ``token_weights``, non-integer labels, a non-boolean ``where`` or
        ``return_lse``, a bad ``axis_name``.
      ValueError: ``axis_name`` not bound by an enclosing ``shard_map``, shapes that
        do not match, ``num_classes`` out of range, an option out of range, an unknown
        ``w_layout``, ``normalizer`` not a scalar or without ``reduction="mean"``,
        ``local_w`` not split over ``axis_name`` (or ``check_vma=False``), ``x``,
        ``labels``, ``where`` or ``token_weights`` split over it.

    Example:
      A 1 x 1 mesh so that it runs anywhere (e.g. ``(2, 4)`` on 8 devices); the
      vocabulary of 3 classes is padded to 4 columns.

      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import jxent
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      >>> x = jnp.array([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]])
      >>> w = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]])
      >>> labels = jnp.array([1, 0, 2])
      >>> w_padded = jnp.pad(w, ((0, 0), (0, 1)))  # V = 3 -> 4 columns
      >>> def loss_fn(x, local_w, labels):
      ...     return jxent.parallel.linear_softmax_cross_entropy(
      ...         x, local_w, labels, axis_name="model", num_classes=3,
      ...         batch_axis_name="data")
      >>> sharded = jax.shard_map(
      ...     loss_fn, mesh=mesh, in_specs=(P("data", None), P(None, "model"), P("data")),
      ...     out_specs=P())
      >>> args = put(x, "data", None), put(w_padded, None, "model"), put(labels, "data")
      >>> print(f"{float(jax.jit(sharded)(*args)):.4f}")
      1.5740
      >>> print(f"{float(jxent.linear_softmax_cross_entropy(x, w, labels)):.4f}")
      1.5740

    References:
      Shoeybi et al., `Megatron-LM <https://arxiv.org/abs/1909.08053>`_, 2019.
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024.
    """
    call = checked_call(
        x,
        local_w,
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
        axis_name=axis_name,
        batch_axis_name=batch_axis_name,
    )
    config = xent_config(label_smoothing, z_loss)
    return cross_entropy(call, config, ignore_index, checked_bool("return_lse", return_lse))
