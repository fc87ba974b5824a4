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
    float_tolerance,
    large_residuals,
    standard_promotion,
    x64_off,
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
    """No [N, K] float32 temporary of the loss's own. XLA:CPU in jaxlib 0.12 (not 0.10)
    materialises the cotangent of a "mean"/"sum", the broadcast of one scalar, as a
    float32 buffer of the input's shape before the backward fusion (plain JAX code too:
    ``jnp.mean(f(x.astype(float32)))`` of bfloat16 ``x`` keeps it); with float32 inputs it
    shares the gradient's buffer, with bfloat16 ones it cannot. That buffer, the only
    top-level ``f32[N, K]`` broadcast of the optimised program, is allowed; nothing else."""
    s = jax.ShapeDtypeStruct((MEM_N, MEM_K), dtype)
    compiled = jax.jit(jax.value_and_grad(MEM_FUNCS[name])).lower(s, s).compile()
    allowed = F32_BUFFER // 8
    if dtype == jnp.bfloat16:  # every f32[N, K] of the program is a temporary
        entry = compiled.as_text().split("ENTRY", 1)[1]
        full = [line for line in entry.splitlines() if f"= f32[{MEM_N},{MEM_K}]" in line]
        cotangent = [line for line in full if "calls=%wrapped_broadcast" in line]
        assert len(full) == len(cotangent) <= 1, full
        allowed += F32_BUFFER * len(cotangent)
    assert compiled.memory_analysis().temp_size_in_bytes < allowed


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


# --------------------------------------------------------------------------------------------
# The precision users train in: x64 off, float32 and bfloat16 inputs, against float64
# --------------------------------------------------------------------------------------------

LOW = [jnp.float32, jnp.bfloat16]
TINY = float(np.finfo(np.float32).tiny)
X_MAX = 1e4
# Below the smallest normal float32 an intermediate loses relative precision (XLA:CPU
# flushes subnormals); the largest factor that later multiplies it is a softplus, at most
# |x| + log 2 <= X_MAX + 1. Every element-wise result is exact to this absolute floor.
ATOL_LOW = TINY * (X_MAX + 1)

_moderate = st.floats(-15.0, 15.0)
_tail = st.floats(15.0, 100.0).flatmap(lambda a: st.sampled_from([a, -a]))
_huge = st.floats(100.0, X_MAX).flatmap(lambda a: st.sampled_from([a, -a]))
_logits = st.lists(st.one_of(_moderate, _tail, _huge), min_size=1, max_size=12)
_soft = st.floats(0.0, 1.0)


@st.composite
def low_cases(draw, probs=False):
    """Inputs of one dtype-independent draw: logits (or probabilities) with their labels,
    hard or soft."""
    if probs:
        values = st.one_of(
            st.floats(0.0, 1.0),
            st.sampled_from([0.0, 1.0, 1e-30, 1e-8, 1e-4, 0.5, 1 - 1e-7, 1 - 2**-24]),
        )
        x = draw(st.lists(values, min_size=1, max_size=12))
    else:
        x = draw(_logits)
    hard = draw(st.booleans())
    labels = st.sampled_from([0.0, 1.0]) if hard else _soft
    t = draw(st.lists(labels, min_size=len(x), max_size=len(x)))
    return np.array(x), np.array(t)


def _quantised(x, t, dtype):
    """The inputs in ``dtype`` and, exactly, in float64 for the reference."""
    xj, tj = jnp.asarray(x, dtype), jnp.asarray(t, dtype)
    return xj, tj, np.asarray(xj, np.float64), np.asarray(tj, np.float64)


