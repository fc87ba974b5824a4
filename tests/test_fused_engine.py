"""Values and gradients of the blocked engine (jxent/_fused/engine.py) through the fused
cross-entropy (jxent.linear_softmax_cross_entropy).
Expectations come from two places, never from the code under test:

* the independent float64 NumPy reference ``tests/reference_linear.py`` (the loss
  and its gradients w.r.t. ``x``, ``w`` and ``b``, row by row): float64 inputs,
  tight tolerances;
* the same reference for float32/bfloat16 inputs (their exact values in float64), with
  bounds derived from epsilon and the reference's error scales (``float_tolerance``
  times the sum of the magnitudes behind each value): never ``jxent`` itself.

Every schedule is exercised: vocabulary streaming (a vocabulary block narrower than
V) and the single pass (a block spanning V with a summed/averaged loss), with block
sizes that do and do not divide N and V.
"""

from __future__ import annotations

from typing import NamedTuple

import checks
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import reference_linear as ref

import jxent
from jxent._fused import contract, engine, plan
from jxent._fused.plan import MIN_VOCAB_RUN, block_groups
from jxent.linear import linear_softmax_cross_entropy as LINEAR

# float64 comparisons need x64 (tests/conftest.py enables it for the whole suite too).
jax.config.update("jax_enable_x64", True)

N, D, V = 13, 6, 37
REDUCTIONS = ("none", "sum", "mean")
# (token block, vocabulary block): streaming with and without token blocks, blocks
# that divide neither N nor V, one vocabulary block, and single-pass token blocks.
CHUNKS = {
    "auto": None,
    "vocab7": 7,
    "tok5_vocab11": (5, 11),
    "tok13_vocab37": (13, 37),
    "tok4_vocabV": (4, V),
    "tok6_vocab8": (6, 8),
}


def assert_close(actual, expected, rtol=1e-9, atol=1e-9):
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol, atol
    )


def assert_no_nan(*arrays):
    for a in arrays:
        assert not np.any(np.isnan(np.asarray(a, dtype=np.float64)))


def make_case(seed=0, batch=(N,), d=D, v=V, dtype=np.float64, scale=1.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=batch + (d,)) * scale
    w = rng.normal(size=(d, v))
    b = rng.normal(size=(v,)) * 0.5
    y = rng.integers(0, v, size=batch)
    return x.astype(dtype), w.astype(dtype), b.astype(dtype), y.astype(np.int32)


def full_options(seed, batch, v, ignore=True):
    """Every option at once: ignore_index, where, smoothing, z-loss, soft cap, weights."""
    rng = np.random.default_rng(seed + 100)
    opts = {
        "where": rng.random(batch) < 0.8,
        "label_smoothing": 0.2,
        "z_loss": 1e-2,
        "logit_soft_cap": 4.0,
        "class_weights": rng.uniform(0.5, 2.0, size=(v,)),
    }
    if ignore:
        opts["ignore_index"] = -100
    return opts


def numpy_expected(x, w, b, y, *, reduction, cotangent=None, **opts):
    """(loss, dx, dw, db) in float64 from tests/reference_linear.py."""
    r = ref.linear_softmax_cross_entropy(
        x, w, np.asarray(y), bias=b, reduction=reduction, cotangent=cotangent, **opts
    )
    return r.loss, r.grad_x, r.grad_w, r.grad_bias


def value_and_grads(fn, x, w, b, cotangent):
    """Loss and the gradients of ``sum(cotangent * loss)`` w.r.t. (x, w, b), under jit."""

    @jax.jit
    def run(x, w, b, ct):
        out, vjp = jax.vjp(fn, x, w, b)
        return out, vjp(ct.astype(out.dtype))

    return run(x, w, b, jnp.asarray(cotangent))


