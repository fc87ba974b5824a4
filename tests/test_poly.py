"""Tests for jxent.poly_loss_cross_entropy (Poly-1, Leng et al. 2022).

Values and gradients against the float64 reference in ``reference_divergence.py`` and
parity with optax.
"""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
import reference_divergence as ref
from checks import assert_close, large_residuals
from hypothesis import given, settings
from hypothesis import strategies as st
from test_divergence import layouts, make_where

import jxent

POLY = jxent.poly_loss_cross_entropy


@st.composite
def cases(draw):
    shape, axis = draw(layouts())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=shape) * draw(st.sampled_from([0.5, 3.0]))
    t = rng.random(shape)
    if draw(st.booleans()):
        t = (t == t.max(axis=ref.class_axes(len(shape), axis), keepdims=True)).astype(float)
    if draw(st.booleans()):
        # -inf logits only where the target is 0 (a target there would make the loss +inf)
        x[(rng.random(shape) < 0.3) & (t == 0)] = -np.inf
    kinds = ["none", "class", "class_bcast"] + ([] if axis is None else ["row"])
    where = make_where(draw(st.sampled_from(kinds)), rng, shape, axis)
    eps = draw(st.sampled_from([2.0, -1.0, 0.0, 0.5]))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    return x, t, axis, where, eps, reduction, rng


def _check(case, transform):
    x, t, axis, where, eps, reduction, rng = case
    bshape = ref.batch_shape(x.shape, axis)
    cot = rng.normal(size=bshape) if reduction == "none" else 1.3
    r = ref.poly_loss_cross_entropy(x, t, eps, axis, where, reduction=reduction, cotangent=cot)

    def objective(x, t, w):
        out = POLY(x, t, eps, axis, w, reduction=reduction)
        return jnp.sum(out * jnp.asarray(cot)), out

    def run(x, t, w):
        (_, out), g = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(x, t, w)
        return POLY(x, t, eps, axis, w, reduction=reduction), out, g

    w = None if where is None else jnp.asarray(where)
    out, out_ad, (gx, gt) = transform(run)(jnp.asarray(x), jnp.asarray(t), w)
    assert out.dtype == jnp.float64 and out.shape == np.shape(r.loss)
    assert_close(out, r.loss)
    assert_close(out_ad, r.loss)
    assert_close(gx, r.grads[0])
    assert_close(gt, r.grads[1])


@settings(max_examples=25)
@given(case=cases())
def test_matches_reference(case):
    _check(case, jax.jit)


def test_eager_matches_reference():
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(3, 5)), rng.random((3, 5))
    x[0, 1] = -np.inf
    t[0, 1] = 0.0
    _check((x, t, -1, rng.random((3, 5)) < 0.8, 2.0, "mean", rng), lambda f: f)


def test_check_grads():
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(3, 4)), rng.random((3, 4))
    f = jax.jit(lambda x, t: POLY(x, t, 1.5))
    jax.test_util.check_grads(f, (x, t), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("where", [None, "class"])
@pytest.mark.parametrize("epsilon", [2.0, -1.0])
def test_matches_optax(dtype, where, epsilon):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 6)) * 2, dtype)
    t = jnp.asarray(np.eye(6)[rng.integers(0, 6, size=4)] * 0.9 + 0.1 / 6, dtype)
    w = None if where is None else jnp.asarray(rng.random((4, 6)) < 0.8).at[:, 0].set(True)

    @jax.jit
    def both(x, t, w):
        with jax.numpy_dtype_promotion("standard"):
            f = lambda x, t: optax.losses.poly_loss_cross_entropy(x, t, epsilon=epsilon, where=w)
            theirs = (f(x, t), jax.grad(lambda x, t: jnp.sum(f(x, t)), (0, 1))(x, t))
        g = lambda x, t: POLY(x, t, epsilon, -1, w)
        ours = (g(x, t), jax.grad(lambda x, t: jnp.sum(g(x, t)), (0, 1))(x, t))
        return ours, theirs

    ours, theirs = both(x, t, w)
    tol = {"rtol": 2e-6, "atol": 2e-6} if dtype == jnp.float32 else {}
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        # optax's label gradient is NaN on classes dropped by `where`; ours is 0 there.
        assert not np.any(np.isnan(np.asarray(a)))
        ok = ~np.isnan(np.asarray(b))
        assert_close(np.asarray(a)[ok], np.asarray(b)[ok], **tol)