def assert_within(actual, expected, scale, rtol, atol=ATOL_LOW, what=""):
    """|actual - expected| <= rtol * scale + atol, element-wise, where ``scale`` is the sum
    of the magnitudes of the formula's terms (``rtol * scale / |expected|`` is the relative
    tolerance scaled by the condition number)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    bound = rtol * np.abs(np.asarray(scale, np.float64)) + atol
    err = np.abs(a - e)
    bad = ~(err <= bound)
    assert not bad.any(), (what, a[bad], e[bad], bound[bad])


#: Second derivatives: the gradient's (input dtype) forward and reverse, and the loss'
#: forward-mode tangent's (float32, as the loss) forward.
MODES = ("fwd-rev", "rev-rev", "fwd-fwd")


def _derivatives(fn, x, t):
    """Loss, gradient and the second derivative of an element-wise loss, the last in the
    three ``MODES``."""
    ones = jnp.ones_like(x)

    def total(x, t):
        return jnp.sum(fn(x, t))

    def grad_x(x, t):
        return jax.grad(total)(x, t)

    def run(x, t):
        loss = fn(x, t)
        gx, gt = jax.grad(total, (0, 1))(x, t)
        h_fr = jax.jvp(lambda x: grad_x(x, t), (x,), (ones,))[1]
        h_rr = jax.grad(lambda x: jnp.sum(grad_x(x, t)))(x)
        first = lambda x: jax.jvp(lambda x: fn(x, t), (x,), (ones,))[1]
        h_ff = jax.jvp(first, (x,), (ones,))[1]
        return loss, gx, gt, (h_fr, h_rr, h_ff)

    return jax.jit(run)(x, t)


SBCE_OPTIONS = [
    {},
    {"pos_weight": 3.0},
    {"label_smoothing": 0.1},
    {"pos_weight": 0.25, "label_smoothing": 0.2},
]


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("kw", SBCE_OPTIONS, ids=str)
@given(case=low_cases())
def test_sbce_low_precision_value_grad_hessian(dtype, kw, case):
    with x64_off():
        xj, tj, x, t = _quantised(*case, dtype)
        loss, gx, gt, hs = _derivatives(lambda x, t: SBCE(x, t, **kw), xj, tj)
    assert loss.dtype == jnp.float32 and gx.dtype == dtype and gt.dtype == dtype
    r = ref.sigmoid_binary_cross_entropy(x, t, **kw)
    # the value: two non-negative terms; float32 out whatever the input
    assert_within(loss, r.elementwise, r.elementwise, float_tolerance(jnp.float32, 2), what="loss")
    # the gradients round to the input's dtype; each is a difference of two terms
    rtol = float_tolerance(dtype, 2)
    scale = ref.sigmoid_binary_cross_entropy_grad_scale(x, t, **kw)
    assert_within(gx, r.grad_x, scale, rtol, what="grad_x")
    a, pw = kw.get("label_smoothing", 0.0), kw.get("pos_weight", 1.0)
    t_scale = (1 - a) * (pw * ref.softplus(-x) + ref.softplus(x))
    assert_within(gt, r.grad_t, t_scale, rtol, what="grad_t")
    want = ref.sigmoid_binary_cross_entropy_hessian(x, t, **kw)
    for mode, h in zip(MODES, hs, strict=True):
        assert h.dtype == (jnp.float32 if mode == "fwd-fwd" else dtype)
        assert_within(h, want, want, rtol, what=mode)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@given(case=low_cases(probs=True))
def test_bce_probs_low_precision_value_grad_hessian(dtype, case):
    with x64_off():
        pj, tj, p, t = _quantised(*case, dtype)
        loss, gp, gt, hs = _derivatives(BCE, pj, tj)
    assert loss.dtype == jnp.float32 and gp.dtype == dtype
    r = ref.binary_cross_entropy(p, t)
    # two non-negative terms; the gradient (p - t) / max(p (1 - p), eps) is one difference
    # (exact or one rounding) and a quotient: condition number 1 as well.
    assert_within(loss, r.elementwise, r.elementwise, float_tolerance(jnp.float32, 2), what="loss")
    rtol = float_tolerance(dtype, 2)
    assert_within(gp, r.grad_x, r.grad_x, rtol, what="grad_p")
    log_scale = np.abs(np.log(np.maximum(p, 1e-300))) + np.abs(np.log1p(-np.minimum(p, 0.5)))
    assert_within(gt, r.grad_t, np.minimum(log_scale, 200.0), rtol, what="grad_t")
    want = ref.binary_cross_entropy_hessian(p, t)
    for mode, h in zip(MODES, hs, strict=True):
        assert_within(h, want, want, rtol, what=mode)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
# 12 parametrisations, each tracing value, gradient and three Hessian modes per example:
# 8 examples each keep the suite's time in CI's budget (25 took 17 s a parametrisation).
@settings(max_examples=8)
@given(case=low_cases())
def test_focal_low_precision_value_grad_hessian(dtype, gamma, alpha, case):
    with x64_off():
        xj, tj, x, t = _quantised(*case, dtype)
        loss, gx, _, hs = _derivatives(lambda x, t: FOCAL(x, t, alpha, gamma), xj, tj)
    assert loss.dtype == jnp.float32 and gx.dtype == dtype
    r = ref.sigmoid_focal_loss(x, t, alpha, gamma)
    d = ref.sigmoid_focal_loss_derivatives(x, t, alpha, gamma)
    assert_within(loss, r.elementwise, d.value_scale, float_tolerance(jnp.float32, 2), what="loss")
    rtol = float_tolerance(dtype, 4)
    assert_within(gx, r.grad_x, d.grad_x_scale, rtol, what="grad_x")
    for mode, h in zip(MODES, hs, strict=True):
        assert h.dtype == (jnp.float32 if mode == "fwd-fwd" else dtype)
        assert_within(h, d.hess_x, d.hess_x_scale, rtol, what=mode)


@pytest.mark.parametrize("kind", ["sbce", "focal"])
def test_check_grads_order2_hard_labels_and_tails(kind):
    """The rules' own derivatives against finite differences, forward and reverse, in
    float64: hard labels (log 0 inside the focal weight) and logits out to |x| = 20."""
    x = np.array([[-20.0, -8.0, -1.5, 0.0], [0.7, 3.0, 9.0, 20.0]])
    t = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    fns = {
        "sbce": lambda x: SBCE(x, t, pos_weight=jnp.array([0.5, 1.0, 2.0, 3.0])),
        "focal": lambda x: FOCAL(x, t, 0.25, 0.5),
    }
    jax.test_util.check_grads(
        jax.jit(fns[kind]), (x,), order=3, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6
    )


def test_check_grads_focal_alpha_gamma_arrays():
    """Array alpha and gamma are differentiable inputs (as in optax): order 2 in every
    argument, with labels and alpha broadcasting."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4)) * 2
    t = rng.random((1, 4))
    alpha = rng.uniform(0.2, 0.8, size=(4,))
    gamma = rng.uniform(0.5, 2.5, size=(3, 1))
    fn = jax.jit(lambda *a: FOCAL(*a, reduction="sum"))
    jax.test_util.check_grads(
        fn, (x, t, alpha, gamma), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6
    )