def assert_matches_reference(out, grads, x, w, b, y, dtype, reduction="mean", **opts):
    """``out`` and ``grads`` (of x, w, b; None to skip) of float32/bfloat16 inputs against
    the float64 reference of their exact values, within epsilon-derived bounds.

    Logits and sums accumulate in float32 whatever the inputs; bfloat16 gradients are also
    rounded to bfloat16 (from a bfloat16 dlogits): one more ``float_tolerance`` of it."""
    exact = [
        None if a is None else np.asarray(jnp.asarray(a).astype(jnp.float64)) for a in (x, w, b)
    ]
    opts = {k: np.asarray(a) if isinstance(a, jax.Array) else a for k, a in opts.items()}
    r = ref.linear_softmax_cross_entropy(
        exact[0], exact[1], np.asarray(y), bias=exact[2], reduction=reduction, **opts
    )
    terms = exact[0].size * exact[1].shape[1]
    tol = checks.float_tolerance(jnp.float32, terms)
    grad_tol = tol + (checks.float_tolerance(jnp.bfloat16, terms) if dtype == jnp.bfloat16 else 0)
    ref.assert_within(out, r.loss, tol * r.loss_scale, "loss")
    wanted = zip(
        ("dx", "dw", "dbias"),
        grads,
        (r.grad_x, r.grad_w, r.grad_bias),
        (r.grad_x_scale, r.grad_w_scale, r.grad_bias_scale),
        strict=True,
    )
    for name, g, e, scale in wanted:
        if g is not None:
            assert g.dtype == dtype, (name, g.dtype)
            ref.assert_within(g, e, grad_tol * scale, name)


def _jax_opts(opts):
    out = dict(opts)
    for k in ("where", "class_weights"):
        if k in out:
            out[k] = jnp.asarray(out[k])
    return out


# --------------------------------------------------------------------------------------------
# float64 against the NumPy reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk", list(CHUNKS), ids=list(CHUNKS))
def test_all_options_match_numpy_reference(chunk, reduction):
    x, w, b, y = make_case(seed=1)
    y[2] = -100  # ignored
    opts = full_options(1, (N,), V)
    rng = np.random.default_rng(2)
    ct = rng.normal(size=(N,)) if reduction == "none" else np.float64(0.7)
    chunk_size = CHUNKS[chunk]

    def f(x, w, b):
        return LINEAR(
            x,
            w,
            jnp.asarray(y),
            bias=b,
            reduction=reduction,
            chunk_size=chunk_size,
            **_jax_opts(opts),
        )

    out, (gx, gw, gb) = value_and_grads(f, x, w, b, ct)
    loss, dx, dw, db = numpy_expected(x, w, b, y, reduction=reduction, cotangent=ct, **opts)
    assert out.dtype == jnp.float64
    assert_close(out, loss)
    assert_close(gx, dx)
    assert_close(gw, dw)
    assert_close(gb, db)


@pytest.mark.parametrize("chunk", ["auto", "vocab7", "tok5_vocab11"])
def test_plain_matches_numpy_reference(chunk):
    x, w, _, y = make_case(seed=3)
    for reduction in ("mean", "none"):
        ct = np.ones((N,)) if reduction == "none" else np.float64(1.0)

        def f(x, w, b, reduction=reduction):
            return LINEAR(x, w, jnp.asarray(y), reduction=reduction, chunk_size=CHUNKS[chunk])

        out, (gx, gw, gb) = value_and_grads(f, x, w, jnp.zeros(()), ct)
        loss, dx, dw, _ = numpy_expected(x, w, None, y, reduction=reduction, cotangent=ct)
        assert_close(out, loss)
        assert_close(gx, dx)
        assert_close(gw, dw)
        assert float(gb) == 0.0


def test_large_logits_stay_exact():
    """Logits of order 1e4 with a common offset: the stable sums lose no digits."""
    x, w, b, y = make_case(seed=4, scale=1.0)
    b = b + 1e4
    opts = {"label_smoothing": 0.3, "z_loss": 1e-6}
    for chunk in (7, (4, V)):

        def f(x, w, b, chunk=chunk):
            return LINEAR(x, w, jnp.asarray(y), bias=b, chunk_size=chunk, **opts)

        out, grads = value_and_grads(f, x, w, b, np.float64(1.0))
        loss, *expected = numpy_expected(x, w, b, y, reduction="mean", **opts)
        assert_close(out, loss)
        for g, e in zip(grads, expected, strict=True):
            assert_close(g, e, rtol=1e-7, atol=1e-7)


# Blocks over groups of the tokens and of the vocabulary (jxent._fused.blocks' module
# docstring): N = 16 and V = 2048 give (token groups, vocabulary groups) of (4, 8), (2, 8)
# with shorter last blocks (1280 = 8 groups x 160 columns: one block of 8 x 160 and one
# of 8 x 96), and 8 token groups in the single pass.
GN, GV = 16, 2048
GROUPED_CHUNKS = {"tok4_vocab1024": (4, 1024), "tok6_vocab1280": (6, 1280), "tok8_vocabV": (8, GV)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk", list(GROUPED_CHUNKS), ids=list(GROUPED_CHUNKS))
def test_grouped_blocks_match_numpy_reference(chunk, reduction):
    tb, vb = GROUPED_CHUNKS[chunk]
    assert block_groups(GN, tb) > 1
    assert vb == GV or block_groups(GV, vb, MIN_VOCAB_RUN) == 8
    x, w, b, y = make_case(seed=22, batch=(GN,), v=GV)
    y[5] = -100
    opts = full_options(22, (GN,), GV)
    ct = np.random.default_rng(23).normal(size=(GN,)) if reduction == "none" else np.float64(0.6)

    def f(x, w, b):
        return LINEAR(
            x,
            w,
            jnp.asarray(y),
            bias=b,
            reduction=reduction,
            chunk_size=(tb, vb),
            **_jax_opts(opts),
        )

    out, grads = value_and_grads(f, x, w, b, ct)
    loss, *expected = numpy_expected(x, w, b, y, reduction=reduction, cotangent=ct, **opts)
    assert_close(out, loss)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e)


