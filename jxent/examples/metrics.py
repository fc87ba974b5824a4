"""Evaluation metrics of the example tasks (jit-compatible)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def expected_calibration_error(
    confidence: jax.typing.ArrayLike,
    correct: jax.typing.ArrayLike,
    *,
    num_bins: int = 15,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Top-label expected calibration error with equal-width bins (Guo et al., 2017).

    .. math::
      \mathrm{ECE} = \sum_{b=1}^{M} \frac{|B_b|}{n}
        \,\big|\operatorname{acc}(B_b) - \operatorname{conf}(B_b)\big|,

    where bin :math:`B_b` holds the examples whose confidence lies in
    :math:`((b - 1)/M, b/M]` (a confidence of exactly 0 goes to the first bin).

    Args:
      confidence: the probability the model gives its prediction, ``[n]``.
      correct: whether the prediction is right, ``[n]`` (bool or 0/1).
      num_bins: :math:`M`, the number of bins.
      where: optional ``[n]`` boolean mask of the examples to count (e.g. to skip
        the padding of a batch).

    Returns:
      The ECE, a scalar in ``[0, 1]`` (0 when no example is counted).

    Example:
      >>> import jax.numpy as jnp
      >>> conf = jnp.array([0.9, 0.9, 0.6, 0.6])
      >>> correct = jnp.array([True, True, True, False])
      >>> round(float(expected_calibration_error(conf, correct, num_bins=10)), 4)
      0.1
    """
    confidence = jnp.asarray(confidence)
    weight = jnp.ones(confidence.shape, confidence.dtype)
    if where is not None:
        weight = jnp.asarray(where).astype(confidence.dtype)
    correct = jnp.asarray(correct).astype(confidence.dtype)
    bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    conf_sum = jax.ops.segment_sum(weight * confidence, bins, num_bins)
    correct_sum = jax.ops.segment_sum(weight * correct, bins, num_bins)
    total = jnp.maximum(jnp.sum(weight), jnp.ones((), weight.dtype))
    return jnp.sum(jnp.abs(correct_sum - conf_sum)) / total


def bits_per_byte(nats_per_byte: float) -> float:
    """Converts a mean next-byte cross-entropy in nats to bits per byte.

    A byte-level model's loss is already per byte; dividing by :math:`\\ln 2`
    turns nats into bits. A model that is uniform over all 256 byte values
    scores exactly 8.

    Example:
      >>> import math
      >>> bits_per_byte(math.log(256))
      8.0
    """
    return nats_per_byte / math.log(2.0)
