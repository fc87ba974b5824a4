"""Tests for jxent's element-wise binary losses: sigmoid_binary_cross_entropy,
binary_cross_entropy (from probabilities) and sigmoid_focal_loss.

Values and gradients are checked against the float64 reference in ``reference_binary.py``,
against optax where the names are shared, and against PyTorch's documented formulas.
"""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
import reference_binary as ref
from checks import (
    assert_close,
    assert_finite,
    assert_raises_naming,
    large_residuals,
    standard_promotion,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent

SBCE = jxent.sigmoid_binary_cross_entropy
BCE = jxent.binary_cross_entropy
FOCAL = jxent.sigmoid_focal_loss
F32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------------


@st.composite
def cases(draw, kind):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.5, 3.0, 30.0]))
    if kind == "probs":
        x = rng.random(shape)
        # exact 0 and 1 probabilities
        x[rng.random(shape) < 0.15] = 0.0
        x[rng.random(shape) < 0.15] = 1.0
    else:
        x = rng.normal(size=shape) * scale
    label_kind = draw(st.sampled_from(["hard", "soft", "int", "bool"]))
    hard = rng.random(shape) < 0.5
    labels = {
        "hard": hard.astype(np.float64),
        "soft": rng.random(shape),
        "int": hard.astype(np.int32),
        "bool": hard,
    }[label_kind]
    kwargs = {"reduction": draw(st.sampled_from(["none", "sum", "mean"]))}
    where_kind = draw(st.sampled_from(["none", "full", "bcast"]))
    where = None
    if where_kind == "full":
        where = rng.random(shape) < 0.7
    elif where_kind == "bcast" and shape:
        where = rng.random(tuple(s if rng.random() < 0.5 else 1 for s in shape)) < 0.7
    if kind == "sbce":
        pw_kind = draw(st.sampled_from(["none", "scalar", "class"]))
        if pw_kind == "scalar":
            kwargs["pos_weight"] = float(rng.uniform(0.2, 4.0))
        elif pw_kind == "class" and shape:
            kwargs["pos_weight"] = rng.uniform(0.2, 4.0, size=shape[-1:])
        kwargs["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
    if kind == "focal":
        kwargs["alpha"] = draw(st.sampled_from([None, 0.25, 0.9]))
        kwargs["gamma"] = draw(st.sampled_from([0.0, 0.5, 2.0, 3.5]))
    return x, labels, where, kwargs, rng


FUNCS = {
    "sbce": (SBCE, ref.sigmoid_binary_cross_entropy),
    "probs": (BCE, ref.binary_cross_entropy),
    "focal": (FOCAL, ref.sigmoid_focal_loss),
}


def _check_against_reference(kind, case, transform):
    x, labels, where, kwargs, rng = case
    fn, reference = FUNCS[kind]
    cot = rng.normal(size=np.shape(x)) if kwargs["reduction"] == "none" else 1.3
    r = reference(x, labels, where=where, cotangent=cot, **kwargs)
    jkw = dict(kwargs)
    if isinstance(jkw.get("pos_weight"), np.ndarray):
        jkw["pos_weight"] = jnp.asarray(jkw["pos_weight"])
    float_labels = np.asarray(labels).dtype == np.float64

    def objective(x, t, w):
        out = fn(x, t, where=w, **jkw)
        return jnp.sum(out * jnp.asarray(cot)), out

    argnums = (0, 1) if float_labels else 0

    def run(x, t, w):
        (_, out), g = jax.value_and_grad(objective, argnums=argnums, has_aux=True)(x, t, w)
        return fn(x, t, where=w, **jkw), out, g

    w = None if where is None else jnp.asarray(where)
    out, out_ad, g = transform(run)(jnp.asarray(x), jnp.asarray(labels), w)
    gx, gt = g if float_labels else (g, None)
    assert out.dtype == jnp.float64 and out.shape == np.shape(r.loss)
    assert_close(out, r.loss)
    assert_close(out_ad, r.loss)
    assert gx.dtype == jnp.float64
    assert_close(gx, r.grad_x, atol=1e-9 if kind == "probs" else 1e-12)
    if gt is not None:
        assert_close(gt, r.grad_t, atol=1e-10)


@pytest.mark.parametrize("kind", list(FUNCS))
@settings(max_examples=20)
@given(data=st.data())
def test_matches_reference(kind, data):
    _check_against_reference(kind, data.draw(cases(kind)), jax.jit)


@pytest.mark.parametrize("kind", list(FUNCS))
def test_eager_matches_reference(kind):
    rng = np.random.default_rng(11)
    x = rng.random((3, 4)) if kind == "probs" else rng.normal(size=(3, 4)) * 3
    labels = rng.random((3, 4))
    where = rng.random((3, 1)) < 0.7
    kwargs = {"reduction": "mean"}
    if kind == "sbce":
        kwargs.update(pos_weight=rng.uniform(0.5, 2, size=4), label_smoothing=0.1)
    if kind == "focal":
        kwargs.update(alpha=0.25, gamma=0.5)
    _check_against_reference(kind, (x, labels, where, kwargs, rng), lambda f: f)


@pytest.mark.parametrize("kind", list(FUNCS))
def test_check_grads(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4)) * 2
    if kind == "probs":
        x = jax.nn.sigmoid(x)
    t = rng.random((3, 4))
    kw = {
        "sbce": {"pos_weight": jnp.array([0.5, 1.0, 2.0, 3.0]), "label_smoothing": 0.2},
        "probs": {},
        "focal": {"alpha": 0.3, "gamma": 0.7},
    }[kind]
    fn = jax.jit(functools.partial(FUNCS[kind][0], **kw))
    tol = 1e-5 if kind == "probs" else 1e-6  # 1 / p**2 curvature: finite differences lose digits
    jax.test_util.check_grads(fn, (x, t), order=2, modes=("fwd", "rev"), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------
# Parity with optax and PyTorch's formulas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_sbce_matches_optax(dtype, scale):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 7)) * scale, dtype)

    @jax.jit
    def theirs(x, t):
        with standard_promotion():
            f = optax.losses.sigmoid_binary_cross_entropy
            return f(x, t), jax.grad(lambda x, t: jnp.sum(f(x, t)), (0, 1))(x, t)

    @jax.jit
    def ours(x, t):
        return SBCE(x, t), jax.grad(lambda x, t: SBCE(x, t, reduction="sum"), (0, 1))(x, t)

    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == jnp.float32 else {}
    for t in (rng.random((5, 7)), rng.random((5, 7)) < 0.5):
        t = jnp.asarray(t, dtype)
        for a, b in zip(jax.tree.leaves(ours(x, t)), jax.tree.leaves(theirs(x, t)), strict=True):
            assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_optax(dtype, alpha, gamma):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 5)) * 3, dtype)
    t = jnp.asarray(rng.random((6, 5)), dtype)

    @jax.jit
    def theirs(x, t):
        with standard_promotion():
            f = lambda x, t: optax.losses.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)
            return f(x, t), jax.grad(lambda x, t: jnp.sum(f(x, t)), (0, 1))(x, t)

    @jax.jit
    def ours(x, t):
        f = lambda x, t: FOCAL(x, t, alpha, gamma)  # positional, where optax has keywords
        return f(x, t), jax.grad(lambda x, t: jnp.sum(f(x, t)), (0, 1))(x, t)

    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == jnp.float32 else {"rtol": 1e-9, "atol": 1e-12}
    for a, b in zip(jax.tree.leaves(ours(x, t)), jax.tree.leaves(theirs(x, t)), strict=True):
        assert_close(a, b, **tol)


