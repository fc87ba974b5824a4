"""Tests for jxent's KL divergences, distillation loss (softmax_kl_divergence) and entropy.

Values and gradients are checked against the float64 reference in
``reference_divergence.py``, against optax where the names are shared, and through the
identity H(p, q) = H(p) + KL(p || q) against jxent's categorical cross-entropy.
"""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
import reference_divergence as ref
from checks import (
    assert_close,
    assert_no_nan,
    assert_raises_naming,
    float_tolerance,
    large_residuals,
    standard_promotion,
    x64_off,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent

KL = jxent.kl_divergence
KL_LOG = jxent.kl_divergence_with_log_targets
DISTILL = jxent.softmax_kl_divergence
ENTROPY = jxent.entropy
JSD = jxent.softmax_jensen_shannon_divergence


def log_softmax64(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


# --------------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    """(shape, axis): 1-2 batch dims (or none) and an int, tuple or None class axis."""
    kind = draw(st.sampled_from(["int", "int", "tuple", "none"]))
    n_cls = 2 if kind == "tuple" else 1
    bshape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    cshape = tuple(draw(st.lists(st.integers(1, 5), min_size=n_cls, max_size=n_cls)))
    if kind == "none":
        return cshape, None
    ndim = len(bshape) + n_cls
    positions = draw(st.permutations(range(ndim)))[:n_cls]
    shape, rest = [0] * ndim, iter(bshape)
    for p, c in zip(positions, cshape, strict=True):
        shape[p] = c
    for i in range(ndim):
        if i not in positions:
            shape[i] = next(rest)
    axis = tuple(p - ndim if draw(st.booleans()) else p for p in positions)
    return tuple(shape), axis[0] if kind == "int" else axis


def make_where(kind, rng, shape, axis):
    if kind == "row":
        return rng.random(ref.batch_shape(shape, axis)) < 0.75
    if kind == "class":
        return rng.random(shape) < 0.8
    if kind == "class_bcast":
        return rng.random(tuple(s if rng.random() < 0.5 else 1 for s in shape)) < 0.8
    return None


@st.composite
def cases(draw, kind):
    shape, axis = draw(layouts())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    beta = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])) if kind == "jsd" else None
    scale = draw(st.sampled_from([0.5, 3.0]))
    a = rng.normal(size=shape) * scale
    b = rng.normal(size=shape) * scale
    if kind in ("kl", "kl_log"):
        # a: log-predictions (normalised or not), b: (log-)targets with exact zeros.
        a = a if draw(st.booleans()) else log_softmax64(a, ref.class_axes(len(shape), axis))
        t = rng.random(shape)
        t[rng.random(shape) < 0.3] = 0.0
        # zero targets on -inf log-predictions: 0 log 0 = 0
        a[(t == 0) & (rng.random(shape) < 0.5)] = -np.inf
        with np.errstate(divide="ignore"):
            b = np.log(t) if kind == "kl_log" else t
    elif draw(st.booleans()):
        # -inf in both inputs at the same classes, and teacher-only -inf classes.
        both = rng.random(shape) < 0.25
        a[both] = -np.inf
        b[both] = -np.inf
        # Teacher-only -inf classes (the reverse KL, beta = 1, is then +inf).
        if kind == "distill" or (kind == "jsd" and beta < 1):
            b[rng.random(shape) < 0.2] = -np.inf
    kinds = ["none", "class", "class_bcast"] + ([] if axis is None else ["row"])
    where = make_where(draw(st.sampled_from(kinds)), rng, shape, axis)
    kwargs = {"reduction": draw(st.sampled_from(["none", "sum", "mean"]))}
    if kind in ("distill", "jsd"):
        kwargs["temperature"] = draw(st.sampled_from([1.0, 0.5, 3.0]))
    if kind == "jsd":
        kwargs["beta"] = beta
    return a, b, axis, where, kwargs, rng


def _call(kind, a, b, axis, where, kwargs):
    if kind == "kl":
        return KL(a, b, axis, where, **kwargs)
    if kind == "kl_log":
        return KL_LOG(a, b, axis, where, **kwargs)
    if kind == "distill":
        return DISTILL(a, b, axis=axis, where=where, **kwargs)
    if kind == "jsd":
        return JSD(a, b, axis=axis, where=where, **kwargs)
    return ENTROPY(a, axis, where, **kwargs)


