"""Categorical cross-entropy: jxent vs optax, time and compiled memory.

Measures ``jit(value_and_grad(mean loss))`` at N rows x K classes for integer labels,
integer labels with label smoothing 0.1 (optax: ``smooth_labels(one_hot(y))`` +
``softmax_cross_entropy``, the way optax users write it) and dense soft targets.

    python -m benchmarks.bench_categorical [--rows 1024] [--classes 32768]

Two suites: ``categorical`` (:func:`run`, the vocabulary sweep at a fixed row count) and
``classification`` (:func:`run_classification`, classifiers' shapes: 256 to 65536 rows
of 10 to 1000 classes, where a call takes microseconds to a second and fixed costs
matter). The classification sweep repeats each cell in rounds, each round long enough
to take a stable median (:func:`interleaved`), and keeps every round's ratio.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from benchmarks.common import compiled_memory, measure, row, specs_of

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


#: The classification sweep: batch sizes and class counts of classifiers (CIFAR-10 to
#: ImageNet), every case, both dtypes.
CLASSIFICATION_ROWS = (256, 1024, 4096, 16384, 65536)
CLASSIFICATION_CLASSES = (10, 100, 1000)


def interleaved(
    fns: dict,
    args,
    *,
    rounds: int = 3,
    round_seconds: float = 0.5,
    min_calls: int = 5,
    max_calls: int = 400,
    warmup: int = 3,
) -> tuple[dict[str, float], list[float], int]:
    """Median seconds per call of each jitted contender, over ``rounds`` rounds.

    In a round every contender is called ``n`` times, alternating call by call (the
    order reversed every other call), so that all see the same load; ``n`` makes a
    round last about ``round_seconds`` (at least ``min_calls``, at most ``max_calls``).
    Returns the medians over all calls, the baseline-over-first ratio of each round's
    medians (its spread says how noisy the run was), and ``n``.
    """
    jitted = {name: jax.jit(fn) for name, fn in fns.items()}
    for fn in jitted.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for fn in jitted.values():
        jax.block_until_ready(fn(*args))
    per_call = (time.perf_counter() - start) / len(jitted)
    n = int(min(max_calls, max(min_calls, round_seconds / max(per_call, 1e-6) / len(jitted))))
    order = list(jitted.items())
    samples: dict[str, list[list[float]]] = {name: [] for name in jitted}
    for _ in range(rounds):
        for name in jitted:
            samples[name].append([])
        for i in range(n):
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                samples[name][-1].append(time.perf_counter() - t0)
    first, *rest = jitted
    ratios = [
        float(np.median(b) / np.median(a))
        for a, b in zip(samples[first], samples[rest[-1]], strict=True)
    ]
    medians = {name: float(np.median(np.concatenate(s))) for name, s in samples.items()}
    return medians, ratios, n


def _classification_cell(n: int, k: int, dtype, rounds: int, round_seconds: float):
    """The rows of one N x K cell: every case, jxent against optax."""
    key_x, key_y = jax.random.split(jax.random.key(0))
    args = (
        (3 * jax.random.normal(key_x, (n, k))).astype(dtype),
        jax.random.randint(key_y, (n,), 0, k),
    )
    for case, (jx, ox) in _cases(k).items():
        fns = {"jxent": jax.value_and_grad(jx), "optax": jax.value_and_grad(ox)}
        medians, ratios, calls = interleaved(fns, args, rounds=rounds, round_seconds=round_seconds)
        contenders = {
            name: {"ms": 1e3 * medians[name], **compiled_memory(fn, *specs_of(args))}
            for name, fn in fns.items()
        }
        rounded = [round(r, 3) for r in ratios]
        yield row(
            case, dtype, (n, k), contenders, "optax", round_ratios=rounded, calls_per_round=calls
        )


def run_classification(
    rows=CLASSIFICATION_ROWS,
    classes=CLASSIFICATION_CLASSES,
    dtypes=DTYPES,
    *,
    rounds: int = 3,
    round_seconds: float = 0.5,
    progress=None,
) -> list[dict]:
    """Every case at every rows x classes cell: jxent against optax, ``rounds`` rounds."""
    out = []
    for dtype in dtypes:
        for n in rows:
            for k in classes:
                for r in _classification_cell(n, k, dtype, rounds, round_seconds):
                    out.append(r)
                    if progress is not None:
                        progress()
    return out


if __name__ == "__main__":
    from benchmarks.run import suite_main

    suite_main("categorical")