@pytest.mark.parametrize("chunk", list(GROUPED_CHUNKS), ids=list(GROUPED_CHUNKS))
def test_grouped_blocks_bfloat16(chunk):
    """bfloat16 blocks sliced from the groups (XLA:CPU's slices run in conditionals)."""
    x, w, b, y = make_case(seed=24, batch=(GN,), d=16, v=GV, dtype=np.float32, scale=0.5)
    xb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, b))
    yj = jnp.asarray(y)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_soft_cap": 8.0}

    def loss(x, w, b):
        return LINEAR(x, w, yj, bias=b, reduction="sum", chunk_size=GROUPED_CHUNKS[chunk], **opts)

    with checks.x64_off():
        got, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(xb, wb, bb)
    assert_matches_reference(got, grads, xb, wb, bb, y, jnp.bfloat16, "sum", **opts)


PV = 48  # the padding test's columns: 37 classes and 11 padding columns


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk", [7, (5, 11), (6, 20), (4, PV)])
def test_num_classes_padding(chunk, reduction):
    """w, bias and class weights padded with columns (any values) past num_classes: the loss
    and gradients of the unpadded problem; exactly zero gradient on the padding."""
    pad = 11
    x, w, b, y = make_case(seed=25, batch=(GN,), v=PV - pad)
    y[5] = -100
    opts = full_options(25, (GN,), PV - pad)
    rng = np.random.default_rng(26)
    wp = np.concatenate([w, 3.0 * rng.normal(size=(D, pad))], axis=1)
    bp = np.concatenate([b, np.full(pad, 50.0)])
    jopts = _jax_opts(opts)
    jopts["class_weights"] = jnp.concatenate([jopts["class_weights"], jnp.full((pad,), 7.0)])
    ct = rng.normal(size=(GN,)) if reduction == "none" else np.float64(0.8)

    def f(x, w, b):
        return LINEAR(
            x,
            w,
            jnp.asarray(y),
            bias=b,
            reduction=reduction,
            chunk_size=chunk,
            num_classes=PV - pad,
            **jopts,
        )

    out, (gx, gw, gb) = value_and_grads(f, x, wp, bp, ct)
    loss, dx, dw, db = numpy_expected(x, w, b, y, reduction=reduction, cotangent=ct, **opts)
    assert_close(out, loss)
    assert_close(gx, dx)
    assert_close(gw[:, : PV - pad], dw)
    assert_close(gb[: PV - pad], db)
    assert np.all(np.asarray(gw)[:, PV - pad :] == 0) and np.all(np.asarray(gb)[PV - pad :] == 0)
    # A label on the padding is out of range: NaN, as any label >= num_classes.
    y_pad = jnp.asarray(y).at[0].set(PV - 1)
    per_token = LINEAR(
        x,
        wp,
        y_pad,
        bias=bp,
        ignore_index=-100,
        reduction="none",
        chunk_size=chunk,
        num_classes=PV - pad,
    )
    assert np.isnan(per_token[0]) and not np.any(np.isnan(np.asarray(per_token[1:])))


def large_logits_float32(seed, n=16, d=4, v=V):
    """float32 ``x``, ``w`` whose logits ``x @ w`` are about 1000 (std ~5), exact in float32.

    Integers times multiples of 1/512: every product and partial sum is exact, so the
    float64 reference sees the very logits the float32 code does, and what differs is
    the softmax alone.
    """
    rng = np.random.default_rng(seed)
    x = (250 + rng.integers(-2, 3, size=(n, d))).astype(np.float32)
    w = (1 + rng.integers(-8, 9, size=(d, v)) / 512).astype(np.float32)
    y = rng.integers(0, v, size=n).astype(np.int32)
    return x, w, y