def test_focal_alpha_gamma_gradients_match_reference():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(5, 3)) * 4
    t = rng.random((5, 3))
    alpha, gamma = jnp.asarray(0.3), jnp.asarray(1.5)
    g_alpha, g_gamma = jax.jit(jax.grad(lambda a, g: FOCAL(x, t, a, g, reduction="sum"), (0, 1)))(
        alpha, gamma
    )
    d = ref.sigmoid_focal_loss_derivatives(x, t, 0.3, 1.5)
    assert_close(g_alpha, d.grad_alpha.sum())
    assert_close(g_gamma, d.grad_gamma.sum())


# --------------------------------------------------------------------------------------------
# Broadcasting as optax: every input optax takes, the same result
# --------------------------------------------------------------------------------------------

_BX = np.random.default_rng(10).normal(size=(4, 5)).astype(np.float32) * 3
_BT = (np.random.default_rng(11).random((4, 5)) < 0.5).astype(np.float32)

BROADCAST_CASES = {
    "labels-rows": (_BX, _BT[:, :1], {}),
    "labels-rank": (_BX, _BT[0], {}),
    "labels-scalar": (_BX, 1.0, {}),
    "labels-int-scalar": (_BX, 0, {}),
    "labels-0d": (_BX, np.float32(1.0), {}),
}
FOCAL_ONLY = {
    "alpha-per-class": (_BX, _BT, {"alpha": np.linspace(0.1, 0.9, 5, dtype=np.float32)}),
    "gamma-per-row": (_BX, _BT, {"gamma": np.array([[0.0], [0.5], [1.0], [3.0]], np.float32)}),
    "gamma-0d-array": (_BX, _BT, {"gamma": jnp.float32(0.5)}),
}
# Broadcasts optax takes that would make the loss larger than the logits: jxent raises,
# naming the argument and both shapes (README, "differs from optax on purpose").
ENLARGING_CASES = {
    "logits-rank": (_BX[0], _BT, {}, "labels"),
    "logits-rows": (_BX[:1], _BT, {}, "labels"),
    "logits-0d": (np.float32(0.3), _BT[0], {}, "labels"),
    "both": (_BX[:, :1], _BT[:1], {}, "labels"),
    "rows-vs-flat": (_BX[:, :1], _BT[:, 0], {}, "labels"),
}
FOCAL_ENLARGING = {
    "alpha-bigger": (_BX[0], _BT[0], {"alpha": np.full((2, 5), 0.25, np.float32)}, "alpha"),
    "gamma-bigger": (_BX[:, :1], _BT[:, :1], {"gamma": np.ones((4, 5), np.float32)}, "gamma"),
}