def test_pos_weight_matches_pytorch_formula(jit_mode):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3)) * 2
    y = (rng.random((4, 3)) < 0.4).astype(np.float64)
    pw = np.array([1.0, 2.5, 0.3])
    ours = jit_mode(lambda x, y, pw: SBCE(x, y, pos_weight=pw))(x, y, pw)
    assert_close(ours, ref.torch_bce_with_logits(x, y, pw))
    # pos_weight = 1 is the plain loss; a scalar broadcasts to every class.
    assert_close(SBCE(x, y, pos_weight=1.0), SBCE(x, y))
    assert_close(SBCE(x, y, pos_weight=2.0), ref.torch_bce_with_logits(x, y, 2.0))


def test_bce_from_probs_matches_pytorch_formula(jit_mode):
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.3, 1e-50, 0.999, 0.5])
    t = np.array([0.0, 1.0, 1.0, 0.0, 0.7, 1.0, 0.0, 0.2])
    # PyTorch's BCELoss: l = -(t max(log p, -100) + (1 - t) max(log(1 - p), -100)),
    # and its backward: (p - t) / max(p (1 - p), 1e-12).
    with np.errstate(divide="ignore"):
        want = -(t * np.maximum(np.log(p), -100) + (1 - t) * np.maximum(np.log(1 - p), -100))
    out, g = jit_mode(jax.value_and_grad(lambda p: BCE(p, t, reduction="sum")))(p)
    assert_close(BCE(p, t), want)
    assert_close(BCE(p, t)[:6], [0.0, 0.0, 100.0, 100.0, want[4], 100.0])
    assert_close(out, want.sum())
    assert_close(g, (p - t) / np.maximum(p * (1 - p), 1e-12))
    assert_close(g[2:4], [-1e12, 1e12])
    assert_finite(g)


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------