@pytest.mark.parametrize("chunk", [7, (5, V)], ids=["streaming", "single_pass"])
def test_float32_gradients_at_logits_near_1000(chunk):
    """The gradient's softmax is ``exp((z - max) - log sum exp(z - max))``: float32 to ~1e-6.

    ``exp(z - lse)`` with a float32 ``lse`` near 1000 (one ulp is 6e-5) is off by up to
    3e-5 relative, for every class of the row alike.
    """
    x, w, y = large_logits_float32(seed=21)
    z = x.astype(np.float64) @ w.astype(np.float64)
    assert np.all(z.astype(np.float32) == z) and 900 < z.min() and z.max() < 1100
    b = np.zeros(V, np.float32)
    wj, yj = jnp.asarray(w), jnp.asarray(y)
    # dloss_n/dlogits of each token: the gradient w.r.t. the bias of a one-token call.
    one = lambda xr, yr, b: LINEAR(xr[None], wj, yr[None], bias=b, chunk_size=chunk)  # noqa: E731
    dz = jax.jit(jax.vmap(jax.grad(one, argnums=2), in_axes=(0, 0, None)))(x, yj, b)
    want = np.stack(
        [
            ref.linear_softmax_cross_entropy(x[i : i + 1], w, y[i : i + 1]).grad_bias
            for i in range(16)
        ]
    )
    np.testing.assert_allclose(np.asarray(dz, np.float64), want, rtol=3e-6, atol=0)
    for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4}):

        def f(x, w, b, opts=opts):
            return LINEAR(x, w, yj, bias=b, chunk_size=chunk, reduction="sum", **opts)

        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w, b)
        r = ref.linear_softmax_cross_entropy(x, w, y, bias=b, reduction="sum", **opts)
        # Each gradient is a sum of terms dz * (w or x): its error relative to the sum of
        # their magnitudes (float64, from the reference's dz of each token).
        dz_ref = np.stack(
            [
                ref.linear_softmax_cross_entropy(
                    x[i : i + 1], w, y[i : i + 1], bias=b, reduction="sum", **opts
                ).grad_bias
                for i in range(len(y))
            ]
        )
        size = np.abs(dz_ref)
        bounds = (size @ np.abs(w.T), np.abs(x.T) @ size, size.sum(axis=0))
        for g, e, bound in zip(grads, (r.grad_x, r.grad_w, r.grad_bias), bounds, strict=True):
            err = np.abs(np.asarray(g, np.float64) - e)
            assert np.all(err <= 1e-6 * bound), float(np.max(err / bound))


@pytest.mark.parametrize("chunk", [(5, 11), (4, V)], ids=["streaming", "single_pass"])
def test_check_grads_float64(chunk):
    x, w, b, y = make_case(seed=5, batch=(7,), d=3, v=12)
    opts = _jax_opts(full_options(5, (7,), 12, ignore=False))
    chunk = chunk if chunk[1] != V else (4, 12)

    def f(x, w, b):
        return LINEAR(x, w, jnp.asarray(y), bias=b, chunk_size=chunk, reduction="sum", **opts)

    jax.test_util.check_grads(f, (x, w, b), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# float32 / bfloat16 against the unfused oracle
# --------------------------------------------------------------------------------------------

SINGLE_OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "ignore_index": {"ignore_index": 0},
    "where": {"where": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "logit_soft_cap": {"logit_soft_cap": 5.0},
    "class_weights": {"class_weights": True},
}


def _concrete(opts, batch, v, b, seed=0):
    rng = np.random.default_rng(seed + 7)
    out = {}
    for k, val in opts.items():
        if k == "bias":
            out["bias"] = jnp.asarray(b)
        elif k == "where":
            out["where"] = jnp.asarray(rng.random(batch) < 0.7)
        elif k == "class_weights":
            out["class_weights"] = jnp.asarray(rng.uniform(0.5, 2.0, (v,)).astype(np.float32))
        else:
            out[k] = val
    return out


@pytest.mark.parametrize("name", list(SINGLE_OPTIONS))
def test_each_option_matches_reference_float32(name):
    """x64 disabled, float32 inputs: each option alone, both schedules."""
    x, w, b, y = make_case(seed=6, dtype=np.float32)
    opts = _concrete(SINGLE_OPTIONS[name], (N,), V, b)
    bias = opts.pop("bias", None)
    yj = jnp.asarray(y)
    for chunk in (7, (5, V)):
        with checks.x64_off():
            loss = lambda x, w, b, c=chunk: LINEAR(x, w, yj, bias=b, chunk_size=c, **opts)  # noqa: E731
            got, (gx, gw, gb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, bias)
        assert got.dtype == jnp.float32
        assert_matches_reference(got, (gx, gw, gb), x, w, bias, y, jnp.float32, **opts)


@pytest.mark.parametrize("chunk", [7, (8, V)], ids=["streaming", "single_pass"])
def test_bfloat16_inputs(chunk):
    x, w, b, y = make_case(seed=8, d=16, v=V, dtype=np.float32, scale=0.5)
    xb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, b))
    yj = jnp.asarray(y)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_soft_cap": 8.0}

    def loss(x, w, b):
        return LINEAR(x, w, yj, bias=b, chunk_size=chunk, **opts)

    with checks.x64_off():
        got, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(xb, wb, bb)
    assert got.dtype == jnp.float32
    # float32 logits from the bfloat16 operands: the loss to float32 round-off of the
    # exact bfloat16 values; gradients also by the rounding of dlogits to bfloat16.
    assert_matches_reference(got, grads, xb, wb, bb, y, jnp.bfloat16, **opts)


