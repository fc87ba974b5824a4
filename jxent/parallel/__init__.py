"""Vocabulary-parallel cross-entropy (and the fused log-probabilities, entropy,
distillation and Jensen-Shannon losses) for code written with ``jax.shard_map``.

Under plain ``jax.jit`` with sharded arrays the ordinary categorical losses
(``jxent.*``) already partition well: give the logits a ``NamedSharding`` with the
vocabulary on a model axis and the batch on a data axis, and XLA reduces max and
sum-exp across shards without gathering the logits. This module is for code that
is *already* inside ``jax.shard_map`` and holds only its own slice of the
vocabulary (Megatron-style tensor parallelism): each function takes the
device-local logits (or output-weight columns) and the name of the mesh axis the
vocabulary is split over, and does the cross-shard reductions itself with
``lax.pmax``/``lax.psum`` on per-row numbers.

Layout on a 2-D ``("data", "model")`` mesh:

=====================  ==========================  ===============================
array                  global shape                ``in_specs``
=====================  ==========================  ===============================
logits                 ``[tokens, V]``             ``P("data", "model")``
hidden states ``x``    ``[tokens, D]``             ``P("data", None)``
output weight ``w``    ``[D, V]``                  ``P(None, "model")``
labels                 ``[tokens]`` (global ids)   ``P("data")``
bias, class weights    ``[V]``                     ``P("model")``
=====================  ==========================  ===============================

Shard ``s`` of ``n`` (its index along ``axis_name``) holds the classes
``[s * V_local, (s + 1) * V_local)``. When the vocabulary size ``V`` is not a
multiple of ``n``, pad the class axis at the end to ``n * ceil(V / n)`` (any
values, ``inf`` and ``NaN`` included: they are selected away before anything reads
them) and pass ``num_classes=V``: the padding classes take no part in the loss
and get exactly zero gradient. Pass ``batch_axis_name="data"`` for a ``"mean"``
over the whole batch (the sum of the per-device sums over the sum of the
per-device counts).

Communication: the forward pass does one ``pmax`` and one ``psum`` of a few
``[rows]`` arrays over ``axis_name`` (the Jensen-Shannon divergence from a teacher's
hidden states one more ``psum``, of its second pass's sums). The backward pass of the
logits form does none (each shard's gradient needs only the per-row log-sum-exp and
coefficients it already holds); that of the linear form sums ``dx`` over ``axis_name`` (``x``
feeds every shard's logits) and, as any data-parallel weight, ``dw`` over the
data axes. Both need ``shard_map``'s default ``check_vma=True``.

What is checked at trace time, from ``shard_map``'s types: the vocabulary-split array
(``local_logits``, ``local_w``) must vary over ``axis_name``, and the per-token
arrays (``x``, ``labels``, ``where``) must not: every shard reduces the same rows, so
tokens split over the vocabulary axis (sequence parallelism over the same mesh axis)
would combine different shards' rows into wrong losses. ``class_weights`` are
constants everywhere: no gradient flows to them.
"""

from jxent.parallel._linear import linear_softmax_cross_entropy
from jxent.parallel._linear_distillation import (
    linear_distillation_loss,
    linear_softmax_jensen_shannon_divergence,
)
from jxent.parallel._linear_losses import linear_entropy, linear_log_probs
from jxent.parallel._logits import softmax_cross_entropy_with_integer_labels

__all__ = [
    "linear_distillation_loss",
    "linear_entropy",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_jensen_shannon_divergence",
    "softmax_cross_entropy_with_integer_labels",
]
