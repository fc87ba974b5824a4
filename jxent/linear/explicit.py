"""``jxent.linear_softmax_cross_entropy`` of arrays typed with ``Explicit`` mesh axes.

A loop over vocabulary blocks of a ``w`` sharded over its columns has no typed sharded
form, so the loss runs under ``shard_map`` over the arrays' mesh: tokens split as
``x``'s batch dimensions are (over the axes that do not split the vocabulary),
vocabulary columns as ``w``'s are. With the vocabulary split, each device runs
:func:`jxent.parallel.linear_softmax_cross_entropy` on its columns; otherwise the
blocked loss on its tokens.

Internal API of ``jxent.linear``: :func:`explicitly_sharded`,
:func:`linear_from_explicit_sharding`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jxent import parallel
from jxent._fused import driver
from jxent._fused.logits import compute_dtype
from jxent._fused.xent import linear_cross_entropy
from jxent._layout import and_masks, xent_config
from jxent._reduction import mean_weight, reduce_across
from jxent._softmax import take_classes
from jxent._validation import accumulation_dtype


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _explicit_spec(a: jax.Array) -> tuple:
    """The array's PartitionSpec entries (one per dimension) when typed with Explicit axes."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    if spec is None:
        return (None,) * a.ndim
    return tuple(spec) + (None,) * (a.ndim - len(spec))


def explicitly_sharded(*arrays) -> bool:
    """Whether any array's type names a mesh axis (``Explicit`` axes, outside shard_map)."""
    return any(any(_names(e) for e in _explicit_spec(a)) for a in arrays if a is not None)


def linear_from_explicit_sharding(
    x, w, labels, *, reduction, chunk_size, w_layout="dv", return_lse=False, **options
):
    """:func:`jxent.linear_softmax_cross_entropy` of arrays sharded with ``Explicit`` axes
    (see the module's docstring). Arguments are validated already (``token_weights`` of
    shape ``x.shape[:-1]``, ``normalizer`` a scalar or None); ``options`` are the public
    function's other keyword arguments. ``w`` is ``[D, V]``, or ``[V, D]`` with
    ``w_layout="vd"``. With ``return_lse``: ``(loss, lse)``, ``lse`` split as the tokens."""
    vocab_dim = 1 if w_layout == "dv" else 0
    vocab = _names(_explicit_spec(w)[vocab_dim])
    batch_spec = tuple(
        tuple(n for n in _names(e) if n not in vocab) or None for e in _explicit_spec(x)[:-1]
    )
    batch_names = tuple(n for e in batch_spec for n in _names(e)) or None
    sharded = [a for a in (w, x, labels) if explicitly_sharded(a)]
    mesh = jax.typeof(sharded[0]).sharding.mesh
    vocab_entry = (vocab if len(vocab) > 1 else vocab[0]) if vocab else None
    token = P(*batch_spec)
    w_spec = P(None, vocab_entry) if w_layout == "dv" else P(vocab_entry, None)
    specs = {"x": P(*batch_spec, None), "w": w_spec, "labels": token}
    for name, spec in (
        ("bias", P(vocab_entry)),
        ("class_weights", P(vocab_entry)),
        ("where", token),
        ("token_weights", token),
        ("normalizer", P()),
    ):
        if options.get(name) is not None:
            specs[name] = spec
    arrays = {"x": x, "w": w, "labels": labels, **{k: options[k] for k in specs if k in options}}
    arrays = {k: jax.sharding.reshard(a, NamedSharding(mesh, specs[k])) for k, a in arrays.items()}
    static = {k: val for k, val in options.items() if k not in arrays}

    def local(arrays):
        kw = {k: a for k, a in arrays.items() if k not in ("x", "w", "labels")}
        if vocab:
            return parallel.linear_softmax_cross_entropy(
                arrays["x"],
                arrays["w"],
                arrays["labels"],
                axis_name=vocab_entry,
                reduction=reduction,
                batch_axis_name=batch_names,
                chunk_size=chunk_size,
                return_lse=return_lse,
                w_layout=w_layout,
                **kw,
                **static,
            )
        labels, row_mask = arrays["labels"], arrays.get("where")
        if static.get("ignore_index") is not None:
            row_mask = and_masks(row_mask, labels != static["ignore_index"])
        loss, lse, weights = _local_loss(arrays, row_mask, static, chunk_size, w_layout, return_lse)
        take = lambda t, y: take_classes(t, jnp.clip(y, 0, t.shape[0] - 1))  # noqa: E731
        cw = arrays.get("class_weights")
        weight = mean_weight(row_mask, cw, labels, reduction, loss.dtype, take)
        if weights is not None and reduction == "mean":
            weight = weights if weight is None else weight.astype(loss.dtype) * weights
        loss = reduce_across(loss, reduction, weight, batch_names, arrays.get("normalizer"))
        return loss if lse is None else (loss, lse)

    out = token if reduction == "none" else P()
    if return_lse:
        out = (out, token)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out)(arrays)


def _local_loss(arrays, row_mask, static, chunk_size, w_layout, return_lse):
    """``(loss, lse or None, token weights or None)`` per token of this device's tokens
    against the whole vocabulary (the loss times the token weights)."""
    x, w = arrays["x"], arrays["w"]
    config = xent_config(
        static.get("label_smoothing", 0.0), static.get("z_loss", 0.0), static.get("logit_soft_cap")
    )
    batch_shape = x.shape[:-1]
    acc = accumulation_dtype(compute_dtype(x, w, arrays.get("bias")))
    weights = driver.token_weights(arrays.get("token_weights"), batch_shape, acc)
    columns = w.shape[1] if w_layout == "dv" else w.shape[0]
    result = linear_cross_entropy(
        x,
        w,
        arrays["labels"],
        bias=arrays.get("bias"),
        row_mask=row_mask,
        class_weights=arrays.get("class_weights"),
        config=config,
        reduction="none",
        chunk_size=chunk_size,
        num_classes=static.get("num_classes") or columns,
        token_weights=weights,
        return_lse=return_lse,
        w_layout=w_layout,
    )
    loss, lse = result if return_lse else (result, None)
    return loss, lse, None if weights is None else weights.reshape(batch_shape)