def test_mixed_dtypes_return_gradients_in_input_dtypes():
    x, w, b, y = make_case(seed=9, dtype=np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    fn = jax.jit(
        jax.grad(lambda x, w, b: LINEAR(x, w, jnp.asarray(y), bias=b, chunk_size=7), (0, 1, 2))
    )
    with jax.numpy_dtype_promotion("standard"):
        gx, gw, gb = fn(xb, w, jnp.asarray(b, jnp.float16))
    assert (gx.dtype, gw.dtype, gb.dtype) == (jnp.bfloat16, jnp.float32, jnp.float16)
    assert_no_nan(gx, gw, gb)
    with pytest.raises(TypeError, match="x, w and bias"):
        LINEAR(xb, w, jnp.asarray(y))


# --------------------------------------------------------------------------------------------
# Layouts and edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 7, (5, V)])
def test_ragged_batch_shape(chunk):
    """x [B, T, D] with padding positions masked by `where` and by ignore_index."""
    b_, t_ = 3, 5
    x, w, b, y = make_case(seed=10, batch=(b_, t_))
    lengths = np.array([5, 2, 4])
    valid = np.arange(t_)[None, :] < lengths[:, None]
    y = np.where(valid, y, -100).astype(np.int32)
    where = np.ones((b_, t_), bool)
    where[0, 1] = False
    for reduction in ("mean", "none"):
        ct = np.ones((b_, t_)) if reduction == "none" else np.float64(1.0)

        def f(x, w, b, reduction=reduction):
            return LINEAR(
                x,
                w,
                jnp.asarray(y),
                bias=b,
                where=jnp.asarray(where),
                ignore_index=-100,
                reduction=reduction,
                chunk_size=chunk,
            )

        out, (gx, gw, gb) = value_and_grads(f, x, w, b, ct)
        loss, dx, dw, db = numpy_expected(
            x, w, b, y, reduction=reduction, cotangent=ct, where=where, ignore_index=-100
        )
        assert out.shape == (() if reduction == "mean" else (b_, t_))
        assert_close(out, loss)
        assert_close(gx, dx)
        assert_close(gw, dw)
        assert_close(gb, db)
        assert np.all(np.asarray(gx)[~(valid & where)] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk", [7, (5, V)], ids=["streaming", "single_pass"])
def test_all_tokens_ignored(chunk, reduction):
    x, w, b, y = make_case(seed=11, dtype=np.float32)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "class_weights": jnp.ones((V,))}
    ignored = jnp.full((N,), -100, jnp.int32)
    fn = jax.jit(
        jax.value_and_grad(
            lambda x, w, b: jnp.sum(
                LINEAR(
                    x,
                    w,
                    ignored,
                    bias=b,
                    ignore_index=-100,
                    reduction=reduction,
                    chunk_size=chunk,
                    **opts,
                )
            ),
            argnums=(0, 1, 2),
        )
    )
    out, grads = fn(x, w, b)
    assert float(out) == 0.0
    for g in grads:
        assert_no_nan(g)
        assert np.all(np.asarray(g) == 0)
    where_none = LINEAR(x, w, jnp.asarray(y), where=jnp.zeros((N,), bool), chunk_size=chunk)
    assert float(where_none) == 0.0


@pytest.mark.parametrize("chunk", [7, (5, V)], ids=["streaming", "single_pass"])
def test_out_of_range_label_is_nan(chunk):
    x, w, _, y = make_case(seed=12)
    y[3], y[5] = V, -1
    per_token = LINEAR(x, w, jnp.asarray(y), reduction="none", chunk_size=chunk)
    expected = ref.linear_softmax_cross_entropy(x, w, y, reduction="none").loss
    assert np.isnan(per_token[3]) and np.isnan(per_token[5])
    assert_close(per_token, expected)  # NaN where expected is NaN
    assert np.isnan(float(LINEAR(x, w, jnp.asarray(y), chunk_size=chunk)))
    # A wide label that would wrap into range as int32 is still out of range.
    y64 = jnp.asarray(y, jnp.int64).at[0].set(2**32 + 1)
    assert np.isnan(LINEAR(x, w, y64, reduction="none", chunk_size=chunk)[0])


def test_label_smoothing_one_and_zero_weights():
    x, w, b, y = make_case(seed=13)
    cw = np.ones(V)
    cw[y[0]] = 0.0
    for opts in ({"label_smoothing": 1.0}, {"class_weights": cw}):
        for chunk in (7, (4, V)):
            out, grads = value_and_grads(
                lambda x, w, b, o=opts, c=chunk: LINEAR(
                    x, w, jnp.asarray(y), bias=b, chunk_size=c, **_jax_opts(o)
                ),
                x,
                w,
                b,
                np.float64(1.0),
            )
            loss, *expected = numpy_expected(x, w, b, y, reduction="mean", **opts)
            assert_close(out, loss)
            for g, e in zip(grads, expected, strict=True):
                assert_close(g, e)


def test_empty_batch():
    _, w, b, _ = make_case(seed=14)
    x = jnp.zeros((0, D))
    y = jnp.zeros((0,), jnp.int32)
    assert float(LINEAR(x, w, y)) == 0.0
    assert LINEAR(x, w, y, reduction="none").shape == (0,)
    gx, gw = jax.grad(lambda x, w: LINEAR(x, w, y, chunk_size=7), (0, 1))(x, w)
    assert gx.shape == (0, D) and np.all(np.asarray(gw) == 0)


# --------------------------------------------------------------------------------------------
# Transformations
# --------------------------------------------------------------------------------------------


def test_partial_gradients_match_full():
    """Only the gradients asked for are computed (symbolic zeros); they are the same."""
    x, w, b, y = make_case(seed=15)
    yj = jnp.asarray(y)
    for chunk, reduction in ((7, "none"), ((5, V), "mean")):

        def f(x, w, b, chunk=chunk, reduction=reduction):
            return jnp.sum(LINEAR(x, w, yj, bias=b, chunk_size=chunk, reduction=reduction))

        full = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w, b)
        for i in range(3):
            part = jax.jit(jax.grad(f, argnums=i))(x, w, b)
            assert_close(part, full[i], rtol=1e-12, atol=1e-12)


