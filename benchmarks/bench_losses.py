"""Binary, focal, poly, KL, distillation and entropy losses: jxent vs optax.

Measures ``jit(value_and_grad(mean loss))`` (gradient with respect to the first
argument) at N rows x K classes (for the element-wise sigmoid losses, K labels per
row, as in multi-label classification): median time and XLA's compiled memory, jxent
beside its baseline in the same run. Each baseline is written as its best user would
write it: optax's own function where optax has one; where it has none (entropy), the
one-pass formula ``-sum(exp(log_softmax(x)) * log_softmax(x))`` in the input's dtype.

    python -m benchmarks.bench_losses [--rows 1024] [--classes 32768]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import jxent
from benchmarks.common import measure, row

DTYPES = (jnp.float32, jnp.bfloat16)


def _cases() -> dict[str, tuple[Callable, Callable, str, str]]:
    """``case -> (jxent_fn, baseline_fn, baseline name, inputs)``.

    ``inputs`` names what the two arguments are: ``"binary"`` (logits, 0/1 labels of
    the logits' shape), ``"integer"`` (logits, integer labels), ``"logprobs"``
    (log-probabilities, target probabilities), ``"logits"`` (student and teacher
    logits).
    """

    def jx_sbce(x, t):
        return jxent.sigmoid_binary_cross_entropy(x, t, reduction="mean")

    def ox_sbce(x, t):
        return optax.losses.sigmoid_binary_cross_entropy(x, t).mean()

    def jx_focal(x, t):
        return jxent.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction="mean")

    def ox_focal(x, t):
        return optax.losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0).mean()

    def jx_poly(x, y):
        onehot = jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype)
        return jxent.poly_loss_cross_entropy(x, onehot, 2.0, reduction="mean")

    def ox_poly(x, y):
        onehot = jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype)
        return optax.losses.poly_loss_cross_entropy(x, onehot, epsilon=2.0).mean()

    def jx_kl(log_p, t):
        return jxent.kl_divergence(log_p, t, reduction="mean")

    def ox_kl(log_p, t):
        return optax.losses.kl_divergence(log_p, t).mean()

    def jx_distill(student, teacher):
        return jxent.softmax_kl_divergence(student, teacher, reduction="mean")

    def ox_distill(student, teacher):
        # Distillation with optax: both log-softmaxes, optax's KL with log targets
        # (one pass over the teacher, no log of a softmax).
        return optax.losses.kl_divergence_with_log_targets(
            jax.nn.log_softmax(student), jax.nn.log_softmax(teacher)
        ).mean()

    def jx_entropy(x, _):
        return jxent.entropy(x, reduction="mean")

    def jnp_entropy(x, _):
        # optax has no entropy: the one-pass formula, one log-softmax.
        log_p = jax.nn.log_softmax(x)
        return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1).mean()

    return {
        "sigmoid binary cross-entropy": (jx_sbce, ox_sbce, "optax", "binary"),
        "sigmoid focal loss (alpha 0.25, gamma 2)": (jx_focal, ox_focal, "optax", "binary"),
        "poly-1 cross-entropy (epsilon 2)": (jx_poly, ox_poly, "optax", "integer"),
        "kl_divergence (log-probs, probs)": (jx_kl, ox_kl, "optax", "logprobs"),
        "softmax_kl_divergence (distillation)": (jx_distill, ox_distill, "optax", "logits"),
        "entropy": (jx_entropy, jnp_entropy, "jnp one-pass", "logits"),
    }


CASES = tuple(_cases())


def _inputs(kind: str, rows: int, classes: int, dtype) -> tuple[jax.Array, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    logits = 3 * jax.random.normal(k1, (rows, classes))
    if kind == "binary":
        labels = jax.random.bernoulli(k2, 0.1, (rows, classes))
        return logits.astype(dtype), labels.astype(dtype)
    if kind == "integer":
        return logits.astype(dtype), jax.random.randint(k2, (rows,), 0, classes)
    teacher = 3 * jax.random.normal(k3, (rows, classes))
    if kind == "logprobs":
        return jax.nn.log_softmax(logits).astype(dtype), jax.nn.softmax(teacher).astype(dtype)
    return logits.astype(dtype), teacher.astype(dtype)


def run(
    rows: int, classes: int, repeats: int = 7, progress=None, dtypes=DTYPES, cases=None
) -> list[dict]:
    """Compares every case of this module at ``rows x classes`` for each dtype."""
    out = []
    for dtype in dtypes:
        for case, (jx, base, base_name, kind) in _cases().items():
            if cases is not None and case not in cases:
                continue
            fns = {"jxent": jax.value_and_grad(jx), base_name: jax.value_and_grad(base)}
            got = measure(fns, _inputs(kind, rows, classes, dtype), repeats=repeats)
            out.append(row(case, dtype, (rows, classes), got, base_name))
            if progress is not None:
                progress()
    return out


if __name__ == "__main__":
    from benchmarks.run import suite_main

    suite_main("losses")
