"""jxent: the cross-entropy family of loss functions, in pure JAX, done right.

Every loss is a pure function that returns per-example values by default
(``reduction="none"``), compatible with the functions of the same names in
``optax.losses``; new options are keyword-only.
"""

from jxent import parallel as parallel  # the shard_map forms: jxent.parallel.*
from jxent._binary import binary_cross_entropy, sigmoid_binary_cross_entropy
from jxent._categorical import (
    check_labels,
    safe_softmax_cross_entropy,
    smooth_labels,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jxent._distillation import softmax_jensen_shannon_divergence, softmax_kl_divergence
from jxent._divergence import entropy, kl_divergence, kl_divergence_with_log_targets
from jxent._focal import sigmoid_focal_loss
from jxent._poly import poly_loss_cross_entropy
from jxent.linear import (
    linear_distillation_loss,
    linear_entropy,
    linear_log_probs,
    linear_softmax_cross_entropy,
    linear_softmax_jensen_shannon_divergence,
    linear_softmax_kl_divergence,
)

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "check_labels",
    "entropy",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_distillation_loss",
    "linear_entropy",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_jensen_shannon_divergence",
    "linear_softmax_kl_divergence",
    "poly_loss_cross_entropy",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_jensen_shannon_divergence",
    "softmax_kl_divergence",
]