def test_epsilon_traced_and_differentiable():
    rng = np.random.default_rng(3)
    x, t = jnp.asarray(rng.normal(size=(5, 4))), jnp.asarray(rng.random((5, 4)))
    f = jax.jit(lambda eps: POLY(x, t, eps, reduction="sum"))
    g = jax.grad(f)(2.0)
    p = jax.nn.softmax(x)
    assert_close(g, jnp.sum(t * (1 - p)))
    assert_close(f(0.0), jxent.softmax_cross_entropy(x, t, reduction="sum"))


def test_neg_inf_and_masked_rows(jit_mode):
    x = jnp.array([[1.0, -jnp.inf, 0.5], [-jnp.inf] * 3, [0.2, 0.1, 0.3]])
    t = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    w = jnp.array([True, True, False])
    out, (gx, gt) = jit_mode(
        jax.value_and_grad(lambda x, t: POLY(x, t, 2.0, -1, w, reduction="mean"), (0, 1))
    )(x, t)
    per = POLY(x, t, 2.0, -1, w)
    p0 = np.exp(1.0) / (np.exp(1.0) + np.exp(0.5))
    assert_close(per, [-np.log(p0) + 2.0 * (1 - p0), 0.0, 0.0])
    assert_close(out, per.sum() / 2)  # the row dropped by where does not count
    assert np.all(np.isfinite(np.asarray(gx))) and np.all(np.isfinite(np.asarray(gt)))
    assert_close(gx[1:], 0.0)
    assert_close(gx[0, 1], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    rng = np.random.default_rng(4)
    x, t = rng.normal(size=(8, 40)) * 2, rng.random((8, 40))
    xj, tj = jnp.asarray(x, dtype), jnp.asarray(t, dtype)
    xq, tq = np.asarray(xj, np.float64), np.asarray(tj, np.float64)
    out = jax.jit(lambda x, t: POLY(x, t))(xj, tj)
    gx, gt = jax.jit(jax.grad(lambda x, t: POLY(x, t, reduction="sum"), (0, 1)))(xj, tj)
    r = ref.poly_loss_cross_entropy(xq, tq)
    assert out.dtype == jnp.float32 and gx.dtype == dtype and gt.dtype == dtype
    assert_close(out, r.loss, rtol=1e-6, atol=1e-6)
    tol = 5e-2 if dtype == jnp.bfloat16 else 5e-3
    assert_close(gx, r.grads[0], rtol=tol, atol=tol)


MEM_N, MEM_K = 256, 2048
F32_BUFFER = MEM_N * MEM_K * 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_temp_memory(dtype):
    s = jax.ShapeDtypeStruct((MEM_N, MEM_K), dtype)
    fn = lambda x, t: POLY(x, t, reduction="mean")
    compiled = jax.jit(jax.value_and_grad(fn)).lower(s, s).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < F32_BUFFER // 8


def test_no_full_size_residuals():
    x = jnp.zeros((16, 24), jnp.bfloat16)
    offenders = large_residuals(lambda x, t: POLY(x, t, reduction="mean"), x, x)
    assert not offenders, offenders


_X = jnp.zeros((4, 5), jnp.float32)


@pytest.mark.parametrize(
    "args, kwargs, exc, word",
    [
        ((jnp.zeros((4, 5), jnp.int32), _X), {}, TypeError, "logits"),
        ((_X, jnp.zeros((4, 5), jnp.int32)), {}, TypeError, "labels"),
        ((_X, jnp.zeros((4, 2))), {}, ValueError, "labels"),  # (4, 1) broadcasts, as in optax
        ((_X[:, :0], _X[:, :0]), {}, ValueError, "logits"),
        ((_X, _X), {"epsilon": jnp.ones(5)}, ValueError, "epsilon"),
        ((_X, _X), {"epsilon": 1j}, TypeError, "epsilon"),
        ((_X, _X), {"where": jnp.ones(3, bool)}, ValueError, "where"),
        ((_X, _X), {"reduction": "avg"}, ValueError, "reduction"),
        ((_X, _X), {"axis": 5}, ValueError, "axis"),
    ],
)
def test_bad_inputs_raise(args, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        POLY(*args, **kwargs)
