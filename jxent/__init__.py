"""jxent: the cross-entropy family of loss functions, in pure JAX, done right.

Every loss is a pure function that returns per-example values by default
(``reduction="none"``), compatible with the functions of the same names in
``optax.losses``; new options are keyword-only.
"""

from jxent import parallel as parallel  # the shard_map forms: jxent.parallel.*
from jxent._categorical import (
    check_labels,
    safe_softmax_cross_entropy,
    smooth_labels,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)

__version__ = "0.1.0"

__all__ = [
    "check_labels",
    "safe_softmax_cross_entropy",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
