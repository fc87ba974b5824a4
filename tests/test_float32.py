"""The precision users train in: float32 and bfloat16 inputs with x64 off.

Every categorical and divergence loss is checked, value and gradient, against the float64
NumPy references (``reference.py``, ``reference_divergence.py``), evaluated on the very
values the low-precision inputs hold. The suite runs with x64 on (for its float64 checks);
here ``checks.x64_off()`` turns it off, as in a user's training job.

Tolerances are not tuned: ``checks.float_tolerance(float32, K)`` is ``8 eps log2(K)``, the
bound of an accurate sum of ``K`` terms with a few roundings around it. Losses are
accumulated in float32 whatever the input dtype, so their tolerance is float32's; gradients
come back in the input's dtype and may add one rounding of that dtype. Each tolerance is
relative to the scale the computation actually works at (its condition): for a loss that
is a sum of non-negative terms that is the loss itself (plus 1 nat for the ``log`` of a sum
near 1); for a difference of terms (a KL divergence, the poly-1 term) the terms' size; for
a gradient ``scale * softmax - c`` the size of ``scale`` and ``c``.

Inputs cover the cases the float64 suite cannot see: logits offset by up to 1e4 (where a
formula like ``max * sum(w) - x @ w`` or ``exp(z - lse)`` loses digits), spreads up to 1e4,
long rows (where a sequential sum's error grows with the row length), and classes masked by
``where`` that hold ``+inf``, ``-inf``, NaN or a huge finite number (which must not leak).
"""

from __future__ import annotations

import functools

import checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import reference_divergence as ref_div
from hypothesis import given
from hypothesis import strategies as st

import jxent

F32 = np.float32
EPS32 = float(np.finfo(np.float32).eps)
OFFSETS = (0.0, 1e2, 1e3, 1e4)
SPREADS = (1.0, 10.0, 1e2, 1e4)
MASK_FILLS = (None, np.inf, -np.inf, np.nan, 1e30)
DTYPES = ("float32", "bfloat16")


class Case:
    """Logits ``[n, k]`` in a low-precision dtype, their float64 values, and a class mask."""

    def __init__(self, dtype, n, k, offset, spread, fill, seed):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.dtype = jnp.dtype(dtype)
        self.n, self.k = n, k
        x = offset + spread * rng.uniform(-0.5, 0.5, (n, k))
        self.where = None
        if fill is not None:
            # At least one class per row stays in.
            where = rng.random((n, k)) < 0.7
            where[np.arange(n), rng.integers(0, k, n)] = True
            x = np.where(where, x, fill)
            self.where = where
        with checks.x64_off():
            self.x = jnp.asarray(x, self.dtype)
        self.x64 = np.asarray(self.x.astype(jnp.float32), np.float64)

    def unmasked(self):
        return np.ones((self.n, self.k), bool) if self.where is None else self.where

    def random_label(self):
        """One unmasked class per row."""
        on = self.unmasked()
        return np.array([self.rng.choice(np.flatnonzero(r)) for r in on])

    def random_targets(self):
        """A distribution per row over the unmasked classes, some of them zero."""
        t = self.rng.random((self.n, self.k)) * (self.rng.random((self.n, self.k)) < 0.6)
        t = np.where(self.unmasked(), t, 0.0)
        t[np.arange(self.n), self.random_label()] += 0.5
        return (t / t.sum(-1, keepdims=True)).astype(F32)


@st.composite
def cases(draw, max_k=48):
    return Case(
        draw(st.sampled_from(DTYPES)),
        draw(st.integers(1, 4)),
        draw(st.integers(2, max_k)),
        draw(st.sampled_from(OFFSETS)),
        draw(st.sampled_from(SPREADS)),
        draw(st.sampled_from(MASK_FILLS)),
        draw(st.integers(0, 2**32 - 1)),
    )


def _value_and_grad(fn, *args):
    """Per-row loss and the gradient of its sum w.r.t. the first argument, x64 off, jitted."""
    with checks.x64_off():
        per_row = jax.jit(fn)(*args)
        grad = jax.jit(jax.grad(lambda a, *r: jnp.sum(fn(a, *r))))(*args)
    assert per_row.dtype == jnp.float32, per_row.dtype
    assert grad.dtype == args[0].dtype, (grad.dtype, args[0].dtype)
    return np.asarray(per_row, np.float64), np.asarray(grad.astype(jnp.float32), np.float64)


