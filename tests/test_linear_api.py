"""The public entry point of jxent/linear/api.py: argument errors and the structural
memory property (compiled temporary memory, nothing is allocated)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

LINEAR = jxent.linear_softmax_cross_entropy
N, D, V = 6, 4, 10
MiB = 2**20


def _args():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    y = jnp.asarray(rng.integers(0, V, size=(N,)), jnp.int32)
    return x, w, y


def test_exported_at_top_level():
    assert jxent.linear_softmax_cross_entropy is jxent.linear.linear_softmax_cross_entropy
    assert "linear_softmax_cross_entropy" in jxent.__all__


# --------------------------------------------------------------------------------------------
# Errors: raised at trace time, naming the argument
# --------------------------------------------------------------------------------------------

X, W, Y = _args()
BAD_INPUTS = [
    ("x_integer", dict(x=jnp.ones((N, D), jnp.int32)), TypeError, "x must have a floating"),
    ("x_scalar", dict(x=jnp.float32(1.0), y=jnp.int32(0)), ValueError, "x must have shape"),
    ("w_integer", dict(w=jnp.ones((D, V), jnp.int32)), TypeError, "w must have a floating"),
    ("w_1d", dict(w=jnp.ones((D * V,))), ValueError, r"w must have shape \(D, V\)"),
    ("w_wrong_d", dict(w=jnp.ones((D + 1, V))), ValueError, r"w must have shape \(D, V\)"),
    ("w_transposed", dict(w=jnp.ones((V, D))), ValueError, "embedding.T"),
    ("w_no_classes", dict(w=jnp.ones((D, 0))), ValueError, "num_classes >= 1"),
    ("labels_float", dict(y=jnp.zeros((N,))), TypeError, "labels must have an integer"),
    ("labels_shape", dict(y=jnp.zeros((N, 1), jnp.int32)), ValueError, "labels must have shape"),
    ("bias_shape", dict(bias=jnp.ones((V + 1,))), ValueError, "bias must have shape"),
    ("bias_integer", dict(bias=jnp.ones((V,), jnp.int32)), TypeError, "bias must have a floating"),
    ("where_shape", dict(where=jnp.ones((N, V), bool)), ValueError, "where must have shape"),
    ("where_dtype", dict(where=jnp.ones((N,))), TypeError, "where must be a boolean"),
    ("class_weights_shape", dict(class_weights=jnp.ones((V - 1,))), ValueError, "class_weights"),
    ("class_weights_int", dict(class_weights=jnp.ones((V,), jnp.int32)), TypeError, "class_w"),
    ("smoothing_range", dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("z_loss_negative", dict(z_loss=-1.0), ValueError, "z_loss"),
    ("soft_cap_zero", dict(logit_soft_cap=0.0), ValueError, "logit_soft_cap"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("chunk_zero", dict(chunk_size=0), ValueError, "chunk_size must be positive"),
    ("chunk_negative", dict(chunk_size=-4), ValueError, "chunk_size must be positive"),
    ("chunk_pair_zero", dict(chunk_size=(0, 4)), ValueError, "chunk_size must be positive"),
    ("chunk_float", dict(chunk_size=2.5), TypeError, "chunk_size"),
    ("chunk_bool", dict(chunk_size=True), TypeError, "chunk_size"),
    ("chunk_string", dict(chunk_size="64"), TypeError, "chunk_size"),
    ("chunk_triple", dict(chunk_size=(1, 2, 3)), ValueError, "chunk_size"),
    ("num_classes_zero", dict(num_classes=0), ValueError, r"num_classes must be in \[1, 10\]"),
    ("num_classes_above_v", dict(num_classes=V + 1), ValueError, "num_classes must be in"),
    ("num_classes_float", dict(num_classes=4.0), TypeError, "num_classes must be a positive"),
    ("num_classes_bool", dict(num_classes=True), TypeError, "num_classes must be a positive"),
    (
        "bias_for_classes_not_columns",
        dict(bias=jnp.ones((V - 2,)), num_classes=V - 2),
        ValueError,
        "bias must have shape",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise(case):
    _, overrides, error, match = case
    kw = dict(overrides)
    x, w, y = kw.pop("x", X), kw.pop("w", W), kw.pop("y", Y)
    with pytest.raises(error, match=match):
        LINEAR(x, w, y, **kw)
    with pytest.raises(error, match=match):  # at trace time, under jit too
        jax.jit(lambda x, w, y: LINEAR(x, w, y, **kw))(x, w, y)


# --------------------------------------------------------------------------------------------
# Structural memory property
# --------------------------------------------------------------------------------------------


def _temp_mib(loss, n, d, v, dtype=jnp.float32):
    specs = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*specs).compile().memory_analysis().temp_size_in_bytes / MiB


def test_compiled_temp_memory_does_not_hold_the_logits():
    """N=2048, D=256, V=32000, float32: the logits alone are 250 MiB."""
    n, d, v = 2048, 256, 32000
    logits_mib = n * v * 4 / MiB
    # The unfused baseline: the whole logits array, then the categorical loss.
    unfused = _temp_mib(
        lambda x, w, y: jxent.softmax_cross_entropy_with_integer_labels(x @ w, y, reduction="mean"),
        n,
        d,
        v,
    )
    assert unfused > logits_mib
    bound = 128  # MiB: a few blocks plus O(N * D + D * V) accumulators
    for kw in ({}, {"reduction": "none"}, {"chunk_size": 4096}, {"label_smoothing": 0.1}):
        fused = _temp_mib(lambda x, w, y, kw=kw: jnp.sum(LINEAR(x, w, y, **kw)), n, d, v)
        assert fused < bound < unfused, (kw, fused, unfused)


def test_compiled_temp_memory_streaming_is_flat_in_n():
    """Doubling the tokens adds the O(N * D) accumulators, never N * V."""
    d, v = 256, 32000

    def temp(n):
        return _temp_mib(lambda x, w, y: LINEAR(x, w, y, chunk_size=(512, 2048)), n, d, v)

    grow = temp(4096) - temp(2048)
    assert grow < 2048 * d * 4 * 3 / MiB + 1  # at most a few [N, D] float32 arrays


def test_schedule_trades_memory_for_a_product():
    """D=2048, V=40000 (compiled only): the float32 [D, V] accumulator, 312.5 MiB, is over
    the default's 256 MiB, so "auto" streams; schedule="single_pass" holds it (and
    computes the loss in three products), "streaming" stays within a few panels."""
    n, d, v = 256, 2048, 40000
    accumulator = d * v * 4 / MiB

    def temp(schedule):
        fn = lambda x, w, y: LINEAR(x, w, y, schedule=schedule)  # noqa: E731
        return _temp_mib(fn, n, d, v, dtype=jnp.bfloat16)

    auto, single, streaming = temp("auto"), temp("single_pass"), temp("streaming")
    assert single >= accumulator > 4 * max(auto, streaming), (auto, single, streaming)
    assert auto == streaming


def test_schedule_is_checked():
    x, w = jnp.ones((4, 3)), jnp.ones((3, 5))
    y = jnp.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"schedule must be one of \('auto', 'single_pass'"):
        LINEAR(x, w, y, schedule="fast")
    with pytest.raises(ValueError, match='needs reduction="sum" or "mean"'):
        LINEAR(x, w, y, schedule="single_pass", reduction="none")
    with pytest.raises(ValueError, match="not with per-token outputs"):
        LINEAR(x, w, y, schedule="single_pass", return_lse=True)
    with pytest.raises(ValueError, match="needs vocabulary blocks spanning all 5 columns"):
        LINEAR(x, w, y, schedule="single_pass", chunk_size=2)
    want = LINEAR(x, w, y)
    for schedule in ("single_pass", "streaming"):
        np.testing.assert_allclose(LINEAR(x, w, y, schedule=schedule), want, rtol=1e-12)


def _dot_precisions(fn, *args):
    """The precision of every matrix product in ``value_and_grad(fn)``'s lowering."""
    text = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).as_text()
    lines = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    return [line.split("precision = ")[1].split("]")[0] + "]" for line in lines]


