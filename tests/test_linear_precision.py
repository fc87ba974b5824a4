"""The fused linear loss in the precision users train in: x64 disabled, float32 and
bfloat16 inputs, against the float64 NumPy reference (tests/reference_linear.py).

Tolerances come from the dtype's epsilon and the data: ``checks.float_tolerance``
(``8 eps log2(terms)``) times the reference's error scale, the sum of the magnitudes of
every rounded quantity behind each value (logits ``|x| @ |w| + |b|`` included, so an
offset of 1e4 in the bias is accounted for, not hidden by a loose constant). Padding
columns (``num_classes``) hold +inf, -inf, NaN or a finite number and must change
nothing; also: class weights are constants (zero gradient, every reduction).
"""

from __future__ import annotations

import checks
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_linear as ref
from hypothesis import given

import jxent

LINEAR = jxent.linear_softmax_cross_entropy
REDUCTIONS = ("none", "sum", "mean")
PAD_VALUES = {"+inf": np.inf, "-inf": -np.inf, "nan": np.nan, "finite": 7.0}


@st.composite
def cases(draw):
    n = draw(st.integers(1, 13))
    d = draw(st.integers(1, 8))
    v = draw(st.integers(2, 40))
    pad = draw(st.integers(0, 3))
    vocab = draw(st.integers(1, v + pad))
    chunk = draw(
        st.sampled_from(["none", "int", "pair", "single"])
    )  # block sizes need not divide N or V
    chunk_size = {
        "none": None,
        "int": vocab,
        "pair": (draw(st.integers(1, n)), vocab),
        "single": (draw(st.integers(1, n)), v + pad),
    }[chunk]
    opts = {}
    if draw(st.booleans()):
        opts["label_smoothing"] = draw(st.sampled_from([0.1, 1.0]))
    if draw(st.booleans()):
        opts["z_loss"] = 1e-3
    if draw(st.booleans()):
        opts["logit_soft_cap"] = draw(st.sampled_from([5.0, 30.0]))
    return dict(
        n=n,
        d=d,
        v=v,
        pad=pad,
        chunk_size=chunk_size,
        opts=opts,
        weighted=draw(st.booleans()),
        ignored=draw(st.sampled_from(["none", "some", "all"])),
        where=draw(st.booleans()),
        offset=draw(st.sampled_from([0.0, 1e2, 1e3, 1e4])),
        pad_value=draw(st.sampled_from(list(PAD_VALUES))),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_inputs(case):
    """Inputs rounded to the case's dtype, and their exact float64 values (padding included)."""
    rng = np.random.default_rng(case["seed"])
    n, d, v, pad = case["n"], case["d"], case["v"], case["pad"]
    dtype = jnp.dtype(case["dtype"])
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, v + pad)) / np.sqrt(d)
    b = 0.5 * rng.standard_normal(v + pad) + case["offset"]
    cw = rng.uniform(0.5, 2.0, v + pad)
    fill = PAD_VALUES[case["pad_value"]]
    w[:, v:], b[v:], cw[v:] = fill, fill, fill
    y = rng.integers(0, v, n).astype(np.int32)
    if case["ignored"] == "some":
        y[rng.random(n) < 0.3] = -100
    elif case["ignored"] == "all":
        y[:] = -100
    where = rng.random(n) < 0.8 if case["where"] else None
    rounded = [np.asarray(jnp.asarray(a, dtype)) for a in (x, w, b)]
    exact = [a.astype(np.float64) for a in rounded]
    cw = cw.astype(np.float32)  # class weights stay float32: the accumulation dtype
    return rounded, exact, y, cw, where


def fused(case, rounded, y, cw, where, ct):
    """jxent's loss and its vjp (x, w, bias) under jit with x64 disabled."""
    kw = dict(case["opts"])
    if case.get("precision") is not None:
        kw["precision"] = case["precision"]
    if case["weighted"]:
        kw["class_weights"] = jnp.asarray(cw)
    if where is not None:
        kw["where"] = jnp.asarray(where)

    @jax.jit
    def run(x, w, b, ct):
        def f(x, w, b):
            return LINEAR(
                x,
                w,
                jnp.asarray(y),
                bias=b,
                ignore_index=-100,
                reduction=case["reduction"],
                chunk_size=case["chunk_size"],
                num_classes=case["v"] if case["pad"] else None,
                **kw,
            )

        out, vjp = jax.vjp(f, x, w, b)
        return out, vjp(ct.astype(out.dtype))

    return run(*(jnp.asarray(a) for a in rounded), jnp.asarray(ct, jnp.float32))