def _check(case, per_row, grad, want_rows, want_grad, loss_scale, grad_scale, rounded=None):
    """Per-row loss within ``tol * loss_scale``, each gradient element within
    ``tol * grad_scale`` of its row, plus one rounding to the gradient's own dtype of each
    of the ``rounded`` parts it is the sum of (by default the gradient itself)."""
    tol = checks.float_tolerance(jnp.float32, case.k)
    out_eps = float(jnp.finfo(case.dtype).eps)
    assert np.all(np.isfinite(per_row)), per_row
    assert np.all(np.isfinite(grad)), grad
    err = np.abs(per_row - want_rows)
    assert np.all(err <= tol * loss_scale), (err / loss_scale, tol)
    g_err = np.abs(grad - want_grad)
    rounded = np.abs(want_grad) if rounded is None else rounded
    bound = tol * grad_scale[:, None] + out_eps * rounded
    assert np.all(g_err <= bound), (np.max(g_err / bound), tol)
    if case.where is not None:
        # A masked class gets exactly zero gradient, whatever it holds.
        assert np.all(grad[~case.where] == 0)


def _lse64(z, on):
    z = np.where(on, z, -np.inf)
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


# --------------------------------------------------------------------------------------------
# Cross-entropy with integer labels and with dense targets
# --------------------------------------------------------------------------------------------


def _int_label_case(case, label_smoothing, z_loss, weighted, soft_cap):
    labels = case.random_label()
    cw = case.rng.uniform(0.5, 2.0, case.k).astype(F32) if weighted else None
    kwargs = dict(label_smoothing=label_smoothing, z_loss=z_loss, logit_soft_cap=soft_cap)
    fn = functools.partial(
        jxent.softmax_cross_entropy_with_integer_labels, where=case.where, **kwargs
    )
    with checks.x64_off():
        args = (case.x, jnp.asarray(labels, jnp.int32))
        if cw is not None:
            fn = functools.partial(fn, class_weights=jnp.asarray(cw))
    per_row, grad = _value_and_grad(fn, *args)
    want = ref.softmax_cross_entropy_with_integer_labels(
        case.x64, labels, where=case.where, class_weights=cw, **kwargs
    )
    w = np.ones(case.k) if cw is None else cw.astype(np.float64)
    on = case.unmasked()
    z = case.x64 if soft_cap is None else soft_cap * np.tanh(case.x64 / soft_cap)
    lse = _lse64(z, on)
    mean_w = (w * on).sum(-1) / on.sum(-1)
    big_c = (1 - label_smoothing) * w[labels] + label_smoothing * mean_w
    scale = big_c + 2 * z_loss * np.abs(lse)
    # Non-negative terms; log of a sum near 1 is exact to eps absolute, times C.
    loss_scale = np.abs(want.per_row) + scale
    _check(case, per_row, grad, want.per_row, want.grad_logits, loss_scale, big_c + scale)


@given(
    case=cases(),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-4]),
    weighted=st.booleans(),
    soft_cap=st.sampled_from([None, 30.0]),
)
def test_integer_labels(case, label_smoothing, z_loss, weighted, soft_cap):
    _int_label_case(case, label_smoothing, z_loss, weighted, soft_cap)


