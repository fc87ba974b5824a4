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
W_TEACHER = jnp.asarray(RNG.normal(size=(6, 40)), jnp.float32)
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
    "linear_entropy": (lambda x: jxent.linear_entropy(x, W, reduction="none"), X),
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
    # The teacher's hidden states and weight (two forward passes).
    "linear_softmax_jensen_shannon_divergence (hidden teacher)": (
        lambda x: jxent.linear_softmax_jensen_shannon_divergence(
            x, W, (jnp.tanh(x[:, :6]), W_TEACHER), beta=0.3, reduction="none"
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


# The fused losses with a symbolic token count: exported once for ``n`` tokens (the
# plan's token block then depends on D and V alone, and the tokens are padded to a
# multiple of it), called at two token counts. Each case: a loss of x [*batch, D], the
# labels, the teacher's top-k indices and log-probabilities [*batch, k], and chunk_size,
# and the chunk_size to export with: None (one token block of 4096, 6 tokens padded to
# it) or (4, c) (several token blocks, the last one padded; slower to compile). The
# direct call takes the default plan for its static token count (one block, no padding).
SYMBOLIC = {
    "linear_softmax_cross_entropy": (
        lambda x, y, i, lp, c: jxent.linear_softmax_cross_entropy(
            x, W, y, reduction="none", ignore_index=3, label_smoothing=0.1, chunk_size=c
        ),
        (4, 16),
    ),
    "linear_softmax_cross_entropy (single pass)": (
        lambda x, y, i, lp, c: jxent.linear_softmax_cross_entropy(
            x, W, y, label_smoothing=0.1, where=y != 3, chunk_size=c
        )[None],
        (4, 40),
    ),
    "linear_log_probs": (
        lambda x, y, i, lp, c: jnp.stack(
            jxent.linear_log_probs(x, W, y, temperature=0.8, return_entropy=True, chunk_size=c)
        ),
        None,
    ),
    "linear_entropy": (
        lambda x, y, i, lp, c: jxent.linear_entropy(x, W, reduction="none", chunk_size=c),
        None,
    ),
    "linear_softmax_kl_divergence": (
        lambda x, y, i, lp, c: jxent.linear_softmax_kl_divergence(
            x, W, (i, lp), reduction="none", chunk_size=c
        ),
        None,
    ),
    "linear_distillation_loss": (
        lambda x, y, i, lp, c: jxent.linear_distillation_loss(
            x, W, y, (i, lp), temperature=2.0, chunk_size=c
        )[None],
        None,
    ),
    # The teacher's hidden states [*batch, D_t] (a function of x here, a constant to the
    # loss) and weight: a second logits stream, padded with the tokens.
    "linear_distillation_loss (hidden teacher)": (
        lambda x, y, i, lp, c: jxent.linear_distillation_loss(
            x, W, y, (jnp.tanh(x[..., :6]), W_TEACHER), temperature=2.0, chunk_size=c
        )[None],
        None,
    ),
    "linear_softmax_jensen_shannon_divergence": (
        lambda x, y, i, lp, c: jxent.linear_softmax_jensen_shannon_divergence(
            x, W, (i, lp), beta=0.3, reduction="sum", chunk_size=c
        )[None],
        None,
    ),
    # A second forward pass over the blocks, its per-token sums padded with the tokens;
    # several token blocks (the last one padded), the reverse-KL end.
    "linear_softmax_jensen_shannon_divergence (hidden teacher)": (
        lambda x, y, i, lp, c: jxent.linear_softmax_jensen_shannon_divergence(
            x, W, (jnp.tanh(x[..., :6]), W_TEACHER, W[0]), beta=1.0, reduction="none", chunk_size=c
        ),
        (4, 16),
    ),
}


def _symbolic_args(batch: tuple[int, ...]):
    rng = np.random.default_rng(sum(batch))
    x = jnp.asarray(rng.normal(size=(*batch, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 40, size=batch), jnp.int32)
    top_k = jax.lax.top_k(jax.nn.log_softmax(rng.normal(size=(*batch, 40))), 5)
    return x, y, top_k[1].astype(jnp.int32), top_k[0].astype(jnp.float32)


def _value_and_grad(loss, chunk_size):
    def value_and_grad(x, *rest):
        out, vjp = jax.vjp(lambda x: loss(x, *rest, chunk_size), x)
        return out, vjp(jnp.ones_like(out))[0]

    return jax.jit(value_and_grad)


def _symbolic_round_trip(name: str, batch_spec: str, batches):
    loss, chunk_size = SYMBOLIC[name]
    batch = export.symbolic_shape(batch_spec)
    specs = (
        jax.ShapeDtypeStruct((*batch, 8), jnp.float32),
        jax.ShapeDtypeStruct(batch, jnp.int32),
        jax.ShapeDtypeStruct((*batch, 5), jnp.int32),
        jax.ShapeDtypeStruct((*batch, 5), jnp.float32),
    )
    exported = export.export(_value_and_grad(loss, chunk_size), platforms=PLATFORMS)(*specs)
    assert exported.platforms == PLATFORMS
    restored = export.deserialize(exported.serialize())
    for shape in batches:
        args = _symbolic_args(shape)
        got = restored.call(*args)
        # Another plan (the static token count's blocks, no padding): equal to rounding.
        want = _value_and_grad(loss, None)(*args)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", sorted(SYMBOLIC))
def test_fused_export_symbolic_tokens(name):
    """Exported for ``symbolic_shape("n")`` tokens: one serialized program for any ``n``,
    with the value and gradient of the direct call at ``n = 6`` and ``n = 13``."""
    _symbolic_round_trip(name, "n", [(6,), (13,)])


def test_fused_export_symbolic_batch():
    """A batch shape ``(b, t)`` with both symbolic: ``b t`` tokens."""
    _symbolic_round_trip("linear_entropy", "b, t", [(2, 3), (3, 5)])


def test_symbolic_blocks_must_be_padded():
    """The block loop takes a symbolic length only as a known multiple of the block."""
    from jxent._fused import blocks

    def total(a):
        body = lambda start, length, c: c + jnp.sum(jax.lax.dynamic_slice_in_dim(a, start, length))  # noqa: E731
        return blocks.for_blocks(a.shape[0], 4, body, jnp.zeros((), a.dtype))

    n = export.symbolic_shape("n")
    with pytest.raises(ValueError, match="multiple of the block"):
        export.export(jax.jit(total))(jax.ShapeDtypeStruct(n, jnp.float32))
    padded = export.symbolic_shape("4 * k")
    exported = export.export(jax.jit(total))(jax.ShapeDtypeStruct(padded, jnp.float32))
    assert float(exported.call(jnp.arange(12, dtype=jnp.float32))) == 66.0


def test_fused_export_symbolic_bfloat16():
    """bfloat16 with a symbolic token count: at ``n = 5`` the block loop runs once, and
    XLA:CPU removes it (its start is kept traced: ``jxent._fused.blocks.for_blocks``)."""
    w = W.astype(jnp.bfloat16)

    def value_and_grad(x, y):
        loss = lambda x, w: jxent.linear_softmax_cross_entropy(x, w, y)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    n = export.symbolic_shape("n")
    specs = (jax.ShapeDtypeStruct((*n, 8), jnp.bfloat16), jax.ShapeDtypeStruct(n, jnp.int32))
    exported = export.export(jax.jit(value_and_grad), platforms=PLATFORMS)(*specs)
    restored = export.deserialize(exported.serialize())
    for tokens in (5, 37):
        x, y = _symbolic_args((tokens,))[:2]
        x = x.astype(jnp.bfloat16)
        got, want = restored.call(x, y), jax.jit(value_and_grad)(x, y)
        for g, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(
                np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-5
            )