def _reference(kind, a, b, axis, where, kwargs, cot):
    if kind == "kl":
        return ref.kl_divergence(a, b, axis, where, cotangent=cot, **kwargs)
    if kind == "kl_log":
        return ref.kl_divergence_with_log_targets(a, b, axis, where, cotangent=cot, **kwargs)
    if kind == "distill":
        return ref.softmax_kl_divergence(a, b, axis=axis, where=where, cotangent=cot, **kwargs)
    if kind == "jsd":
        return ref.softmax_jensen_shannon_divergence(
            a, b, axis=axis, where=where, cotangent=cot, **kwargs
        )
    return ref.entropy(a, axis, where, cotangent=cot, **kwargs)


KINDS = ("kl", "kl_log", "distill", "entropy", "jsd")


def _check_against_reference(kind, case, transform):
    a, b, axis, where, kwargs, rng = case
    bshape = ref.batch_shape(a.shape, axis)
    cot = rng.normal(size=bshape) if kwargs["reduction"] == "none" else 1.3
    r = _reference(kind, a, b, axis, where, kwargs, cot)
    argnums = (0,) if kind == "entropy" else (0, 1)

    def objective(a, b, w):
        out = _call(kind, a, b, axis, w, kwargs)
        return jnp.sum(out * jnp.asarray(cot)), out

    def run(a, b, w):
        (_, out), g = jax.value_and_grad(objective, argnums=argnums, has_aux=True)(a, b, w)
        return _call(kind, a, b, axis, w, kwargs), out, g

    w = None if where is None else jnp.asarray(where)
    out, out_ad, grads = transform(run)(jnp.asarray(a), jnp.asarray(b), w)
    assert out.dtype == jnp.float64 and out.shape == np.shape(r.loss)
    assert_close(out, r.loss)
    assert_close(out_ad, r.loss)
    for g, want in zip(grads, r.grads, strict=False):
        assert g.dtype == jnp.float64
        assert_no_nan(g)
        assert_close(g, want)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20)
@given(data=st.data())
def test_matches_reference(kind, data):
    _check_against_reference(kind, data.draw(cases(kind)), jax.jit)


@pytest.mark.parametrize("kind", KINDS)
def test_eager_matches_reference(kind):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    if kind in ("kl", "kl_log"):
        t = rng.random((3, 5))
        t[0, :2] = 0
        a = log_softmax64(a)
        a[0, 0] = -np.inf
        with np.errstate(divide="ignore"):
            b = np.log(t) if kind == "kl_log" else t
    kwargs = {"reduction": "mean"} | ({"temperature": 2.0} if kind == "distill" else {})
    kwargs |= {"temperature": 0.7, "beta": 0.3} if kind == "jsd" else {}
    _check_against_reference(kind, (a, b, -1, rng.random(3) < 0.7, kwargs, rng), lambda f: f)


@pytest.mark.parametrize("kind", KINDS)
def test_check_grads(kind):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    if kind == "kl":
        b = rng.random((3, 4)) + 0.1
    fn = {
        "kl": lambda a, b: KL(jax.nn.log_softmax(a), b),
        "kl_log": lambda a, b: KL_LOG(jax.nn.log_softmax(a), b),
        "distill": lambda a, b: DISTILL(a, b, temperature=1.7),
        "entropy": lambda a, b: ENTROPY(a * b),
        "jsd": lambda a, b: JSD(a, b, beta=0.3, temperature=1.7),
    }[kind]
    fn = jax.jit(fn)
    jax.test_util.check_grads(fn, (a, b), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Parity with optax; 0 log 0 = 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("log_targets", [False, True])
@pytest.mark.parametrize("where", [False, True])
def test_kl_matches_optax(dtype, log_targets, where):
    rng = np.random.default_rng(2)
    lp = jnp.asarray(log_softmax64(rng.normal(size=(4, 6))), dtype)
    t = rng.random((4, 6)) + 0.05
    t = t / t.sum(-1, keepdims=True)
    t = jnp.asarray(np.log(t) if log_targets else t, dtype)
    w = jnp.asarray(rng.random((4, 6)) < 0.7) if where else None
    ours_fn, theirs_fn = (
        (KL_LOG, optax.losses.kl_divergence_with_log_targets)
        if log_targets
        else (KL, optax.losses.kl_divergence)
    )

    @jax.jit
    def both(lp, t, w):
        with standard_promotion():
            theirs = theirs_fn(lp, t, where=w)
            g_theirs = jax.grad(lambda a, b: jnp.sum(theirs_fn(a, b, where=w)), (0, 1))(lp, t)
        ours = ours_fn(lp, t, where=w)
        g_ours = jax.grad(lambda a, b: jnp.sum(ours_fn(a, b, where=w)), (0, 1))(lp, t)
        return (ours, g_ours), (theirs, g_theirs)

    mine, theirs = both(lp, t, w)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == jnp.float32 else {}
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True):
        assert_close(a, b, **tol)


