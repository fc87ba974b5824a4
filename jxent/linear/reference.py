"""The unfused oracle: the logits ``x @ w + bias`` built whole, then the categorical loss.

Same arguments as :func:`jxent.linear.linear_softmax_cross_entropy` (``chunk_size``
is accepted and ignored). The product accumulates in float32 for bfloat16/float16
inputs and the logits are kept in float32, as the blocked implementation does, so
the two agree to float32 round-off for every dtype. Memory: the ``[tokens, V]``
logits and their gradient; use it for tests and small shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jxent._categorical import softmax_cross_entropy_with_integer_labels
from jxent._validation import accumulation_dtype


def linear_softmax_cross_entropy_reference(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    chunk_size=None,
    **options,
) -> jax.Array:
    """``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)``."""
    del chunk_size
    x, w = jnp.asarray(x), jnp.asarray(w)
    dtypes = [x.dtype, w.dtype] + ([] if bias is None else [jnp.asarray(bias).dtype])
    cdt = functools.reduce(jnp.promote_types, dtypes)
    acc = accumulation_dtype(cdt)
    logits = jnp.matmul(x.astype(cdt), w.astype(cdt), preferred_element_type=acc)
    if bias is not None:
        b = jnp.asarray(bias).astype(acc)
        logits = logits + jnp.expand_dims(b, tuple(range(logits.ndim - 1)))
    return softmax_cross_entropy_with_integer_labels(logits, labels, reduction=reduction, **options)