LARGE = [1e4, -1e4, F32_MAX, -F32_MAX, 88.0, -88.0, 20.0, -20.0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sbce_large_logits_exact(dtype):
    x = np.array(LARGE)
    for tv in (0.0, 1.0, 0.25):
        t = np.full(x.shape, tv)
        xq = np.asarray(jnp.asarray(x, dtype), np.float64)
        r = ref.sigmoid_binary_cross_entropy(xq, t)
        out, g = jax.jit(
            jax.value_and_grad(lambda x, t=t: SBCE(x, t.astype(dtype), reduction="sum"))
        )(jnp.asarray(x, dtype))
        per = jax.jit(lambda x, t=t: SBCE(x, t.astype(dtype)))(jnp.asarray(x, dtype))
        assert_finite(per, g)
        # (float32 flushes the subnormal softplus(-88) = 6e-39 to 0)
        f32 = dtype == jnp.float32
        assert_close(per, r.elementwise, rtol=1e-6 if f32 else 1e-12, atol=1e-37 if f32 else 0)
        # gradient sigmoid(x) - t to full relative precision, even where it is 2e-9.
        assert_close(g, r.grad_x, rtol=1e-6 if f32 else 1e-12, atol=1e-37 if f32 else 0)
    # exact zeros where the label agrees with a saturated logit
    assert float(SBCE(jnp.float32(1e4), jnp.float32(1.0))) == 0.0
    assert float(SBCE(jnp.float32(-F32_MAX), jnp.float32(0.0))) == 0.0
    assert float(SBCE(jnp.float32(-1e4), jnp.float32(1.0))) == 1e4


def test_sbce_pos_weight_and_smoothing_at_large_logits():
    x = jnp.asarray(LARGE, jnp.float32)
    t = jnp.asarray([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5], jnp.float32)
    pw = 3.0
    out, (gx, gt) = jax.value_and_grad(
        lambda x, t: SBCE(x, t, pos_weight=pw, label_smoothing=0.1, reduction="sum"), (0, 1)
    )(x, t)
    r = ref.sigmoid_binary_cross_entropy(
        np.asarray(x, np.float64), np.asarray(t, np.float64), pos_weight=pw, label_smoothing=0.1
    )
    finite = np.isfinite(r.elementwise)
    assert_close(
        SBCE(x, t, pos_weight=pw, label_smoothing=0.1)[finite], r.elementwise[finite], rtol=1e-6
    )
    assert_close(gx, r.grad_x, rtol=1e-6)
    assert not np.any(np.isnan(np.asarray(gt)))


def test_infinite_logits_are_largest_float():
    x = jnp.array([jnp.inf, -jnp.inf, jnp.inf, -jnp.inf], jnp.float32)
    t = jnp.array([1.0, 0.0, 0.0, 1.0], jnp.float32)
    for fn in (SBCE, FOCAL):
        out, g = jax.value_and_grad(lambda x, fn=fn: jnp.sum(fn(x, t)))(x)
        per = fn(x, t)
        assert_close(per[:2], [0.0, 0.0])
        assert_finite(per, g)
        assert_close(per[2:], fn(jnp.array([F32_MAX, -F32_MAX], jnp.float32), t[2:]))
    assert_close(jax.grad(lambda x: jnp.sum(SBCE(x, t)))(x), [0.0, 0.0, 1.0, -1.0])


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.99, 2.0])
def test_focal_no_nan_at_saturation(gamma):
    """(1 - p_t)**gamma has an infinite derivative at p_t = 1 for gamma < 1: the gradient
    must stay finite and tend to 0 as the logit saturates towards its label."""
    x = jnp.asarray([17.0, 50.0, 100.0, 1e4, F32_MAX, -17.0, -100.0, -1e4, -F32_MAX], jnp.float32)
    t = jnp.asarray([1.0] * 5 + [0.0] * 4, jnp.float32)
    f = jax.jit(
        jax.value_and_grad(
            lambda x, t: FOCAL(x, t, alpha=0.25, gamma=gamma, reduction="sum"), (0, 1)
        )
    )
    out, (gx, gt) = f(x, t)
    assert_finite(out, gx, gt)
    assert np.all(np.abs(np.asarray(gx)) < 1e-6)
    # the saturated tail is exactly 0, the moderate one matches the float64 reference
    r = ref.sigmoid_focal_loss(np.float64(17.0), 1.0, 0.25, gamma)
    assert_close(gx[0], r.grad_x, rtol=1e-5, atol=0)
    assert_close(gx[3:5], [0.0, 0.0])
    # soft labels exactly at p = t are a smooth point, also finite
    xs = jnp.zeros(3, jnp.float32)
    ts = jnp.asarray([0.5, 0.5, 0.5], jnp.float32)
    assert_finite(*jax.grad(lambda x, t: FOCAL(x, t, gamma=gamma, reduction="sum"), (0, 1))(xs, ts))