def test_zero_times_log_zero_is_zero(jit_mode):
    # The example: optax 0.2.8 returns NaN here.
    lp = jnp.log(jnp.array([0.0, 0.5, 0.5]))
    t = jnp.array([0.0, 0.5, 0.5])
    out, (g_lp, g_t) = jit_mode(jax.value_and_grad(KL, (0, 1)))(lp, t)
    assert float(out) == 0.0
    assert_close(g_lp, [0.0, -0.5, -0.5])
    assert_close(g_t, [0.0, 1.0, 1.0])
    out, (g_lp, g_lt) = jit_mode(jax.value_and_grad(KL_LOG, (0, 1)))(lp, jnp.log(t))
    assert float(out) == 0.0
    assert_close(g_lp, [0.0, -0.5, -0.5])
    assert_close(g_lt, [0.0, 0.5, 0.5])


def test_target_on_neg_inf_prediction_is_inf():
    lp = jnp.array([[-jnp.inf, 0.0], [-1.0, -1.0]])
    t = jnp.array([[0.5, 0.5], [0.5, 0.5]])
    out, (g_lp, g_t) = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(KL(a, b)[1:]), (0, 1)))(
        lp, t
    )
    assert np.isinf(KL(lp, t)[0]) and np.isfinite(KL(lp, t)[1])
    g = jax.grad(lambda a, b: jnp.sum(KL(a, b)), (0, 1))(lp, t)
    assert_no_nan(*g)
    assert_close(g[0][0], [-0.5, -0.5])
    assert_close(g[1][0], [0.0, np.log(0.5) + 1])


# --------------------------------------------------------------------------------------------
# Distillation and entropy: masking, temperature, identities
# --------------------------------------------------------------------------------------------


def test_cross_entropy_identity():
    """H(p, q) = H(p) + KL(p || q), against the categorical cross-entropy."""
    rng = np.random.default_rng(3)
    s = rng.normal(size=(6, 7)) * 2
    t = rng.normal(size=(6, 7)) * 2
    s[0, 2] = t[0, 2] = -np.inf  # a class masked in both
    t[1, 3] = -np.inf  # a class the teacher rules out
    p = np.exp(np.where(np.isfinite(t), t - np.max(t, -1, keepdims=True), -np.inf))
    p = p / p.sum(-1, keepdims=True)
    temp = 2.5

    @jax.jit
    def run(s, t, p):
        ce = jxent.softmax_cross_entropy(s, p)
        g_ce = jax.grad(lambda s: jnp.sum(jxent.softmax_cross_entropy(s, p)))(s)
        g_kl = jax.grad(lambda s: jnp.sum(DISTILL(s, t)))(s)
        # with a temperature the same identity holds on the scaled logits, times T**2
        p_t = jax.nn.softmax(t / temp)
        lhs = temp**2 * (jxent.softmax_cross_entropy(s / temp, p_t) - ENTROPY(t / temp))
        return (
            (ce, ENTROPY(t) + DISTILL(s, t)),
            (g_ce, g_kl),
            (lhs, DISTILL(s, t, temperature=temp)),
        )

    for x, y in run(s, t, p):
        assert_close(x, y)