def test_eager_matches_jit():
    x, w, b, y = make_case(seed=16)
    f = lambda x, w, b: LINEAR(x, w, jnp.asarray(y), bias=b, chunk_size=(5, 11))  # noqa: E731
    eager = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b)
    jitted = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, b)
    for a, e in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [7, (5, V)], ids=["streaming", "single_pass"])
def test_vmap(chunk):
    x, w, b, y = make_case(seed=17)
    x3 = np.stack([x, -x, 0.5 * x])
    y3 = np.stack([y, (y + 1) % V, y])
    w3 = np.stack([w, 2 * w, -w])

    def loss(x, w, y):
        return LINEAR(x, w, y, bias=jnp.asarray(b), chunk_size=chunk, label_smoothing=0.1)

    # Batched x and labels with a shared w, then everything batched, under grad.
    shared = jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1)), in_axes=(0, None, 0)))
    out, (gx, gw) = shared(x3, w, y3)
    batched = jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1))))
    out_b, (gx_b, gw_b) = batched(x3, w3, y3)
    for i in range(3):
        loss_i, dx, dw, _ = numpy_expected(
            x3[i], w, b, y3[i], reduction="mean", label_smoothing=0.1
        )
        assert_close(out[i], loss_i)
        assert_close(gx[i], dx)
        assert_close(gw[i], dw)
        loss_i, dx, dw, _ = numpy_expected(
            x3[i], w3[i], b, y3[i], reduction="mean", label_smoothing=0.1
        )
        assert_close(out_b[i], loss_i)
        assert_close(gx_b[i], dx)
        assert_close(gw_b[i], dw)


