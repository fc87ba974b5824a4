"""Fused losses of a linear layer's output ``x @ w``, without the logits array:
cross-entropy, log-probabilities and entropy, distillation (KL, Jensen-Shannon)."""

from jxent.linear.api import linear_softmax_cross_entropy
from jxent.linear.distillation import (
    linear_distillation_loss,
    linear_softmax_jensen_shannon_divergence,
    linear_softmax_kl_divergence,
)
from jxent.linear.log_probs import linear_entropy, linear_log_probs

__all__ = [
    "linear_distillation_loss",
    "linear_entropy",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_jensen_shannon_divergence",
    "linear_softmax_kl_divergence",
]