def expected(case, exact, y, cw, where, ct):
    return ref.linear_softmax_cross_entropy(
        *exact[:2],
        y,
        bias=exact[2],
        ignore_index=-100,
        where=where,
        class_weights=cw.astype(np.float64) if case["weighted"] else None,
        reduction=case["reduction"],
        num_classes=case["v"],
        cotangent=ct,
        **case["opts"],
    )


def tolerances(case):
    """(loss tolerance, gradient tolerance), relative to the reference's error scales.

    Logits, sums and products accumulate in float32 whatever the inputs (the fused loss's
    contract); bfloat16 gradients are also rounded to bfloat16, from a bfloat16 dlogits.
    """
    terms = case["n"] * case["d"] * (case["v"] + case["pad"])
    acc = checks.float_tolerance(jnp.float32, terms)
    grad = acc
    if case["dtype"] == "bfloat16":
        grad += checks.float_tolerance(jnp.bfloat16, terms)
    return acc, grad


def check_case(case, tolerance=None):
    rounded, exact, y, cw, where = make_inputs(case)
    rng = np.random.default_rng(case["seed"] + 1)
    ct = rng.uniform(0.5, 1.5, case["n"]) if case["reduction"] == "none" else np.float64(0.75)
    with checks.x64_off():
        out, (gx, gw, gb) = fused(case, rounded, y, cw, where, ct)
    assert out.dtype == jnp.float32
    assert gx.dtype == gw.dtype == gb.dtype == jnp.dtype(case["dtype"])
    r = expected(case, exact, y, cw, where, ct)
    loss_tol, grad_tol = tolerances(case) if tolerance is None else tolerance
    ref.assert_within(out, r.loss, loss_tol * r.loss_scale, "loss")
    v = case["v"]
    ref.assert_within(gx, r.grad_x, grad_tol * r.grad_x_scale, "dx")
    ref.assert_within(gw[:, :v], r.grad_w[:, :v], grad_tol * r.grad_w_scale[:, :v], "dw")
    ref.assert_within(gb[:v], r.grad_bias[:v], grad_tol * r.grad_bias_scale[:v], "dbias")
    # The padding: exactly zero gradient, whatever it holds.
    assert np.all(np.asarray(gw[:, v:], np.float64) == 0)
    assert np.all(np.asarray(gb[v:], np.float64) == 0)
    return out, r


@given(cases())
def test_float32_and_bfloat16_match_float64_reference(case):
    check_case(case)


@pytest.mark.parametrize("pad_value", list(PAD_VALUES))
@pytest.mark.parametrize(
    "chunk_size", [7, (5, 11), (4, 40)], ids=["vocab7", "tok5_vocab11", "single"]
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padding_any_value_with_every_option(pad_value, chunk_size, dtype):
    """Padding columns of w, bias and class_weights holding +inf, -inf, NaN or a number:
    loss and gradients of the unpadded problem, to the tolerance of the dtype."""
    case = dict(
        n=13,
        d=6,
        v=37,
        pad=3,
        chunk_size=chunk_size,
        opts=dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=30.0),
        weighted=True,
        ignored="some",
        where=True,
        offset=0.0,
        pad_value=pad_value,
        reduction="mean",
        dtype=dtype,
        seed=3,
    )
    out, r = check_case(case)
    assert np.isfinite(float(out)) and float(r.loss) > 0


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("chunk_size", [7, (5, 37)], ids=["streaming", "single_pass"])
def test_large_logit_offsets(offset, chunk_size):
    """Logits near 1e2..1e4 (a bias offset): float32 keeps what its rounding of the logits
    allows; the reference's scale includes |b|, so the bound is of that rounding."""
    case = dict(
        n=13,
        d=6,
        v=37,
        pad=0,
        chunk_size=chunk_size,
        opts=dict(label_smoothing=0.1),
        weighted=False,
        ignored="none",
        where=False,
        offset=offset,
        pad_value="finite",
        reduction="sum",
        dtype="float32",
        seed=4,
    )
    check_case(case)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [7, (5, 37)], ids=["streaming", "single_pass"])