@pytest.mark.parametrize("chunk", [7, (5, V)], ids=["streaming", "single_pass"])
def test_checkpoint_and_grad_of_composite(chunk):
    """Inside jax.checkpoint, after a layer whose output is x, summed with another term."""
    x, w, b, y = make_case(seed=18)
    rng = np.random.default_rng(19)
    proj = rng.normal(size=(D, D)) / np.sqrt(D)
    yj = jnp.asarray(y)

    def model(p, w, b, x):
        h = jnp.tanh(x @ p)
        loss = LINEAR(h, w, yj, bias=b, chunk_size=chunk, z_loss=1e-3)
        return loss + 0.1 * jnp.sum(w * w)

    g_plain = jax.jit(jax.grad(model, argnums=(0, 1, 2)))(proj, w, b, x)
    g_ckpt = jax.jit(jax.grad(jax.checkpoint(model), argnums=(0, 1, 2)))(proj, w, b, x)
    h = np.tanh(x @ proj)
    _, dh, dw, db = numpy_expected(h, w, b, y, reduction="mean", z_loss=1e-3)
    dproj = x.T @ (dh * (1 - h * h))
    for g in (g_plain, g_ckpt):
        assert_close(g[0], dproj)
        assert_close(g[1], dw + 0.2 * w)
        assert_close(g[2], db)


def test_value_without_gradient_matches():
    """Not differentiated, the single-pass schedule runs its forward loop alone."""
    x, w, b, y = make_case(seed=20)
    want = numpy_expected(x, w, b, y, reduction="sum")[0]
    for chunk in (7, (4, V), (13, V)):
        got = jax.jit(
            lambda x, w, b, c=chunk: LINEAR(
                x, w, jnp.asarray(y), bias=b, chunk_size=c, reduction="sum"
            )
        )(x, w, b)
        assert_close(got, want)


# --------------------------------------------------------------------------------------------
# A loss with a second forward pass (contract.SecondPass), written to the contract here
# --------------------------------------------------------------------------------------------


class Varentropy(NamedTuple):
    """The variance of the surprisal, ``Var = M2 - H^2`` with ``M2 = sum_j p_j (log p_j)^2``
    (a second-pass sum: it needs the final ``log p`` at every class) and the entropy ``H``
    (a first-pass exp-gap sum, ``log s + sum e^{z - m} (m - z) / s``). With ``H`` and
    ``M2`` fixed: ``dVar/dz_j = p_j [(log p_j)^2 + 2 (1 + H) log p_j - M2 + 2 H + 2 H^2]``.
    No guard for ``p = 0``: the padding columns' ``0 * inf`` terms (``(log p)^2``
    overflows there) are the engine's to drop."""

    def row_sums(self, columns):
        return {"h": contract.RowSum("exp_gap")}

    def pick_shapes(self, columns):
        return {}

    def picks(self, z, view):
        return {}

    def second_pass(self, sums, rows):
        return contract.SecondPass(("m2",), ())

    def second_terms(self, p, log_p, view):
        return {"m2": p * jnp.square(log_p)}  # 0 * inf on the padding columns

    def finish(self, sums, rows, num_classes):
        h = sums.lse_rel + sums.sums["h"] / sums.sums["h/exp"]
        m2 = sums.second["m2"]
        return m2 - h * h, (jnp.ones_like(h),), (h, m2)

    def dlogits(self, p, log_p, coefs, view):
        (c,), (h, m2) = coefs, view.fixed
        h, m2 = h[:, None], m2[:, None]
        return c[:, None] * p * (log_p * log_p + 2 * (1 + h) * log_p - m2 + 2 * h + 2 * h * h)


def _varentropy(x, w, *, chunk_size, summed=False, soft_cap=None, num_classes=None):
    n, d = x.shape
    columns = w.shape[1]
    plans, single = plan.plans(n, d, columns, "sum" if summed else "none", chunk_size, 8)
    assert single == summed  # the schedule each case means to take
    real = None if num_classes is None else jnp.arange(columns) < num_classes
    spec = contract.Spec(Varentropy(), plans, soft_cap, num_classes)
    run = engine.summed_loss if summed else engine.per_token_loss
    return run(spec, x, w, None, None, None, real)


def _varentropy_reference(x, w, g, soft_cap=None):
    """float64 NumPy: Var per token and the gradients of sum(g * Var), through the
    softmax's Jacobian from dVar/dp_k = (log p_k)^2 + 2 log p_k + 2 H (log p_k + 1)."""
    u = x @ w
    z = u if soft_cap is None else soft_cap * np.tanh(u / soft_cap)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    h = -(p * log_p).sum(axis=1)
    var = (p * log_p**2).sum(axis=1) - h**2
    d_p = log_p**2 + 2 * log_p + 2 * h[:, None] * (log_p + 1)
    dz = p * (d_p - (p * d_p).sum(axis=1, keepdims=True)) * g[:, None]
    if soft_cap is not None:
        dz *= 1 - np.tanh(u / soft_cap) ** 2
    return var, dz @ w.T, x.T @ dz