def test_focal_large_logits_match_reference():
    x = np.array([30.0, -30.0, 60.0, -60.0, 5.0, -5.0])
    for tv in (0.0, 1.0, 0.3):
        t = np.full(x.shape, tv)
        for alpha, gamma in ((None, 2.0), (0.25, 0.5)):
            r = ref.sigmoid_focal_loss(x, t, alpha, gamma)
            out = FOCAL(x, t, alpha, gamma)
            gx, gt = jax.grad(
                functools.partial(FOCAL, alpha=alpha, gamma=gamma, reduction="sum"), (0, 1)
            )(x, t)
            assert_close(out, r.elementwise, rtol=1e-9, atol=1e-300)
            assert_close(gx, r.grad_x, rtol=1e-8, atol=1e-300)
            assert_close(gt, r.grad_t, rtol=1e-8, atol=1e-300)


def test_bce_probs_zero_and_one(jit_mode):
    p = jnp.asarray([0.0, 1.0, 0.0, 1.0], jnp.float32)
    t = jnp.asarray([0.0, 1.0, 1.0, 0.0], jnp.float32)
    out, (gp, gt) = jit_mode(jax.value_and_grad(lambda p, t: BCE(p, t, reduction="mean"), (0, 1)))(
        p, t
    )
    assert_close(BCE(p, t), [0.0, 0.0, 100.0, 100.0])
    assert not np.signbit(np.asarray(BCE(p, t))[:2]).any()
    assert_close(out, 50.0)
    assert_close(gp, np.array([0.0, 0.0, -1e12, 1e12]) / 4, rtol=1e-6)
    assert_close(gt, np.array([100.0, -100.0, 100.0, -100.0]) / 4)


# --------------------------------------------------------------------------------------------
# where, reductions, multi-label
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FUNCS))
def test_where_excludes_even_nan(kind):
    fn = FUNCS[kind][0]
    x = jnp.asarray([[0.3, jnp.nan, 0.6], [jnp.nan, 0.2, 0.9]], jnp.float32)
    t = jnp.asarray([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], jnp.float32)
    w = ~jnp.isnan(x)
    out, g = jax.jit(jax.value_and_grad(lambda x: fn(x, t, where=w, reduction="mean")))(x)
    clean = jnp.where(w, x, 0.5)
    per = fn(clean, t)
    assert_close(out, jnp.sum(jnp.where(w, per, 0)) / 4, rtol=1e-6)
    assert_finite(out, g)
    assert_close(jnp.where(w, 0.0, g), 0.0)
    assert_close(fn(x, t, where=w)[~np.asarray(w)], [0.0, 0.0])


@pytest.mark.parametrize("kind", list(FUNCS))
def test_all_masked(kind):
    fn = FUNCS[kind][0]
    x = jnp.full((2, 3), 0.5, jnp.float32)
    t = jnp.ones((2, 3), jnp.float32)
    w = jnp.zeros((2, 1), bool)  # broadcast: masks whole examples
    for red in ("none", "sum", "mean"):
        out, g = jax.jit(
            jax.value_and_grad(lambda x, red=red: jnp.sum(fn(x, t, where=w, reduction=red)))
        )(x)
        assert float(out) == 0.0
        assert_close(g, 0.0)