def test_all_tokens_ignored_float32(reduction, chunk_size):
    case = dict(
        n=13,
        d=6,
        v=37,
        pad=2,
        chunk_size=chunk_size,
        opts=dict(label_smoothing=0.1, z_loss=1e-3),
        weighted=True,
        ignored="all",
        where=False,
        offset=0.0,
        pad_value="nan",
        reduction=reduction,
        dtype="float32",
        seed=5,
    )
    out, _ = check_case(case)
    assert np.all(np.asarray(out) == 0)


# --------------------------------------------------------------------------------------------
# Padding in float64: exact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pad_value", list(PAD_VALUES))
@pytest.mark.parametrize(
    "chunk_size", [7, (5, 11), (4, 40)], ids=["vocab7", "tok5_vocab11", "single"]
)
def test_padding_any_value_float64(chunk_size, pad_value, reduction):
    rng = np.random.default_rng(6)
    n, d, v, pad = 13, 6, 37, 3
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, v + pad))
    b = rng.standard_normal(v + pad)
    cw = rng.uniform(0.5, 2.0, v + pad)
    fill = PAD_VALUES[pad_value]
    w[:, v:], b[v:], cw[v:] = fill, fill, fill
    y = rng.integers(0, v, n).astype(np.int32)
    y[2] = -100
    opts = dict(label_smoothing=0.2, z_loss=1e-2, logit_soft_cap=4.0, ignore_index=-100)
    ct = rng.normal(size=n) if reduction == "none" else np.float64(0.7)

    def f(x, w, b):
        return LINEAR(
            x,
            w,
            jnp.asarray(y),
            bias=b,
            class_weights=jnp.asarray(cw),
            reduction=reduction,
            chunk_size=chunk_size,
            num_classes=v,
            **opts,
        )

    out, vjp = jax.jit(lambda x, w, b: jax.vjp(f, x, w, b))(x, w, b)
    gx, gw, gb = vjp(jnp.asarray(ct))
    r = ref.linear_softmax_cross_entropy(
        x, w, y, bias=b, class_weights=cw, reduction=reduction, num_classes=v, cotangent=ct, **opts
    )
    checks.assert_close(out, r.loss)
    checks.assert_close(gx, r.grad_x)
    checks.assert_close(gw, r.grad_w)  # the padding columns: exactly 0 (expected 0)
    checks.assert_close(gb, r.grad_bias)
    assert np.all(np.asarray(gw)[:, v:] == 0) and np.all(np.asarray(gb)[v:] == 0)