def test_distill_masking_and_inf():
    s = jnp.array([[1.0, -jnp.inf, 0.5], [-jnp.inf, 1.0, 2.0], [0.3, 0.1, -0.2]])
    t = jnp.array([[2.0, -jnp.inf, -jnp.inf], [0.0, 1.0, 2.0], [-jnp.inf] * 3])
    f = jax.jit(lambda s, t: DISTILL(s, t, temperature=2.0))
    out = f(s, t)
    # row 0: both -inf at class 1, teacher -inf at class 2 -> p = [1, 0, 0]
    q0 = np.exp(np.array([0.5, 0.25]) - np.logaddexp(0.5, 0.25))
    assert_close(out[0], 4.0 * -np.log(q0[0]))
    # row 1: the student rules out a class the teacher does not -> +inf
    assert np.isinf(out[1])
    # row 2: the teacher rules out every class -> 0
    assert float(out[2]) == 0.0
    gs, gt = jax.jit(jax.grad(lambda s, t: jnp.sum(DISTILL(s, t, temperature=2.0)), (0, 1)))(s, t)
    assert_no_nan(gs, gt)
    assert_close(gt[1], 0.0)  # rows with an infinite loss: no teacher gradient
    p1 = np.exp(np.array([0.0, 0.5, 1.0]) - np.logaddexp.reduce([0.0, 0.5, 1.0]))
    q1 = np.array([0.0, *np.exp(np.array([0.5, 1.0]) - np.logaddexp(0.5, 1.0))])
    assert_close(gs[1], 2.0 * (q1 - p1))
    assert_close(gs[2], 0.0)
    assert_close(gt[2], 0.0)
    assert_close(gs[0, 1], 0.0)


def test_distill_stop_gradient_teacher():
    rng = np.random.default_rng(4)
    s, t = jnp.asarray(rng.normal(size=(4, 5))), jnp.asarray(rng.normal(size=(4, 5)))
    f = lambda s, t: jnp.sum(DISTILL(s, jax.lax.stop_gradient(t), temperature=3.0))
    gs, gt = jax.grad(f, (0, 1))(s, t)
    assert_close(gt, 0.0)
    assert_close(gs, jax.grad(lambda s: jnp.sum(DISTILL(s, t, temperature=3.0)))(s))


def test_distill_equal_inputs_is_zero():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 33)) * 10, jnp.float32)
    out = DISTILL(x, x, temperature=0.7)
    assert np.all(np.asarray(out) >= 0)
    assert_close(out, 0.0, atol=1e-6)


def test_entropy_edge_cases():
    x = jnp.array(
        [[0.0, 0.0, 0.0, 0.0], [5.0, -jnp.inf, 5.0, -jnp.inf], [-jnp.inf] * 4, [3e38, 0.0, 0, 0]],
        jnp.float32,
    )
    out, g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(ENTROPY(x))))(x)
    h = ENTROPY(x)
    assert_close(h, [np.log(4), np.log(2), 0.0, 0.0], rtol=1e-6, atol=1e-7)
    assert_no_nan(g)
    assert_close(g, 0.0, atol=1e-7)  # stationary (uniform) or masked everywhere here
    w = jnp.array([[True, True, False, False]] * 4)
    assert_close(ENTROPY(x, where=w)[:2], [np.log(2), 0.0], rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked(kind):
    a = jnp.zeros((2, 3))
    b = jnp.full((2, 3), 1 / 3)
    for w in (jnp.zeros(2, bool), jnp.zeros((2, 3), bool)):
        for red in ("none", "sum", "mean"):
            f = lambda a, b, red=red, w=w: jnp.sum(_call(kind, a, b, -1, w, {"reduction": red}))
            out, g = jax.jit(jax.value_and_grad(f, (0, 1)))(a, b)
            assert float(out) == 0.0
            assert_close(g[0], 0.0)
            assert_close(g[1], 0.0)


@jax.jit
def _large_logits_results(x, y):
    g = jax.grad(lambda x, y: jnp.sum(DISTILL(x, y)), (0, 1))(x, y)
    return DISTILL(x, y), g, ENTROPY(x), jax.grad(lambda x: jnp.sum(ENTROPY(x)))(x)


def test_large_logits():
    big = float(np.finfo(np.float32).max)
    x = jnp.array([[big, 0.0, -big], [1e4, -1e4, 0.0]], jnp.float32)
    y = jnp.array([[0.0, big, -big], [-1e4, 1e4, 0.0]], jnp.float32)
    out, g, h, gh = _large_logits_results(x, y)
    assert_no_nan(out, *g, gh)
    # finite and exact: KL = lse_s - s_k at the teacher's one-hot class
    assert_close(out[1], 2e4, rtol=1e-6)
    assert_close(h, 0.0)


# --------------------------------------------------------------------------------------------
# Low precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(kind, dtype):
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(8, 50)) * 2, rng.normal(size=(8, 50)) * 2
    if kind in ("kl", "kl_log"):
        a = log_softmax64(a)
        b = np.exp(log_softmax64(b)) if kind == "kl" else log_softmax64(b)
    aj, bj = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    aq, bq = np.asarray(aj, np.float64), np.asarray(bj, np.float64)
    kwargs = {"reduction": "none"} | ({"temperature": 2.0} if kind == "distill" else {})
    f = lambda a, b: _call(kind, a, b, -1, None, kwargs)
    out = jax.jit(f)(aj, bj)
    ga, gb = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b)), (0, 1)))(aj, bj)
    r = _reference(kind, aq, bq, -1, None, kwargs, None)
    assert out.dtype == jnp.float32
    assert ga.dtype == dtype and gb.dtype == dtype
    # float32 accumulation: within 1e-6 of the float64 value on the same inputs
    # (relative to the magnitude of the summed terms).
    assert_close(out, r.loss, rtol=1e-6, atol=2e-6)
    gtol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    assert_close(ga, r.grads[0], rtol=gtol, atol=gtol)
    if kind != "entropy":
        assert_close(gb, r.grads[1], rtol=gtol, atol=gtol)