def _dense_case(case, label_smoothing, z_loss):
    t = case.random_targets()
    fn = functools.partial(
        jxent.softmax_cross_entropy,
        where=case.where,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    with checks.x64_off():
        t_j = jnp.asarray(t)
    per_row, grad = _value_and_grad(lambda x: fn(x, t_j), case.x)
    want = ref.softmax_cross_entropy(
        case.x64, t, where=case.where, label_smoothing=label_smoothing, z_loss=z_loss
    )
    lse = _lse64(case.x64, case.unmasked())
    big_c = np.ones(case.n)
    scale = big_c + 2 * z_loss * np.abs(lse)
    _check(
        case, per_row, grad, want.per_row, want.grad_logits, np.abs(want.per_row) + scale, 1 + scale
    )


@given(case=cases(), label_smoothing=st.sampled_from([0.0, 0.1]), z_loss=st.sampled_from([0, 1e-4]))
def test_dense_targets(case, label_smoothing, z_loss):
    _dense_case(case, label_smoothing, z_loss)


# --------------------------------------------------------------------------------------------
# Poly-1, entropy, distillation, KL
# --------------------------------------------------------------------------------------------


def _poly_case(case, epsilon):
    t = case.random_targets()
    with checks.x64_off():
        t_j = jnp.asarray(t)
    fn = lambda x: jxent.poly_loss_cross_entropy(x, t_j, epsilon, -1, case.where)  # noqa: E731
    per_row, grad = _value_and_grad(fn, case.x)
    want = ref_div.poly_loss_cross_entropy(case.x64, t, epsilon, where=case.where)
    # CE (non-negative terms) plus epsilon * (sum t - sum t p): a difference of terms <= 1.
    scale = np.abs(want.per_row) + 1 + 2 * abs(epsilon)
    # Gradient C p - c + epsilon p (sum t p - t): parts of size at most 1 and |epsilon|.
    grad_scale = np.full(case.n, 2 + 2 * abs(epsilon))
    # The cross-entropy and the poly-1 term are two rules, each returning its gradient in
    # the input's dtype: their sum adds the rounding of both (for epsilon = -1 they cancel
    # to second order in 1 - p on confident rows).
    ce_grad = ref.softmax_cross_entropy(case.x64, t, where=case.where).grad_logits
    rounded = np.abs(ce_grad) + np.abs(want.grads[0] - ce_grad)
    _check(case, per_row, grad, want.per_row, want.grads[0], scale, grad_scale, rounded)


@given(case=cases(), epsilon=st.sampled_from([2.0, -1.0]))
def test_poly_loss(case, epsilon):
    _poly_case(case, epsilon)


def _entropy_case(case):
    per_row, grad = _value_and_grad(lambda x: jxent.entropy(x, where=case.where), case.x)
    want = ref_div.entropy(case.x64, where=case.where)
    h = np.abs(want.per_row)
    # H = log S + sum p (max - z): non-negative terms; the gradient p (-log p - H) works
    # with numbers of size 1 + H.
    _check(case, per_row, grad, want.per_row, want.grads[0], h + 1, 1 + 2 * h)


@given(case=cases())
def test_entropy(case):
    _entropy_case(case)


def _distill_case(case, temperature):
    # The teacher: the student's logits perturbed, so that the divergence is small and its
    # cancellation is exercised; masked classes are masked for both.
    on = case.unmasked()
    x_on = np.where(on, case.x64, 0.0)
    noise = case.rng.normal(size=x_on.shape) * np.maximum(np.abs(x_on), 1) * 0.05
    teacher = np.where(on, x_on + noise, case.x64)
    with checks.x64_off():
        t_j = jnp.asarray(teacher, case.dtype)
    t64 = np.asarray(t_j.astype(jnp.float32), np.float64)
    fn = lambda s: jxent.softmax_kl_divergence(  # noqa: E731
        s, t_j, temperature=temperature, where=case.where
    )
    per_row, grad = _value_and_grad(fn, case.x)
    want = ref_div.softmax_kl_divergence(case.x64, t64, temperature=temperature, where=case.where)
    # KL = sum_k p_k (a_k - b_k) + (log S_s - log S_t) with a, b the shifted logits / T:
    # the size of those terms is the computation's scale.
    zs, zt = case.x64 / temperature, t64 / temperature
    ms = np.where(on, zs, -np.inf).max(-1, keepdims=True)
    mt = np.where(on, zt, -np.inf).max(-1, keepdims=True)
    p = np.where(on, np.exp(np.where(on, zt, 0) - mt), 0)
    p /= p.sum(-1, keepdims=True)
    gap = np.where(on, np.abs((np.where(on, zt, 0) - mt) - (np.where(on, zs, 0) - ms)), 0)
    terms = (p * gap).sum(-1) + (_lse64(zs, on) - ms[:, 0]) + (_lse64(zt, on) - mt[:, 0])
    scale = temperature**2 * (terms + 1)
    # The student gradient T (q - p).
    grad_scale = np.full(case.n, 2 * temperature)
    _check(case, per_row, grad, want.per_row, want.grads[0], scale, grad_scale)


@given(case=cases(), temperature=st.sampled_from([1.0, 2.0]))
def test_softmax_kl_divergence(case, temperature):
    _distill_case(case, temperature)


@given(case=cases(), log_targets=st.booleans())
def test_kl_divergence(case, log_targets):
    # Log-predictions: a normalised log-softmax of the case's logits, held in the low dtype.
    on = case.unmasked()
    lp = np.where(on, case.x64 - _lse64(case.x64, on)[:, None], case.x64)
    t = case.random_targets().astype(np.float64)
    with checks.x64_off(), np.errstate(divide="ignore"):
        lp_j = jnp.asarray(lp, case.dtype)
        t_j = jnp.asarray(np.log(t) if log_targets else t, case.dtype)
    lp64 = np.asarray(lp_j.astype(jnp.float32), np.float64)
    t64 = np.asarray(t_j.astype(jnp.float32), np.float64)
    if log_targets:
        fn = jxent.kl_divergence_with_log_targets
        want = ref_div.kl_divergence_with_log_targets(lp64, t64, where=case.where)
        t_prob = np.exp(t64)
    else:
        fn = jxent.kl_divergence
        want = ref_div.kl_divergence(lp64, t64, where=case.where)
        t_prob = t64
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(on & (t_prob > 0), t_prob * (np.abs(np.log(t_prob)) + np.abs(lp64)), 0)
    per_row, grad = _value_and_grad(lambda a: fn(a, t_j, where=case.where), lp_j)
    _check(case, per_row, grad, want.per_row, want.grads[0], mag.sum(-1) + 1, np.ones(case.n))


# --------------------------------------------------------------------------------------------
# Long rows: every reduction over classes keeps its error near log2(K) eps
# --------------------------------------------------------------------------------------------

LONG = [4096, 50257, 131072]


@pytest.mark.parametrize("k", LONG)
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows(k, dtype):
    case = Case(dtype, 4, k, offset=1e2, spread=8.0, fill=None, seed=k)
    _int_label_case(case, 0.1, 1e-4, weighted=True, soft_cap=None)
    _dense_case(case, 0.1, 0.0)
    _poly_case(case, 2.0)
    _entropy_case(case)
    _distill_case(case, 1.0)


@pytest.mark.parametrize("fill", [np.inf, np.nan, 1e30, -np.inf])
def test_long_rows_masked(fill):
    case = Case("float32", 3, 40000, offset=1e3, spread=8.0, fill=fill, seed=7)
    _int_label_case(case, 0.1, 0.0, weighted=False, soft_cap=None)
    _dense_case(case, 0.0, 0.0)
    _entropy_case(case)


def test_soft_cap_of_positive_infinity():
    # c tanh(+inf / c) = c: a +inf logit is the class the cap sends to c, not NaN.
    with checks.x64_off():
        x = jnp.array([[1.0, jnp.inf, 0.0]], jnp.float32)
        loss, grad = jax.value_and_grad(
            lambda x: jxent.softmax_cross_entropy_with_integer_labels(
                x, jnp.array([0]), logit_soft_cap=5.0
            ).sum()
        )(x)
    z = np.array([5 * np.tanh(0.2), 5.0, 0.0])
    want = ref.softmax_cross_entropy_with_integer_labels(
        z[None], np.array([0])
    )  # the capped logits, uncapped
    checks.assert_close(loss, want.per_row.sum(), rtol=checks.float_tolerance(jnp.float32, 3))
    g = np.asarray(grad)
    assert np.all(np.isfinite(g)) and g[0, 1] == 0  # tanh' = 0 at +inf


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_class_weights_are_constants(reduction):
    # Documented: no gradient flows to class_weights, in every reduction (the mean's
    # denominator included), rather than a partial derivative.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 4)))
    y = jnp.array([0, 1, 2, 3, 1])
    cw = jnp.asarray(rng.uniform(0.5, 2.0, 4))
    for smoothing in (0.0, 0.2):
        loss = functools.partial(
            jxent.softmax_cross_entropy_with_integer_labels,
            x,
            y,
            label_smoothing=smoothing,
            reduction=reduction,
        )
        g = jax.grad(lambda c, loss=loss: jnp.sum(loss(class_weights=c)))(cw)
        assert np.all(np.asarray(g) == 0), g
