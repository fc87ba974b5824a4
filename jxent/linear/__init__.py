"""Fused linear softmax cross-entropy: ``x @ w`` and the loss without the logits array."""

from jxent.linear.api import linear_softmax_cross_entropy

__all__ = ["linear_softmax_cross_entropy"]