# --------------------------------------------------------------------------------------------
# class_weights are constants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [7, (5, 40)], ids=["streaming", "single_pass"])
def test_class_weights_get_no_gradient(reduction, chunk_size):
    """The mean divides by sum w_y: that denominator does not pass a gradient either."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((13, 6))
    w = rng.standard_normal((6, 40))
    y = jnp.asarray(rng.integers(0, 37, 13).astype(np.int32))
    cw = jnp.asarray(rng.uniform(0.5, 2.0, 40))

    def f(cw, x):
        loss = LINEAR(
            x,
            w,
            y,
            class_weights=cw,
            label_smoothing=0.1,
            reduction=reduction,
            chunk_size=chunk_size,
            num_classes=37,
        )
        return jnp.sum(loss)

    g_cw, g_x = jax.jit(jax.grad(f, argnums=(0, 1)))(cw, x)
    assert np.all(np.asarray(g_cw) == 0), g_cw
    assert np.any(np.asarray(g_x) != 0)  # the loss does depend on its other inputs


@pytest.mark.parametrize("precision", [None, "highest", ("high", "default")])
def test_precision_float32_matches_reference(precision):
    """precision= (issue 24): "highest" within the float32 bound of the float64 reference;
    the default (x @ w's) and a pair within one bfloat16 pass's bound (the products'
    operands rounded to bfloat16 at worst: XLA:TPU's default; CPU multiplies float32)."""
    case = dict(
        n=13, d=8, v=40, pad=2, chunk_size=(5, 11), opts={"label_smoothing": 0.1, "z_loss": 1e-3},
        weighted=True, ignored="some", where=True, offset=1e2, pad_value="nan",
        reduction="mean", dtype="float32", seed=7, precision=precision,
    )  # fmt: skip
    terms = case["n"] * case["d"] * (case["v"] + case["pad"])
    one_pass = checks.float_tolerance(jnp.bfloat16, terms)
    check_case(case, None if precision == "highest" else (one_pass, one_pass))


def test_round_to_bfloat16_is_the_conversion():
    """The bits' rounding (_backend.BFLOAT16_BLOCKS) is bit for bit a.astype(bfloat16):
    ties to even, subnormals, the largest finite values, infinities, signed zeros, NaN."""
    from jxent._fused.logits import round_to_bfloat16

    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(4096) * 10.0 ** rng.integers(-40, 39, 4096),
            # Exact ties between two bfloat16 values (low 16 bits 0x8000), odd and even.
            (np.arange(1, 513, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45]),
        ]
    ).astype(np.float32)
    with checks.x64_off():
        got = np.asarray(round_to_bfloat16(jnp.asarray(values)))
        want = np.asarray(jnp.asarray(values).astype(jnp.bfloat16))
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("chunk_size", [(5, 11), (4, 42)], ids=["streaming", "single"])
def test_bfloat16_blocks_match_reference_within_one_pass(monkeypatch, chunk_size):
    """The TPU plan's float32 products as bfloat16 blocks rounded in the loop, run here on
    the CPU (the platform's flag set for the test): within one bfloat16 pass's bound of
    the float64 reference, both schedules, padding holding NaN."""
    from jxent import _backend

    monkeypatch.setitem(_backend.BFLOAT16_BLOCKS, "cpu", True)
    jax.clear_caches()
    case = dict(
        n=13, d=8, v=40, pad=2, chunk_size=chunk_size, opts={"logit_soft_cap": 30.0},
        weighted=False, ignored="some", where=False, offset=0.0, pad_value="nan",
        reduction="mean", dtype="float32", seed=11,
    )  # fmt: skip
    terms = case["n"] * case["d"] * (case["v"] + case["pad"])
    one_pass = checks.float_tolerance(jnp.bfloat16, terms)
    out, r = check_case(case, (one_pass, one_pass))
    # The products were rounded: float32 products would have agreed far closer.
    assert abs(float(out) - r.loss) > checks.float_tolerance(jnp.float32, terms) * r.loss_scale
    jax.clear_caches()


def test_bfloat16_blocks_with_a_teacher_of_another_dtype(monkeypatch):
    """The bfloat16-block path rounds float32 blocks only: a float32 student beside a
    bfloat16 teacher's stream (and the reverse) runs, within one pass of the float32
    products."""
    from jxent import _backend

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((12, 8)), rng.standard_normal((8, 30)) / 3
    xt, wt = rng.standard_normal((12, 8)), rng.standard_normal((8, 30)) / 3
    with checks.x64_off():
        for student, teacher in ((jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)):
            args = (jnp.asarray(x, student), jnp.asarray(w, student))
            stream = (jnp.asarray(xt, teacher), jnp.asarray(wt, teacher))
            want = jxent.linear_softmax_kl_divergence(*args, stream, chunk_size=(4, 8))
            monkeypatch.setitem(_backend.BFLOAT16_BLOCKS, "cpu", True)
            jax.clear_caches()
            got = jxent.linear_softmax_kl_divergence(*args, stream, chunk_size=(4, 8))
            monkeypatch.setitem(_backend.BFLOAT16_BLOCKS, "cpu", False)
            jax.clear_caches()
            one_pass = checks.float_tolerance(jnp.bfloat16, 12 * 8 * 30)
            assert np.isfinite(float(got))
            np.testing.assert_allclose(float(got), float(want), rtol=one_pass, atol=one_pass)