def test_precision_reaches_every_product():
    """precision= (issue 24) on every matrix product of every fused loss, forward and
    backward, teacher streams included; None: x @ w's (jax.default_matmul_precision)."""
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32), jnp.ones((6, 20), jnp.float32)
    y = jnp.asarray(rng.integers(0, 20, size=(12,)))
    top = (y[:, None], jnp.zeros((12, 1), jnp.float32))
    losses = {
        "xent": lambda x, w, **kw: LINEAR(x, w, y, chunk_size=(4, 8), **kw),
        "entropy": lambda x, w, **kw: jxent.linear_entropy(x, w, **kw),
        "log_probs": lambda x, w, **kw: jxent.linear_log_probs(x, w, y, **kw).sum(),
        "kl": lambda x, w, **kw: jxent.linear_softmax_kl_divergence(x, w, top, **kw),
        "distill": lambda x, w, **kw: jxent.linear_distillation_loss(x, w, y, (x, w), **kw),
        "jsd": lambda x, w, **kw: jxent.linear_softmax_jensen_shannon_divergence(
            x, w, (x, w), beta=0.5, chunk_size=(4, 8), **kw
        ),
    }
    for name, loss in losses.items():
        highest = _dot_precisions(functools.partial(loss, precision="highest"), x, w)
        assert len(highest) >= 3 and set(highest) == {"[HIGHEST, HIGHEST]"}, (name, highest)
        pair = _dot_precisions(functools.partial(loss, precision=("high", "default")), x, w)
        assert set(pair) == {"[HIGH, DEFAULT]"}, (name, pair)
        assert set(_dot_precisions(loss, x, w)) == {"[DEFAULT, DEFAULT]"}, name
        with jax.default_matmul_precision("highest"):
            assert set(_dot_precisions(loss, x, w)) == {"[HIGHEST, HIGHEST]"}, name
    with pytest.raises(ValueError, match="precision must be None, a jax.lax.Precision"):
        LINEAR(x, w, y, precision="fast")
    with pytest.raises(ValueError, match="precision must be None, a jax.lax.Precision"):
        LINEAR(x, w, y, precision=())
    # A pair is (x's, w's) on every product, whatever w's layout: with w as [V, D] the
    # weight gradient's product takes dz first, so the pair is swapped there.
    table = jnp.ones((20, 6), jnp.float32)
    vd = _dot_precisions(
        lambda x, w: LINEAR(x, w, y, w_layout="vd", precision=("high", "default")), x, table
    )
    assert sorted(set(vd)) == ["[DEFAULT, HIGH]", "[HIGH, DEFAULT]"], vd


def test_gemma2_shape_memory_bar():
    """The issue's bar, compiled only: below 1/50 of the unfused step (about 360 MiB)."""
    fused = _temp_mib(lambda x, w, y: LINEAR(x, w, y), 8192, 2304, 256000, dtype=jnp.bfloat16)
    assert fused < 360, fused