def test_multilabel_reduction_over_label_axis():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, 5))
    tags = rng.random((8, 5)) < 0.3
    per_tag = SBCE(logits, tags)
    assert per_tag.shape == (8, 5)
    r = ref.sigmoid_binary_cross_entropy(logits, tags)
    assert_close(per_tag.sum(axis=-1), r.elementwise.sum(axis=-1))
    assert_close(SBCE(logits, tags, reduction="mean"), r.elementwise.mean())
    assert_close(SBCE(logits, tags, reduction="sum"), r.elementwise.sum())


def test_vmap_and_checkpoint():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 6)))
    t = jnp.asarray(rng.random((4, 6)))
    for fn in (
        lambda x, t: SBCE(x, t, pos_weight=jnp.arange(1.0, 7.0), reduction="sum"),
        lambda x, t: FOCAL(x, t, 0.25, 1.5, reduction="sum"),
        lambda x, t: BCE(jax.nn.sigmoid(x), t, reduction="sum"),
    ):
        batched = jax.vmap(fn)(x, t)
        assert_close(batched, [fn(x[i], t[i]) for i in range(4)])
        total = lambda x, fn=fn: jnp.sum(jax.vmap(fn)(x, t))
        assert_close(jax.grad(total)(x), jax.grad(jax.checkpoint(total))(x))


# --------------------------------------------------------------------------------------------
# Low precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FUNCS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(kind, dtype):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 9)) * 3
    if kind == "probs":
        x = rng.random((16, 9))
        x[0, :3] = [0.0, 1.0, 0.5]
    t = rng.random((16, 9))
    xj, tj = jnp.asarray(x, dtype), jnp.asarray(t, dtype)
    xq, tq = np.asarray(xj, np.float64), np.asarray(tj, np.float64)
    fn, reference = FUNCS[kind]
    kw = {"sbce": {"pos_weight": 2.0}, "probs": {}, "focal": {"alpha": 0.25, "gamma": 2.0}}[kind]
    for red in ("none", "mean"):
        out, (gx, gt) = jax.jit(
            jax.value_and_grad(lambda x, t, red=red: jnp.sum(fn(x, t, reduction=red, **kw)), (0, 1))
        )(xj, tj)
        per = jax.jit(functools.partial(fn, reduction=red, **kw))(xj, tj)
        rkw = {"grad_eps": 1 / 65504} if kind == "probs" and dtype == jnp.float16 else {}
        r = reference(xq, tq, reduction=red, **kw, **rkw)
        assert per.dtype == jnp.float32
        assert gx.dtype == dtype and gt.dtype == dtype
        assert_close(per, r.loss, rtol=1e-6, atol=1e-7)
        gtol = 1e-2 if dtype == jnp.bfloat16 else 1e-3
        assert_close(gx, r.grad_x, rtol=gtol, atol=gtol * (1e10 if kind == "probs" else 1))


# --------------------------------------------------------------------------------------------
# Memory: no [N, K] float32 temporaries, only inputs as residuals
# --------------------------------------------------------------------------------------------

MEM_N, MEM_K = 256, 2048
F32_BUFFER = MEM_N * MEM_K * 4

MEM_FUNCS = {
    "sbce": lambda x, t: SBCE(x, t, reduction="mean"),
    "sbce_options": lambda x, t: SBCE(
        x, t, pos_weight=jnp.ones(x.shape[-1]), label_smoothing=0.1, reduction="sum"
    ),
    "probs": lambda x, t: BCE(x, t, reduction="mean"),
    "focal": lambda x, t: FOCAL(x, t, 0.25, 2.0, reduction="mean"),
    "focal_small_gamma": lambda x, t: FOCAL(x, t, gamma=0.5, reduction="sum"),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(MEM_FUNCS))
def test_compiled_temp_memory(name, dtype):
    s = jax.ShapeDtypeStruct((MEM_N, MEM_K), dtype)
    compiled = jax.jit(jax.value_and_grad(MEM_FUNCS[name])).lower(s, s).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < F32_BUFFER // 8