# --------------------------------------------------------------------------------------------
# Memory: only per-row residuals, no [N, K] float32 temporaries
# --------------------------------------------------------------------------------------------

MEM_N, MEM_K = 256, 2048
F32_BUFFER = MEM_N * MEM_K * 4

MEM_FUNCS = {
    "kl": lambda a, b: KL(a, b, reduction="mean"),
    "kl_log": lambda a, b: KL_LOG(a, b, reduction="mean"),
    "distill": lambda a, b: DISTILL(a, b, temperature=2.0, reduction="mean"),
    "distill_student_only": lambda a, b: DISTILL(a, jax.lax.stop_gradient(b), reduction="mean"),
    "entropy": lambda a, b: ENTROPY(a, reduction="mean") + ENTROPY(b, reduction="sum"),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(MEM_FUNCS))
def test_compiled_temp_memory(name, dtype):
    s = jax.ShapeDtypeStruct((MEM_N, MEM_K), dtype)
    argnums = 0 if name.endswith("only") else (0, 1)
    compiled = jax.jit(jax.value_and_grad(MEM_FUNCS[name], argnums)).lower(s, s).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # float32: nothing of size [N, K]; bfloat16 with both gradients: at most one buffer
    limit = (
        F32_BUFFER // 8 if dtype == jnp.float32 or argnums == 0 else F32_BUFFER + F32_BUFFER // 8
    )
    assert temp < limit, (temp, limit)


@pytest.mark.parametrize("name", list(MEM_FUNCS))
def test_no_full_size_residuals(name):
    x = jnp.zeros((16, 24), jnp.bfloat16)
    # "stop_gradient": the teacher itself, not a copy.
    offenders = large_residuals(MEM_FUNCS[name], x, x, allowed=("stop_gradient",))
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------

_X = jnp.zeros((4, 5), jnp.float32)