@pytest.mark.parametrize(
    "chunk_size, summed, soft_cap",
    [((5, 11), False, None), ((4, 41), False, 3.0), ((13, 7), False, 3.0), ((4, 41), True, None)],
)
def test_second_pass_loss_matches_numpy_reference(chunk_size, summed, soft_cap):
    """A loss with a second pass, in float64: streaming with blocks that divide nothing,
    one vocabulary block, the single pass (its second-pass terms from the block at hand),
    a soft cap, and padding columns holding NaN and inf (the engine zeroes their terms:
    ``0 * inf`` there would be NaN), with exactly zero gradient on them."""
    rng = np.random.default_rng(31)
    x, w = rng.normal(size=(N, D)), rng.normal(size=(D, V))
    g = rng.uniform(0.5, 1.5, N) if not summed else np.full(N, 0.75)
    padded = np.concatenate([w, np.full((D, 4), np.nan)], axis=1)
    padded[0, -1] = np.inf

    def loss(x, w):
        out = _varentropy(x, w, chunk_size=chunk_size, summed=summed, soft_cap=soft_cap,
                          num_classes=V)  # fmt: skip
        return out if not summed else out[None]

    out, vjp = jax.vjp(loss, jnp.asarray(x), jnp.asarray(padded))
    dx, dw = vjp(jnp.asarray(g[:1] if summed else g))
    var, want_dx, want_dw = _varentropy_reference(x, w, g, soft_cap)
    assert_close(out, var.sum(keepdims=True) if summed else var)
    assert_close(dx, want_dx)
    assert_close(np.asarray(dw)[:, :V], want_dw)
    assert np.all(np.asarray(dw)[:, V:] == 0)


# --------------------------------------------------------------------------------------------
# The implementation seam (engine.IMPLEMENTATIONS, the public implementation=)
# --------------------------------------------------------------------------------------------


def _small_problem():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(6, 4)))
    w = jnp.asarray(rng.normal(size=(4, 9)))
    return x, w, jnp.asarray(rng.integers(0, 9, size=(6,)))


def test_implementation_argument_is_checked():
    x, w, y = _small_problem()
    want = jxent.linear_softmax_cross_entropy(x, w, y)
    for choice in (None, "auto", "xla"):
        got = jxent.linear_softmax_cross_entropy(x, w, y, implementation=choice)
        np.testing.assert_array_equal(got, want)
    names = ", ".join(repr(n) for n in ("auto", *engine.IMPLEMENTATIONS))
    with pytest.raises(ValueError, match=rf"implementation must be one of \({names}\)"):
        jxent.linear_entropy(x, w, implementation="pallas")
    with pytest.raises(TypeError, match="implementation must be a string"):
        jxent.linear_log_probs(x, w, y, implementation=3)


def test_implementations_are_dispatched_through_the_registry(monkeypatch):
    """A registered implementation runs the calls it supports; "auto" takes the first
    that supports a call, and naming one that does not is an error naming it."""
    x, w, y = _small_problem()
    want = jxent.linear_softmax_cross_entropy(x, w, y, reduction="none")
    xla = engine.IMPLEMENTATIONS["xla"]
    seen = []

    def recording(spec, *args):
        seen.append(type(spec.loss).__name__)
        return xla.per_token_loss(spec, *args)

    only_entropy = engine.Implementation(
        recording, xla.summed_loss, lambda spec: type(spec.loss).__name__ == "LogProbs"
    )
    registry = {"entropy_only": only_entropy, **engine.IMPLEMENTATIONS}
    monkeypatch.setattr(engine, "IMPLEMENTATIONS", registry)
    # "auto": the cross-entropy passes the first implementation by, the entropy takes it.
    got = jxent.linear_softmax_cross_entropy(x, w, y, reduction="none")
    np.testing.assert_array_equal(got, want)
    assert seen == []
    h = jxent.linear_entropy(x, w, reduction="none")
    assert seen == ["LogProbs"]
    want_h = jxent.linear_entropy(x, w, reduction="none", implementation="xla")
    np.testing.assert_array_equal(h, want_h)
    with pytest.raises(ValueError, match=r"implementation='entropy_only' does not support"):
        jxent.linear_softmax_cross_entropy(x, w, y, implementation="entropy_only")