@pytest.mark.parametrize("name", list(MEM_FUNCS))
def test_no_full_size_residuals(name):
    x = jnp.zeros((16, 24), jnp.bfloat16)
    offenders = large_residuals(MEM_FUNCS[name], x, x)
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------

_X = jnp.zeros((4, 5), jnp.float32)


def _bad_cases():
    xi = jnp.zeros((4, 5), jnp.int32)
    return [
        ("int_logits", TypeError, SBCE, (xi, _X), {}, ["logits", "int32"]),
        ("int_probs", TypeError, BCE, (xi, _X), {}, ["probs"]),
        ("focal_int_logits", TypeError, FOCAL, (xi, _X), {}, ["logits"]),
        ("labels_bcast", ValueError, SBCE, (_X, jnp.zeros((3, 1))), {}, ["labels", "(3, 1)"]),
        ("labels_rank", ValueError, SBCE, (_X, jnp.zeros((4,))), {}, ["labels", "(4,)", "(4, 5)"]),
        ("probs_labels", ValueError, BCE, (_X, jnp.zeros((1, 5))), {}, ["labels", "(1, 5)"]),
        ("focal_labels", ValueError, FOCAL, (_X, jnp.zeros((4,))), {}, ["labels", "(4,)"]),
        ("focal_alpha_shape", ValueError, FOCAL, (_X, _X), {"alpha": jnp.ones(4)}, ["alpha"]),
        ("focal_gamma_shape", ValueError, FOCAL, (_X, _X), {"gamma": jnp.ones(3)}, ["gamma"]),
        (
            "focal_alpha_array_range",
            ValueError,
            FOCAL,
            (_X, _X),
            {"alpha": jnp.array([0.5, 1.5, 0.5, 0.5, 0.5])},
            ["alpha", "1.5"],
        ),
        ("focal_gamma_dtype", TypeError, FOCAL, (_X, _X), {"gamma": jnp.ones(5, bool)}, ["gamma"]),
        ("pw_bcast", ValueError, SBCE, (_X, _X[:1]), {"pos_weight": jnp.ones(4)}, ["pos_weight"]),
        ("where_bcast", ValueError, SBCE, (_X, _X[:, :1]), {"where": jnp.ones(5, bool)}, ["where"]),
        ("complex_labels", TypeError, SBCE, (_X, _X.astype(jnp.complex64)), {}, ["labels"]),
        (
            "pw_shape",
            ValueError,
            SBCE,
            (_X, _X),
            {"pos_weight": jnp.ones(4)},
            ["pos_weight", "(5,)"],
        ),
        ("pw_full", ValueError, SBCE, (_X, _X), {"pos_weight": jnp.ones((4, 5))}, ["pos_weight"]),
        ("smoothing", ValueError, SBCE, (_X, _X), {"label_smoothing": 1.5}, ["label_smoothing"]),
        ("where_rank", ValueError, SBCE, (_X, _X), {"where": jnp.ones(4, bool)}, ["where"]),
        ("where_shape", ValueError, BCE, (_X, _X), {"where": jnp.ones((3, 5), bool)}, ["where"]),
        ("where_dtype", TypeError, FOCAL, (_X, _X), {"where": jnp.ones((4, 5))}, ["where"]),
        ("reduction", ValueError, SBCE, (_X, _X), {"reduction": "avg"}, ["reduction"]),
        ("alpha", ValueError, FOCAL, (_X, _X), {"alpha": 1.5}, ["alpha"]),
        ("gamma", ValueError, FOCAL, (_X, _X), {"gamma": -1.0}, ["gamma"]),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise(case):
    _, exc, fn, args, kwargs, words = case
    assert_raises_naming(exc, fn, args, kwargs, words)


def test_traced_alpha_gamma_match_static():
    """optax takes traced alpha and gamma (jax.jit(sigmoid_focal_loss)(x, t, gamma=g)):
    the same numbers as the static path, and no range check on what cannot be read."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(3, 4)) * 4)
    t = jnp.asarray(rng.random((3, 4)))
    for alpha, gamma in ((0.25, 2.0), (0.9, 0.5), (0.5, 0.0)):
        traced = jax.jit(FOCAL)(x, t, alpha=alpha, gamma=gamma)
        assert_close(traced, FOCAL(x, t, alpha, gamma), rtol=1e-14, atol=1e-300)
        assert_close(traced, ref.sigmoid_focal_loss(x, t, alpha, gamma).elementwise)