def _bad_cases():
    xi = jnp.zeros((4, 5), jnp.int32)
    return [
        ("kl_int", TypeError, KL, (_X, xi), {}, ["targets", "int32"]),
        ("kl_int_pred", TypeError, KL, (xi, _X), {}, ["log_predictions"]),
        # shapes that do not broadcast against the predictions' (ones that do are optax's)
        ("kl_shape", ValueError, KL, (_X, jnp.zeros((4, 2))), {}, ["targets", "(4, 2)"]),
        ("kl_log_shape", ValueError, KL_LOG, (_X, jnp.zeros((6,))), {}, ["log_targets"]),
        ("kl_zero_classes", ValueError, KL, (_X[:, :0], _X[:, :0]), {}, ["log_predictions"]),
        ("distill_zero_classes", ValueError, DISTILL, (_X[:0].T, _X[:0].T), {}, ["student"]),
        ("entropy_zero_classes", ValueError, ENTROPY, (_X[:, :0],), {}, ["logits", "(4, 0)"]),
        ("distill_shape", ValueError, DISTILL, (_X, jnp.zeros((1, 5))), {}, ["teacher_logits"]),
        ("distill_int", TypeError, DISTILL, (xi, _X), {}, ["student_logits"]),
        ("temperature_neg", ValueError, DISTILL, (_X, _X), {"temperature": -1.0}, ["temperature"]),
        ("temperature_zero", ValueError, DISTILL, (_X, _X), {"temperature": 0.0}, ["temperature"]),
        ("entropy_int", TypeError, ENTROPY, (xi,), {}, ["logits"]),
        ("axis", ValueError, ENTROPY, (_X,), {"axis": 2}, ["axis"]),
        ("where_shape", ValueError, KL, (_X, _X), {"where": jnp.ones((3,), bool)}, ["where"]),
        ("where_dtype", TypeError, DISTILL, (_X, _X), {"where": jnp.ones(4)}, ["where"]),
        ("reduction", ValueError, ENTROPY, (_X,), {"reduction": "batchmean"}, ["reduction"]),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise(case):
    _, exc, fn, args, kwargs, words = case
    assert_raises_naming(exc, fn, args, kwargs, words)


def test_traced_temperature_raises():
    with pytest.raises(TypeError, match="temperature"):
        jax.jit(lambda x, temp: DISTILL(x, x, temperature=temp))(_X, 2.0)


def test_positional_signatures_match_optax():
    a = jnp.asarray(log_softmax64(np.random.default_rng(7).normal(size=(3, 4))))
    t = jnp.exp(a)
    w = jnp.array([True, False, True])
    assert_close(KL(a, t, -1, w), jnp.where(w, KL(a, t), 0.0))
    assert_close(KL_LOG(a, a, -1, w), 0.0)
    assert_close(ENTROPY(a, -1, w), jnp.where(w, ENTROPY(a), 0.0))
    assert_close(functools.partial(KL, axis=None)(a, t), jnp.sum(KL(a, t)))


def test_vmap_and_checkpoint():
    rng = np.random.default_rng(8)
    a, b = jnp.asarray(rng.normal(size=(4, 3, 5))), jnp.asarray(rng.normal(size=(4, 3, 5)))
    fns = (
        lambda a, b: jnp.sum(DISTILL(a, b, temperature=2.0)),
        lambda a, b: jnp.sum(ENTROPY(a) * ENTROPY(b)),
        lambda a, b: jnp.sum(KL(jax.nn.log_softmax(a), jax.nn.softmax(b))),
        lambda a, b: jnp.sum(KL_LOG(jax.nn.log_softmax(a), jax.nn.log_softmax(b))),
    )
    for fn in fns:

        @jax.jit
        def run(a, b, fn=fn):
            total = lambda a, b: jnp.sum(jax.vmap(fn)(a, b))
            loop = jnp.stack([fn(a[i], b[i]) for i in range(4)])
            g1 = jax.grad(total, (0, 1))(a, b)
            g2 = jax.grad(jax.checkpoint(total), (0, 1))(a, b)
            g3 = jax.vmap(jax.grad(fn, (0, 1)))(a, b)
            return jax.vmap(fn)(a, b), loop, g1, g2, g3

        batched, loop, g1, g2, g3 = run(a, b)
        assert_close(batched, loop)
        for x, y, z in zip(g1, g2, g3, strict=True):
            assert_close(x, y)
            assert_close(x, z)


def test_kl_long_rows_match_reference():
    """Rows longer than CPU_ROW_LIMIT are summed in pieces on CPU: same numbers."""
    rng = np.random.default_rng(5)
    k = 40000
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, k)))), np.float32)
    t = rng.random((2, k)).astype(np.float32)
    t[:, ::3] = 0.0  # 0 log 0 = 0
    t /= t.sum(-1, keepdims=True)
    lp64, t64 = lp.astype(np.float64), t.astype(np.float64)
    want = np.sum(np.where(t64 > 0, t64 * (np.log(np.where(t64 > 0, t64, 1)) - lp64), 0), -1)
    assert_close(jax.jit(KL)(lp, t), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# optax's input conventions: broadcasting, empty batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_targets", [False, True])
@pytest.mark.parametrize("lp_rows, t_rows", [(3, 1), (1, 3), (3, None), (None, 3)])
def test_kl_broadcast(log_targets, lp_rows, t_rows):
    """Targets broadcast to the log-predictions' shape as in optax's product (each
    gradient has its input's shape, the broadcast one's summed); targets that would
    enlarge the log-predictions raise, naming both shapes."""
    rng = np.random.default_rng(5)
    lp_full = log_softmax64(rng.normal(size=(3, 4)))
    t_full = rng.dirichlet(np.ones(4), size=3)
    if log_targets:
        t_full = np.log(t_full)
    lp = lp_full[0] if lp_rows is None else lp_full[:lp_rows]
    t = t_full[0] if t_rows is None else t_full[:t_rows]
    fn, ref_fn = (
        (KL_LOG, ref.kl_divergence_with_log_targets) if log_targets else (KL, ref.kl_divergence)
    )
    if lp.shape != (3, 4):
        name = "log_targets" if log_targets else "targets"
        words = (name, str(lp.shape), str(t.shape), "(3, 4)")
        assert_raises_naming(ValueError, fn, (lp, t), {}, words)
        return
    tb = np.broadcast_to(t, (3, 4))
    want = ref_fn(lp, tb)
    loss = fn(lp, t)
    assert loss.shape == (3,)
    assert_close(loss, want.per_row)
    g_lp, g_t = jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=(0, 1))(lp, t)
    assert g_lp.shape == lp.shape and g_t.shape == t.shape
    assert_close(g_lp, want.grads[0])
    assert_close(g_t, want.grads[1].sum(0).reshape(t.shape))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("fn", [KL, KL_LOG, DISTILL, ENTROPY], ids=lambda f: f.__name__)
