"""Categorical cross-entropy: jxent vs optax, time and compiled memory.

Measures ``jit(value_and_grad(mean loss))`` at N rows x K classes for integer labels,
integer labels with label smoothing 0.1 (optax: ``smooth_labels(one_hot(y))`` +
``softmax_cross_entropy``, the way optax users write it) and dense soft targets.

    python -m benchmarks.bench_categorical [--rows 1024] [--classes 32768]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jxent
from benchmarks.common import measure, row

DTYPES = (jnp.float32, jnp.bfloat16)


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
        "dense soft targets (computed in the step)": (jx_dense, ox_dense),
    }


CASES = tuple(_cases(2))


def run(rows: int, classes: int, repeats: int = 7, progress=None, dtypes=DTYPES) -> list[dict]:
    key_x, key_y = jax.random.split(jax.random.key(0))
    labels = jax.random.randint(key_y, (rows,), 0, classes)
    out = []
    for dtype in dtypes:
        logits = (3 * jax.random.normal(key_x, (rows, classes))).astype(dtype)
        for case, (jx, ox) in _cases(classes).items():
            fns = {"jxent": jax.value_and_grad(jx), "optax": jax.value_and_grad(ox)}
            got = measure(fns, (logits, labels), repeats=repeats)
            out.append(row(case, dtype, (rows, classes), got, "optax"))
            if progress is not None:
                progress()
    return out


if __name__ == "__main__":
    from benchmarks.run import suite_main

    suite_main("categorical")
