"""Categorical cross-entropy: jxent vs optax, time and compiled temporary memory.

Measures ``jit(value_and_grad(mean loss))`` at N rows x K classes for integer labels
and for integer labels with label smoothing 0.1 (optax: ``smooth_labels(one_hot)``
+ ``softmax_cross_entropy``, the way optax users write it).

    python benchmarks/bench_categorical.py [--rows 4096] [--classes 32000]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jxent
from benchmarks.common import Row, compare, suite_main


def _cases(num_classes: int):
    def jx_int(x, y):
        return jxent.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

    def ox_int(x, y):
        return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()

    def jx_smooth(x, y):
        return jxent.softmax_cross_entropy_with_integer_labels(
            x, y, label_smoothing=0.1, reduction="mean"
        )

    def ox_smooth(x, y):
        targets = optax.losses.smooth_labels(jax.nn.one_hot(y, num_classes, dtype=x.dtype), 0.1)
        return optax.losses.softmax_cross_entropy(x, targets).mean()

    def jx_dense(x, y):
        targets = jax.nn.softmax(jnp.roll(x, 1, axis=-1).astype(jnp.float32))
        return jxent.softmax_cross_entropy(x, targets, reduction="mean")

    def ox_dense(x, y):
        targets = jax.nn.softmax(jnp.roll(x, 1, axis=-1).astype(jnp.float32))
        return optax.losses.softmax_cross_entropy(x, targets).mean()

    return {
        "integer labels": (jx_int, ox_int),
        "integer labels, smoothing 0.1": (jx_smooth, ox_smooth),
        "dense soft targets": (jx_dense, ox_dense),
    }


def run(rows: int = 4096, classes: int = 32000, repeats: int = 7, progress=None) -> list[Row]:
    key_x, key_y = jax.random.split(jax.random.key(0))
    labels = jax.random.randint(key_y, (rows,), 0, classes)
    out = []
    for dtype in (jnp.float32, jnp.bfloat16):
        logits = (3 * jax.random.normal(key_x, (rows, classes))).astype(dtype)
        for case, (jx, ox) in _cases(classes).items():
            out.append(
                compare(
                    case,
                    jax.value_and_grad(jx),
                    jax.value_and_grad(ox),
                    (logits, labels),
                    shape=f"{rows}x{classes}",
                    repeats=repeats,
                )
            )
            if progress is not None:
                progress()
    return out


def main() -> None:
    suite_main(run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