def test_empty_batch(fn, reduction):
    """An empty batch gives an empty per-example result, and 0 for "sum" and "mean"."""
    x = jnp.zeros((0, 3))
    args = (x,) if fn is ENTROPY else (x, x)
    for call in (fn, jax.jit(fn, static_argnames="reduction")):
        out = call(*args, reduction=reduction)
        if reduction == "none":
            assert out.shape == (0,)
        else:
            np.testing.assert_array_equal(out, 0.0)


# --------------------------------------------------------------------------------------------
# Generalised Jensen-Shannon divergence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_check_grads_at_every_beta(beta):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 6)) * 2, rng.normal(size=(3, 6)) * 2
    fn = jax.jit(lambda a, b: JSD(a, b, beta=beta, temperature=0.8))
    jax.test_util.check_grads(fn, (a, b), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_jsd_ends_and_bounds():
    """beta = 0 and 1 are the forward and reverse KL; beta = 1/2 is at most log 2, 0 for
    equal inputs; a row the teacher rules out everywhere but one class stays finite."""
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(5, 9)) * 3, rng.normal(size=(5, 9)) * 3
    assert_close(JSD(s, t, beta=0.0, temperature=2.0), DISTILL(s, t, temperature=2.0) / 4)
    assert_close(JSD(s, t, beta=1.0), DISTILL(t, s))
    half = np.asarray(JSD(s, t))
    assert np.all(half >= 0) and np.all(half <= np.log(2))
    assert_close(JSD(s, s, beta=0.3), np.zeros(5), atol=1e-15)
    t[0, 1:] = -np.inf
    out, grads = jax.value_and_grad(lambda s, t: jnp.sum(JSD(s, t)), (0, 1))(s, t)
    assert np.isfinite(out)
    assert_no_nan(*grads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_low_precision(dtype, beta):
    """x64 off, float32/bfloat16 inputs: within a tolerance derived from float32's epsilon
    and the class count of the float64 reference of the same (rounded) inputs."""
    rng = np.random.default_rng(5)
    k = 300
    s = np.asarray(jnp.asarray(rng.normal(size=(8, k)) * 3, dtype), np.float64)
    t = np.asarray(jnp.asarray(rng.normal(size=(8, k)) * 3, dtype), np.float64)
    r = ref.softmax_jensen_shannon_divergence(
        s, t, beta=beta, temperature=1.5, cotangent=np.ones(8)
    )
    with x64_off():
        fn = lambda s, t: JSD(s, t, beta=beta, temperature=1.5)  # noqa: E731
        out, grads = jax.jit(
            lambda s, t: (fn(s, t), jax.grad(lambda s, t: jnp.sum(fn(s, t)), (0, 1))(s, t))
        )(jnp.asarray(s, dtype), jnp.asarray(t, dtype))
    assert out.dtype == jnp.float32
    # Each term is a probability times a log-ratio of logits up to ~|z| / T + log k.
    cond = 2 * (np.max(np.abs(s)) + np.max(np.abs(t))) / 1.5 + np.log(k)
    tol = float_tolerance(jnp.float32, k, cond)
    np.testing.assert_allclose(np.asarray(out, np.float64), r.loss, rtol=tol, atol=tol)
    # Gradients come back in the inputs' dtype: one more rounding, half an ulp of it.
    rounding = float(jnp.finfo(dtype).eps) / 2 if dtype != jnp.float32 else 0.0
    for g, want in zip(grads, r.grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(g.astype(jnp.float32), np.float64), want, rtol=rounding, atol=tol
        )
