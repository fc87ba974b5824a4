"""Every public loss exports with ``jax.export`` for CPU, CUDA and TPU at once (issue 13):
one serialized program that carries each platform's own plan (``jxent._backend``), which
round-trips and gives, called here on CPU, the value and gradient of the direct call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jxent

PLATFORMS = ("cpu", "cuda", "tpu")
RNG = np.random.default_rng(0)
LOGITS = jnp.asarray(RNG.normal(size=(6, 40)), jnp.float32)
TARGETS = jax.nn.softmax(jnp.asarray(RNG.normal(size=(6, 40)), jnp.float32))
LABELS = jnp.asarray(RNG.integers(0, 40, size=(6,)), jnp.int32)
TARGETS_LOGITS = jnp.asarray(RNG.normal(size=(6, 40)), jnp.float32)
BINARY = jnp.asarray(RNG.integers(0, 2, size=(6, 40)), jnp.float32)
X = jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)
W = jnp.asarray(RNG.normal(size=(8, 40)), jnp.float32)
TOP_K = jax.lax.top_k(jax.nn.log_softmax(LOGITS), 5)[::-1]  # (indices, log-probabilities)

# name -> (loss of one differentiable array, that array)
CASES = {
    "softmax_cross_entropy": (lambda z: jxent.softmax_cross_entropy(z, TARGETS), LOGITS),
    "softmax_cross_entropy_with_integer_labels": (
        lambda z: jxent.softmax_cross_entropy_with_integer_labels(
            z, LABELS, label_smoothing=0.1, z_loss=1e-4
        ),
        LOGITS,
    ),
    "safe_softmax_cross_entropy": (
        lambda z: jxent.safe_softmax_cross_entropy(z, TARGETS),
        LOGITS,
    ),
    "poly_loss_cross_entropy": (lambda z: jxent.poly_loss_cross_entropy(z, TARGETS), LOGITS),
    "kl_divergence": (lambda z: jxent.kl_divergence(jax.nn.log_softmax(z), TARGETS), LOGITS),
    "kl_divergence_with_log_targets": (
        lambda z: jxent.kl_divergence_with_log_targets(jax.nn.log_softmax(z), jnp.log(TARGETS)),
        LOGITS,
    ),
    "softmax_kl_divergence": (
        lambda z: jxent.softmax_kl_divergence(z, 2 * LOGITS, temperature=2.0),
        LOGITS,
    ),
    "entropy": (lambda z: jxent.entropy(z), LOGITS),
    "softmax_jensen_shannon_divergence": (
        lambda z: jxent.softmax_jensen_shannon_divergence(z, TARGETS_LOGITS, beta=0.3),
        LOGITS,
    ),
    "sigmoid_binary_cross_entropy": (
        lambda z: jxent.sigmoid_binary_cross_entropy(z, BINARY),
        LOGITS,
    ),
    "binary_cross_entropy": (
        lambda z: jxent.binary_cross_entropy(jax.nn.sigmoid(z), BINARY),
        LOGITS,
    ),
    "sigmoid_focal_loss": (lambda z: jxent.sigmoid_focal_loss(z, BINARY, 0.25, 2.0), LOGITS),
    "smooth_labels": (lambda z: jxent.smooth_labels(jax.nn.softmax(z), 0.1), LOGITS),
    "linear_softmax_cross_entropy": (
        lambda x: jxent.linear_softmax_cross_entropy(x, W, LABELS, reduction="none"),
        X,
    ),
    "linear_softmax_cross_entropy (single pass)": (
        lambda x: jxent.linear_softmax_cross_entropy(x, W, LABELS, label_smoothing=0.1)[None],
        X,
    ),
    "linear_log_probs": (
        lambda x: jnp.stack(
            jxent.linear_log_probs(x, W, LABELS, temperature=0.8, return_entropy=True)
        ),
        X,
    ),
    "linear_entropy": (lambda x: jxent.linear_entropy(x, W), X),
    "linear_softmax_kl_divergence": (
        lambda x: jxent.linear_softmax_kl_divergence(x, W, TOP_K, reduction="none"),
        X,
    ),
    "linear_softmax_jensen_shannon_divergence": (
        lambda x: jxent.linear_softmax_jensen_shannon_divergence(
            x, W, TOP_K, beta=0.3, reduction="none"
        ),
        X,
    ),
    "linear_distillation_loss": (
        lambda x: jxent.linear_distillation_loss(
            x, W, LABELS, TOP_K, temperature=2.0, reduction="none"
        ),
        X,
    ),
}


def test_every_public_loss_has_a_case():
    names = {n.split(" ")[0] for n in CASES}
    assert names >= set(jxent.__all__) - {"check_labels"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_round_trip(name):
    loss, arg = CASES[name]

    def value_and_grad(a):
        out, vjp = jax.vjp(loss, a)
        return out, vjp(jnp.ones_like(out))[0]

    exported = export.export(jax.jit(value_and_grad), platforms=PLATFORMS)(
        jax.ShapeDtypeStruct(arg.shape, arg.dtype)
    )
    assert exported.platforms == PLATFORMS
    restored = export.deserialize(exported.serialize())
    got = restored.call(arg)
    want = jax.jit(value_and_grad)(arg)
    # The same program, compiled from its serialized form: equal up to the rounding of a
    # few reassociated float32 operations.
    eps = float(jnp.finfo(jnp.float32).eps)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=8 * eps, atol=8 * eps)
