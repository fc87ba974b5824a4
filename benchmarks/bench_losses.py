"""Binary, focal, poly, KL and entropy losses: jxent vs optax (or a naive jnp formula).

Measures ``jit(value_and_grad(mean loss))`` (gradient with respect to the first
argument) at N rows x K classes (for the element-wise sigmoid losses, K labels per
row, as in multi-label classification): median time and XLA's compiled temporary
memory, jxent beside its baseline in the same run.

    python -m benchmarks.bench_losses [--rows 4096] [--classes 32000]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import jxent
from benchmarks.common import Row, compare, suite_main


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
        # How distillation is written with optax: the teacher is a distribution.
        log_q = jax.nn.log_softmax(student)
        return optax.losses.kl_divergence(log_q, jax.nn.softmax(teacher)).mean()

    def jx_int(x, y):
        return jxent.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

    def naive_int(x, y):
        # The textbook formula: a full [rows, classes] log-softmax, then pick the labels.
        log_p = jax.nn.log_softmax(x.astype(jnp.float32))
        return -jnp.take_along_axis(log_p, y[:, None], axis=-1).mean()

    def jx_entropy(x, _):
        return jxent.entropy(x, reduction="mean")

    def jnp_entropy(x, _):
        return -jnp.sum(jax.nn.softmax(x) * jax.nn.log_softmax(x), axis=-1).mean()

    return {
        "sigmoid binary cross-entropy": (jx_sbce, ox_sbce, "optax", "binary"),
        "sigmoid focal loss (alpha 0.25, gamma 2)": (jx_focal, ox_focal, "optax", "binary"),
        "poly-1 cross-entropy (epsilon 2)": (jx_poly, ox_poly, "optax", "integer"),
        "kl_divergence (log-probs, probs)": (jx_kl, ox_kl, "optax", "logprobs"),
        "softmax_kl_divergence (distillation)": (
            jx_distill,
            ox_distill,
            "optax kl(log_softmax, softmax)",
            "logits",
        ),
        "integer-label cross-entropy vs naive formula": (jx_int, naive_int, "jnp", "integer"),
        "entropy": (jx_entropy, jnp_entropy, "jnp", "logits"),
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
    rows: int = 4096,
    classes: int = 32000,
    repeats: int = 7,
    progress=None,
    dtypes=(jnp.float32, jnp.bfloat16),
    cases=None,
) -> list[Row]:
    """Compares every case of this module at ``rows x classes`` for each dtype."""
    out = []
    for dtype in dtypes:
        for case, (jx, base, base_name, kind) in _cases().items():
            if cases is not None and case not in cases:
                continue
            args = _inputs(kind, rows, classes, dtype)
            out.append(
                compare(
                    case,
                    jax.value_and_grad(jx),
                    jax.value_and_grad(base),
                    args,
                    shape=f"{rows}x{classes}",
                    repeats=repeats,
                    baseline=base_name,
                )
            )
            if progress is not None:
                progress()
    return out


def main() -> None:
    suite_main(run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