def _optax_and_ours(name, case, transform):
    x, t, kw = case
    theirs_fn = getattr(optax.losses, name)
    ours_fn = {"sigmoid_binary_cross_entropy": SBCE, "sigmoid_focal_loss": FOCAL}[name]
    with x64_off(), jax.numpy_rank_promotion("allow"), standard_promotion():
        theirs = transform(lambda x, t, kw: theirs_fn(x, t, **kw))(x, t, kw)
        g_theirs = jax.grad(lambda x: jnp.sum(theirs_fn(x, t, **kw)))(jnp.asarray(x))
    with x64_off():
        ours = transform(lambda x, t, kw: ours_fn(x, t, **kw))(x, t, kw)
        g_ours = jax.grad(lambda x: jnp.sum(ours_fn(x, t, **kw)))(jnp.asarray(x))
    return theirs, ours, g_theirs, g_ours


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
@pytest.mark.parametrize(
    ("name", "case"),
    [("sigmoid_binary_cross_entropy", c) for c in BROADCAST_CASES.values()]
    + [("sigmoid_focal_loss", c) for c in [*BROADCAST_CASES.values(), *FOCAL_ONLY.values()]],
    ids=[f"sbce-{k}" for k in BROADCAST_CASES]
    + [f"focal-{k}" for k in BROADCAST_CASES]
    + [f"focal-{k}" for k in FOCAL_ONLY],
)
def test_broadcasting_matches_optax(name, case, transform):
    """Under jit the options are traced (optax's own tests call jax.jit(sigmoid_focal_loss)
    with gamma=...); the loss has the broadcast shape, the gradient the logits' shape."""
    theirs, ours, g_theirs, g_ours = _optax_and_ours(name, case, transform)
    assert ours.shape == theirs.shape and ours.dtype == jnp.float32
    assert g_ours.shape == g_theirs.shape == np.shape(case[0])
    # float32 on both sides; optax's log-sum-exp differs from ours by a few roundings
    tol = float_tolerance(jnp.float32, 4, cond=10.0)
    assert_close(ours, theirs, rtol=tol, atol=tol)
    assert_close(g_ours, g_theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("name", "case"),
    [("sigmoid_binary_cross_entropy", c) for c in ENLARGING_CASES.values()]
    + [("sigmoid_focal_loss", c) for c in [*ENLARGING_CASES.values(), *FOCAL_ENLARGING.values()]],
    ids=[f"sbce-{k}" for k in ENLARGING_CASES]
    + [f"focal-{k}" for k in ENLARGING_CASES]
    + [f"focal-{k}" for k in FOCAL_ENLARGING],
)
def test_enlarging_broadcast_raises(name, case):
    """optax returns a loss larger than the logits here (logits [4, 1] with labels [4]:
    a [4, 4] loss whose mean is a plausible wrong number); jxent names the argument,
    both shapes and the shape the broadcast would give."""
    x, t, kw, arg = case
    with x64_off(), jax.numpy_rank_promotion("allow"), standard_promotion():
        theirs = getattr(optax.losses, name)(x, t, **kw)
    assert theirs.size > np.size(x)  # optax takes it and enlarges the loss
    ours = {"sigmoid_binary_cross_entropy": SBCE, "sigmoid_focal_loss": FOCAL}[name]
    other = kw[arg] if arg in kw else t
    words = (arg, str(np.shape(x)), str(np.shape(other)), str(theirs.shape))
    assert_raises_naming(ValueError, ours, (x, t), kw, words)


def test_broadcast_labels_gradient_and_where():
    """Broadcast labels get the summed gradient; where has the loss' (broadcast) shape."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 4)) * 2
    t = rng.random((3, 1))
    full = np.broadcast_to(t, x.shape)
    w = rng.random((3, 4)) < 0.6
    gx, gt = jax.grad(lambda x, t: SBCE(x, t, where=w, reduction="sum"), (0, 1))(x, t)
    r = ref.sigmoid_binary_cross_entropy(x, full, where=w, reduction="sum")
    assert gt.shape == (3, 1)
    assert_close(gx, r.grad_x)
    assert_close(gt, r.grad_t.sum(axis=1, keepdims=True))
    # a NaN label that only excluded elements see leaks into nothing
    t_nan = t.copy()
    t_nan[1] = np.nan
    w_row = np.ones((3, 4), bool)
    w_row[1] = False
    out, g = jax.value_and_grad(lambda x: SBCE(x, t_nan, where=w_row, reduction="sum"))(x)
    assert_finite(out, g)
    assert_close(g[1], 0.0)
