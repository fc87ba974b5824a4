"""Drop-in compatibility with ``optax.losses`` (issue 11): optax's own cases, through both.

Every case below is a test case or docstring example of optax 0.2.8
(``optax/losses/_classification_test.py``, ``_smoothing_test.py``, the docstrings of
``optax.losses``, and the uses of these losses in ``optax/_src/alias_test.py`` and
``optax/losses/_fenchel_young_test.py``), with the same inputs (positional and keyword
arguments, numpy and jax arrays, float32 and float64, ``axis``/``where``), plus the kinds
of input those tests do not spell out but optax accepts: integer labels of every integer
dtype, labels that broadcast, half-precision inputs and edge values. Each case is one
function of the loss; it is run with optax's function and with jxent's function of the
same name, and the results must agree:

* the same shape;
* the same dtype, except the deliberate deviation that a bfloat16/float16 input gives a
  float32 loss in jxent (optax keeps the half dtype);
* the same values, to the tolerance of the result's dtype (float64: ``checks.F64``).

optax is computed under standard dtype promotion and rank promotion allowed (JAX's
defaults: optax is not strict-promotion clean, and an optax user may rely on implicit rank
promotion); jxent runs under this suite's strict settings (tests/conftest.py).

Inputs optax accepts that jxent deliberately refuses are in ``REFUSED``: jxent must raise
a clear error naming the argument. Deliberate differences of value (jxent is finite where
optax gives NaN) are in ``test_safer_than_optax``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import checks
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest

import jxent

SHARED = (
    "softmax_cross_entropy",
    "safe_softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "smooth_labels",
    "poly_loss_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
)
HALF = (jnp.bfloat16, jnp.float16)


@contextlib.contextmanager
def optax_defaults():
    """JAX's default promotion rules, under which optax's tests run."""
    with checks.standard_promotion(), jax.numpy_rank_promotion("allow"):
        yield


class Case(NamedTuple):
    id: str
    run: Callable  # run(loss_fn) -> an array or a tuple of arrays
    # Mixed precision: optax rounds its intermediates to the narrowest input's dtype (its
    # float32 log_softmax of float32 logits times float64 labels), so both results are
    # only as accurate as that dtype, whatever the result's dtype.
    narrowest: Any = None


def _tolerance(dtype) -> dict:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return dict(checks.F64)
    if dtype == jnp.float32:
        return {"rtol": 2e-6, "atol": 2e-6}
    return {"rtol": 1e-2, "atol": 1e-2}  # half precision: optax rounds the loss to it


def _expected_dtype(optax_dtype, loss: bool):
    if loss and optax_dtype in HALF:
        return jnp.dtype(jnp.float32)  # the deliberate deviation: half inputs, float32 loss
    return jnp.dtype(optax_dtype)


def compare(name: str, case: Case, loss: bool = True) -> None:
    with optax_defaults():
        want = case.run(getattr(optax.losses, name))
    got = case.run(getattr(jxent, name))
    want_leaves, want_tree = jax.tree.flatten(want)
    got_leaves, got_tree = jax.tree.flatten(got)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves, strict=True):
        g, w = jnp.asarray(g), jnp.asarray(w)
        assert g.shape == w.shape, (g.shape, w.shape)
        assert g.dtype == _expected_dtype(w.dtype, loss), (g.dtype, w.dtype)
        tol = _tolerance(w.dtype if case.narrowest is None else case.narrowest)
        if w.dtype in HALF:
            w = w.astype(jnp.float32)  # optax's rounding: compare to it, not to its error
        checks.assert_close(g, w, **tol)


# --------------------------------------------------------------------------------------------
# optax's test data (setUp of each optax test class), with fixed seeds for the random ones
# --------------------------------------------------------------------------------------------

YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], dtype=np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
INT_TS = np.array([1, 0], dtype=np.int32)
ROW_MASK = np.array([True, False])
PER_LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]]).astype(bool)

SAFE_YS = np.array(
    [
        [10.0, 1.0, -2.0],
        [1.0, 4.0, 0.2],
        [-np.inf, 0.0, 0.0],
        [-np.inf, 0.0, 0.0],
        [-np.inf, 0.0, -np.inf],
    ],
    dtype=np.float32,
)
SAFE_TS = np.array(
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.4, 0.3, 0.3], [0.0, 1.0, 0.0]],
    dtype=np.float32,
)

DOC_LOGITS = np.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])  # jnp.array in the docstrings
DOC_LABELS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

POLY_LOGITS = np.array([0.14, 1.456, 2.356, -0.124, -2.47])
POLY_LABELS = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
POLY_BLOGITS = np.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]])
POLY_BLABELS = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]])
POLY_EPS0 = [
    (
        np.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.134, 1.234, 3.235]]),
        np.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2], [0.34, 0.33, 0.33]]),
    ),
    (POLY_BLOGITS, POLY_BLABELS),
    (
        np.array([[4.0, 2.0, 1.0, 0.134, 1.3515], [0.0, 5.0, 1.0, 0.5215, 5.616]]),
        np.array([[0.5, 0.0, 0.0, 0.0, 0.5], [0.0, 0.12, 0.2, 0.56, 0.12]]),
    ),
    (np.array([1.89, 2.39]), np.array([0.34, 0.66])),
    (np.array([0.314]), np.array([1.0])),
]

KL_LOG_PS = np.array(
    [
        [-2.9957, -3.5066, -3.9120, -1.2040, -0.6931, -2.3026],
        [-1.6094, -1.6094, -1.6094, -2.3026, -1.8971, -1.8971],
    ]
)
KL_QS = np.array([[0.2, 0.2, 0.2, 0.1, 0.15, 0.15], [0.05, 0.03, 0.02, 0.3, 0.5, 0.0]])
KL_LOG_QS = np.array(
    [
        [-1.6094, -1.6094, -1.6094, -2.3026, -1.8971, -1.8971],
        [-2.9957, -3.5066, -3.9120, -1.2040, -0.6931, -2.3026],
    ]
)

FOCAL_YS = np.array([[2.0, 0.1, -2.0], [0.3, -0.1, 1.2]], dtype=np.float32)
FOCAL_TS = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # float64: optax casts to the logits'


def _logit(p):
    return np.log(p / (1.0 - p))


FOCAL_LARGE = _logit(np.array([0.9, 0.98, 0.3, 0.99]))
FOCAL_SMALL = _logit(np.array([0.1, 0.02, 0.09, 0.15]))
FOCAL_ONES = np.ones(4)

SIGMOID_CASES = [  # SigmoidCrossEntropyTest: (preds, labels); the test takes the mean
    ([-1e09, -1e-09], [1.0, 0.0]),
    ([-1e09, -1e-09], [0.0, 1.0]),
    ([1e09, 1e-09], [1.0, 0.0]),
    ([1e09, 1e-09], [0.0, 1.0]),
    ([-1e09, 1e-09], [1.0, 0.0]),
    ([-1e09, 1e-09], [0.0, 1.0]),
    ([1e09, -1e-09], [1.0, 0.0]),
    ([1e09, -1e-09], [0.0, 1.0]),
    ([0.0, 0.0], [1.0, 0.0]),
    ([0.0, 0.0], [0.0, 1.0]),
]


def _rng(seed):
    return np.random.default_rng(seed)


def _mask_data(size, log_targets=False):
    """test_mask of optax: 1-D predictions, Dirichlet targets, a random boolean mask."""
    r = _rng(size)
    preds = r.normal(size=size)
    targets = r.dirichlet(np.ones(size))
    mask = r.integers(2, size=size).astype(bool)
    mask[0] = True  # optax draws it at random; keep at least one class
    return preds, np.log(targets) if log_targets else targets, mask


def _axis_data(axis, log_targets=False):
    """test_axis of optax: [4, 5, 6] predictions, targets drawn along the last axis."""
    shape = [4, 5, 6]
    r = _rng(10 + axis)
    preds = r.normal(size=shape)
    targets = r.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    return preds, np.log(targets) if log_targets else targets


def _sum_grad(f, *args, argnums=0, **kwargs):
    """Gradient of the summed loss, as optax's test_gradient takes it."""
    return jax.grad(lambda *a: jnp.sum(f(*a, **kwargs)), argnums=argnums)(*args)


def _mask_cases(prefix=""):
    """test_mask: f(preds[mask], targets[mask]) and f(preds, targets, where=mask)."""
    out = []
    for size in (5, 10):
        for log_targets in (False, True):
            p, t, m = _mask_data(size, log_targets)
            tag = f"{prefix}mask{size}" + ("-log" if log_targets else "")
            out.append(Case(f"{tag}-subset", lambda f, p=p, t=t, m=m: f(p[m], t[m])))
            out.append(Case(f"{tag}-where", lambda f, p=p, t=t, m=m: f(p, t, where=m)))
    return out


def _axis_cases(log_targets=False):
    """test_axis: f(preds, targets, axis=axis) and the same with the axis moved last."""
    out = []
    for axis in (0, 1, 2):
        p, t = _axis_data(axis, log_targets)
        out.append(Case(f"axis{axis}", lambda f, p=p, t=t, a=axis: f(p, t, axis=a)))
        out.append(
            Case(
                f"axis{axis}-moved",
                lambda f, p=p, t=t, a=axis: f(np.moveaxis(p, a, -1), np.moveaxis(t, a, -1)),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# softmax_cross_entropy
# --------------------------------------------------------------------------------------------

DENSE_CASES = [
    # SoftmaxCrossEntropyTest
    Case("scalar-jit", lambda f: jax.jit(f)(YS[0], TS[0])),
    Case("batched-jit", lambda f: jax.jit(f)(YS, TS)),
    Case("per-logit-mask", lambda f: f(YS, TS, where=PER_LOGIT_MASK)),
    Case("grad-row-mask", lambda f: _sum_grad(f, YS, labels=TS, where=ROW_MASK)),
    Case("grad-both-args", lambda f: _sum_grad(f, YS, TS, argnums=(0, 1))),
    *[c for c in _mask_cases() if "-log" not in c.id],
    *_axis_cases(),
    # the docstring example
    Case("docstring", lambda f: f(jnp.asarray(DOC_LOGITS), jnp.asarray(DOC_LABELS))),
    # what optax's tests do not spell out
    Case("float64", lambda f: f(YS.astype(np.float64), TS.astype(np.float64))),
    Case("positional-axis-where", lambda f: f(YS, TS, -1, ROW_MASK)),
    Case("where-row-mask", lambda f: f(YS, TS, where=ROW_MASK)),
    Case("axis-tuple", lambda f: f(*_axis_data(0), axis=(1, 2))),
    Case("axis-none", lambda f: f(YS[0], TS[0], axis=None)),
    Case("bfloat16", lambda f: f(YS.astype(jnp.bfloat16), TS.astype(jnp.bfloat16))),
    Case("float16", lambda f: f(YS.astype(jnp.float16), TS.astype(jnp.float16))),
    Case("labels-broadcast-rows", lambda f: f(YS, TS[:1])),
    Case("labels-broadcast-rank", lambda f: f(YS, TS[0])),
    Case("large-logits", lambda f: f(YS * np.float32(1e30), TS)),
    Case("labels-int-one-hot", lambda f: f(YS, TS.astype(np.int32))),
    Case("labels-bool-one-hot", lambda f: f(YS, TS.astype(bool))),
    Case("labels-float64-logits-float32", lambda f: f(YS, TS.astype(np.float64)), np.float32),
    Case("empty-batch", lambda f: f(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))),
]


# --------------------------------------------------------------------------------------------
# safe_softmax_cross_entropy
# --------------------------------------------------------------------------------------------

SAFE_CASES = [
    # SafeSoftmaxCrossEntropyTest (with -inf logits; the row [-inf, 0, 0] with targets
    # [0.4, 0.3, 0.3] is +inf in both)
    Case("scalar-jit", lambda f: jax.jit(f)(SAFE_YS[0], SAFE_TS[0])),
    Case("batched-jit", lambda f: jax.jit(f)(SAFE_YS, SAFE_TS)),
    Case("grad", lambda f: _sum_grad(f, SAFE_YS[:2], SAFE_TS[:2], argnums=(0, 1))),
    Case("value-and-grad", lambda f: jax.value_and_grad(f)(SAFE_YS[0], SAFE_TS[0])),
    Case("grad-neg-inf-rows", lambda f: _sum_grad(f, SAFE_YS[[0, 1, 2, 4]], SAFE_TS[[0, 1, 2, 4]])),
    # what optax's tests do not spell out
    Case("float64", lambda f: f(SAFE_YS.astype(np.float64), SAFE_TS.astype(np.float64))),
    Case("bfloat16", lambda f: f(SAFE_YS.astype(jnp.bfloat16), SAFE_TS.astype(jnp.bfloat16))),
    Case("labels-broadcast-rows", lambda f: f(SAFE_YS[:2], SAFE_TS[:1])),
    Case("labels-broadcast-rank", lambda f: f(SAFE_YS[:2], SAFE_TS[0])),
    Case("labels-int-one-hot", lambda f: f(SAFE_YS[:2], SAFE_TS[:2].astype(np.int32))),
    Case(
        "labels-float64-logits-float32",
        lambda f: f(SAFE_YS, SAFE_TS.astype(np.float64)),
        np.float32,
    ),
    Case("empty-batch", lambda f: f(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))),
]


# --------------------------------------------------------------------------------------------
# softmax_cross_entropy_with_integer_labels
# --------------------------------------------------------------------------------------------


def _axes_case(shape, axis):
    """test_axes of optax: tuple class axes, a label is the flat index into them."""
    ndim = len(shape)
    logits_axis = tuple((x + ndim) % ndim for x in axis)
    labels_axis = tuple(x for x in range(ndim) if x not in logits_axis)
    logits_shape = tuple(shape[x] for x in logits_axis)
    labels_shape = tuple(shape[x] for x in labels_axis)
    num_classes = int(np.prod(logits_shape))
    k1, k2 = jax.random.split(jax.random.key(42))
    logits = jax.random.uniform(k1, (*labels_shape, num_classes))
    labels = jax.random.randint(k2, labels_shape, 0, num_classes - 1)
    perm = labels_axis + logits_axis
    perm_inv = tuple(i for i, _ in sorted(enumerate(perm), key=lambda x: x[1]))
    moved = logits.reshape(labels_shape + logits_shape).transpose(perm_inv)
    return [
        Case(f"axes{axis}-flat", lambda f: f(logits, labels)),
        Case(f"axes{axis}", lambda f: f(moved, labels, axis)),  # axis by position
    ]


def _int_axis_cases():
    out = []
    for axis in (0, 1, 2):
        shape = [4, 5, 6]
        r = _rng(20 + axis)
        preds = r.normal(size=shape)
        targets = r.integers(shape[axis], size=shape[:axis] + shape[axis + 1 :])  # int64
        out.append(Case(f"axis{axis}", lambda f, p=preds, t=targets, a=axis: f(p, t, axis=a)))
        out.append(
            Case(
                f"axis{axis}-moved",
                lambda f, p=preds, t=targets, a=axis: f(np.moveaxis(p, a, -1), t),
            )
        )
    return out


def _fenchel_young_case(f):
    """optax/losses/_fenchel_young_test.py: vmap over rows, labels from jnp.where."""
    k1, k2 = jax.random.split(jax.random.key(0))
    theta_true = jax.random.uniform(k1, (8, 5))
    theta_random = jax.random.uniform(k2, (8, 5))
    one_hot = jax.nn.one_hot(jnp.argmax(theta_true, axis=-1), 5)
    labels = jnp.where(one_hot == 1.0)[1]
    return jax.vmap(f)(theta_random, labels)


def _logreg_case(f):
    """optax/_src/alias_test.py test_multiclass_logreg: numpy int64 labels, float64 inputs."""
    r = _rng(3)
    inputs = r.normal(size=(10, 5))
    labels = r.integers(3, size=10)
    weights = jnp.asarray(r.normal(size=(5, 3)))
    bias = jnp.zeros(3)

    def fun(params):
        w, b = params
        return jnp.mean(f(jnp.dot(inputs, w) + b[None, :], labels))  # rank-explicit bias

    return jax.value_and_grad(fun)((weights, bias))


DOC_SHAPE = (1, 2, 3, 4)
DOC_AXES_LOGITS = jnp.arange(np.prod(DOC_SHAPE), dtype=jnp.float32).reshape(DOC_SHAPE)
DOC_AXES_LABELS = jnp.ravel_multi_index((jnp.array([[1, 2]]), jnp.array([[1, 3]])), DOC_SHAPE[2:])

INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")

SPARSE_CASES = [
    # SoftmaxCrossEntropyWithIntegerLabelsTest
    Case("scalar-jit", lambda f: jax.jit(f)(YS[0], INT_TS[0])),
    Case("batched-jit", lambda f: jax.jit(f)(YS, INT_TS)),
    Case("grad-partial-labels", lambda f: _sum_grad(functools.partial(f, labels=INT_TS), YS)),
    Case("grad-row-mask", lambda f: _sum_grad(f, YS, labels=INT_TS, where=ROW_MASK)),
    Case("per-logit-mask", lambda f: f(YS, INT_TS, where=PER_LOGIT_MASK)),
    *_int_axis_cases(),
    *[
        c
        for shape, axis in [
            ((2, 3, 4, 5), (1, 3)),
            ((2, 3, 4, 5), (3, 2)),
            ((2, 3, 4, 5), (2, 3)),
            ((2, 3, 4, 5), (-3, -1)),
            ((2, 3, 4, 5), (-1, -2)),
            ((2, 3, 4, 5), (-2, -1)),
            ((2, 3, 4, 5), (0, 1, 3)),
            ((2, 3, 4, 5), (-4, -3, -1)),
        ]
        for c in _axes_case(shape, axis)
    ],
    # the docstring examples
    Case("docstring", lambda f: f(jnp.asarray(DOC_LOGITS), jnp.array([0, 1]))),
    Case("docstring-axes", lambda f: f(DOC_AXES_LOGITS, DOC_AXES_LABELS, axis=(2, 3))),
    # the uses in optax's other tests
    Case("fenchel-young-vmap", _fenchel_young_case),
    Case("alias-logreg", _logreg_case),
    # what optax's tests do not spell out
    *[Case(f"labels-{d}", lambda f, d=d: f(YS, INT_TS.astype(d))) for d in INT_DTYPES],
    Case("labels-jnp-int32", lambda f: f(jnp.asarray(YS), jnp.asarray(INT_TS))),
    Case("labels-numpy-scalar", lambda f: f(YS[0], np.int64(2))),
    Case("labels-python-int", lambda f: f(YS[0], 2)),
    Case("float64", lambda f: f(YS.astype(np.float64), INT_TS)),
    Case("bfloat16", lambda f: f(YS.astype(jnp.bfloat16), INT_TS)),
    Case("float16", lambda f: f(YS.astype(jnp.float16), INT_TS)),
    Case("where-row-mask", lambda f: f(YS, INT_TS, where=ROW_MASK)),
    Case("positional-axis-where", lambda f: f(YS, INT_TS, -1, ROW_MASK)),
    Case("neg-inf-logit", lambda f: f(SAFE_YS, np.array([0, 1, 1, 2, 1]))),
    Case("large-logits", lambda f: f(YS * np.float32(1e30), INT_TS)),
    Case("grad-neg-inf-logit", lambda f: _sum_grad(f, SAFE_YS, np.array([0, 1, 1, 2, 1]))),
    Case("labels-out-of-range", lambda f: f(YS, np.array([3, 0]))),  # NaN in both
    Case("empty-batch", lambda f: f(np.zeros((0, 3), np.float32), np.zeros((0,), np.int32))),
]


# --------------------------------------------------------------------------------------------
# smooth_labels
# --------------------------------------------------------------------------------------------

SMOOTH_CASES = [
    # SmoothLabelsTest: alpha 0, 0.1, 1, the function under jit (so alpha is traced)
    *[Case(f"scalar-jit-{a}", lambda f, a=a: jax.jit(f)(TS[0], a)) for a in (0.0, 0.1, 1.0)],
    *[Case(f"batched-jit-{a}", lambda f, a=a: jax.jit(f)(TS, a)) for a in (0.0, 0.1, 1.0)],
    # what optax's tests do not spell out
    Case("eager", lambda f: f(TS, 0.1)),
    Case("float64", lambda f: f(TS.astype(np.float64), 0.1)),
    Case("bfloat16", lambda f: f(TS.astype(jnp.bfloat16), 0.1)),
    Case("alpha-array", lambda f: f(TS, jnp.asarray(0.1, jnp.float32))),
    Case("alpha-per-row", lambda f: f(TS, np.array([[0.1], [0.2]], np.float32))),
    Case("axis0", lambda f: f(TS, 0.1, axis=0)),
    Case("axis-none", lambda f: f(TS, 0.1, axis=None)),
    Case("where", lambda f: f(TS, 0.1, where=np.array([[True, True, False], [True, True, True]]))),
    Case("where-broadcast", lambda f: f(TS, 0.1, where=np.array([True, True, False]))),
    Case("grad-alpha", lambda f: jax.grad(lambda a: jnp.sum(f(TS.astype(np.float64), a)))(0.1)),
    Case("alpha-numpy-float64", lambda f: f(TS, np.float64(0.1))),
    Case("empty-batch", lambda f: f(np.zeros((0, 3), np.float32), 0.1)),
]


# --------------------------------------------------------------------------------------------
# poly_loss_cross_entropy
# --------------------------------------------------------------------------------------------

POLY_EPS = (2, 1, -1, 0, -0.5, 1.15, 1.214, 5.45)  # optax's parameters (ints and floats)

POLY_CASES = [
    # PolyLossTest
    *[
        Case(f"scalar-jit-eps{e}", lambda f, e=e: jax.jit(f)(POLY_LOGITS, POLY_LABELS, epsilon=e))
        for e in POLY_EPS
    ],
    *[
        Case(
            f"batched-jit-eps{e}", lambda f, e=e: jax.jit(f)(POLY_BLOGITS, POLY_BLABELS, epsilon=e)
        )
        for e in POLY_EPS
        if e != -1
    ],
    *[
        Case(f"eps0-{i}", lambda f, x=x, t=t: jax.jit(f)(x, t, epsilon=0.0))
        for i, (x, t) in enumerate(POLY_EPS0)
    ],
    *[c for c in _mask_cases() if "-log" not in c.id],
    *_axis_cases(),
    # what optax's tests do not spell out
    Case("eps-array", lambda f: f(POLY_BLOGITS, POLY_BLABELS, epsilon=jnp.asarray(1.5))),
    Case("eps-traced", lambda f: jax.jit(lambda e: f(POLY_BLOGITS, POLY_BLABELS, epsilon=e))(1.5)),
    Case("grad", lambda f: _sum_grad(f, POLY_BLOGITS, POLY_BLABELS, argnums=(0, 1))),
    Case("float32", lambda f: f(YS, TS)),
    Case("bfloat16", lambda f: f(YS.astype(jnp.bfloat16), TS.astype(jnp.bfloat16))),
    Case("per-logit-mask", lambda f: f(YS, TS, where=np.array([[1, 1, 0], [1, 1, 1]], bool))),
    Case("axis-tuple", lambda f: f(*_axis_data(0), axis=(1, 2))),
    Case("labels-broadcast-rows", lambda f: f(POLY_BLOGITS, POLY_BLABELS[:1])),
    Case("labels-float64-logits-float32", lambda f: f(YS, TS.astype(np.float64)), np.float32),
    Case("empty-batch", lambda f: f(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))),
]


# --------------------------------------------------------------------------------------------
# sigmoid_binary_cross_entropy
# --------------------------------------------------------------------------------------------

BCE_CASES = [
    # SigmoidCrossEntropyTest (the mean of the element-wise loss)
    *[
        Case(f"sigmoid-{i}", lambda f, p=p, t=t: jnp.mean(f(np.array(p), np.array(t))))
        for i, (p, t) in enumerate(SIGMOID_CASES)
    ],
    *[
        Case(f"sigmoid-{i}-elementwise", lambda f, p=p, t=t: f(np.array(p), np.array(t)))
        for i, (p, t) in enumerate(SIGMOID_CASES)
    ],
    # the calls in SigmoidFocalLossTest: float32 logits with float64 labels
    Case("focal-ys", lambda f: f(FOCAL_YS, FOCAL_TS)),
    Case("focal-large", lambda f: f(FOCAL_LARGE, FOCAL_ONES)),
    Case("focal-small", lambda f: f(FOCAL_SMALL, FOCAL_ONES)),
    Case(
        "focal-gamma0-inputs",
        lambda f: f(
            jnp.array([[-1.0, 0.0, 1.0], [2.0, -2.0, 0.5]]),
            jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
        ),
    ),
    # what optax's tests do not spell out
    Case("labels-int", lambda f: f(FOCAL_YS, FOCAL_TS.astype(np.int32))),
    Case("labels-bool", lambda f: f(FOCAL_YS, FOCAL_TS.astype(bool))),
    Case("scalar", lambda f: f(np.float32(0.3), np.float32(1.0))),
    Case("bfloat16", lambda f: f(FOCAL_YS.astype(jnp.bfloat16), FOCAL_TS)),
    Case("grad", lambda f: _sum_grad(f, FOCAL_YS, FOCAL_TS.astype(np.float32), argnums=(0, 1))),
    Case("labels-broadcast-rows", lambda f: f(FOCAL_YS, FOCAL_TS[:1])),
    Case("labels-broadcast-rank", lambda f: f(FOCAL_YS, FOCAL_TS[0])),
    Case("labels-broadcast-scalar", lambda f: f(FOCAL_YS, 1.0)),
]


# --------------------------------------------------------------------------------------------
# sigmoid_focal_loss
# --------------------------------------------------------------------------------------------


def _extreme_case(f):
    """test_extreme_logits_finite_gradients: value, gradient and Hessian at gamma 0.5."""
    x = jnp.array([100.0, -100.0, 75.0, -75.0, 50.0, -50.0])
    t = jnp.array([0.9, 0.1, 0.8, 0.2, 1.0, 0.0])

    def loss(x):
        return jnp.sum(jax.jit(f)(x, t, gamma=0.5))

    return loss(x), jax.grad(loss)(x), jax.hessian(loss)(x)


FOCAL_CASES = [
    # SigmoidFocalLossTest
    Case("gamma0-jit", lambda f: jax.jit(f)(FOCAL_YS, FOCAL_TS, gamma=0.0)),
    Case(
        "gamma0-matches-bce",
        lambda f: jax.jit(f)(
            jnp.array([[-1.0, 0.0, 1.0], [2.0, -2.0, 0.5]]),
            jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
            gamma=0.0,
        ),
    ),
    Case("scale-gamma2-int", lambda f: jax.jit(f)(FOCAL_YS, FOCAL_TS, gamma=2)),
    Case("large-logits-alpha", lambda f: jax.jit(f)(FOCAL_LARGE, FOCAL_ONES, gamma=2, alpha=0.5)),
    Case("small-logits", lambda f: jax.jit(f)(FOCAL_SMALL, FOCAL_ONES, gamma=2)),
    Case("alpha-one-gamma0", lambda f: jax.jit(f)(FOCAL_YS, FOCAL_TS, gamma=0.0, alpha=1)),
    Case("ignore-positive", lambda f: jax.jit(f)(FOCAL_YS, FOCAL_TS, alpha=0)),
    Case("ignore-negative", lambda f: jax.jit(f)(FOCAL_YS, FOCAL_TS, alpha=1)),
    Case("extreme-logits-grad-hessian", _extreme_case),
    # what optax's tests do not spell out
    Case("defaults", lambda f: f(FOCAL_YS, FOCAL_TS)),
    Case("float64", lambda f: f(FOCAL_YS.astype(np.float64), FOCAL_TS, alpha=0.25)),
    Case("bfloat16", lambda f: f(FOCAL_YS.astype(jnp.bfloat16), FOCAL_TS)),
    Case("labels-int", lambda f: f(FOCAL_YS, FOCAL_TS.astype(np.int32), alpha=0.25)),
    Case("alpha-array", lambda f: f(FOCAL_YS, FOCAL_TS, alpha=jnp.asarray(0.25))),
    Case("gamma-array", lambda f: f(FOCAL_YS, FOCAL_TS, gamma=jnp.asarray(1.5))),
    Case("gamma-traced", lambda f: jax.jit(lambda g: f(FOCAL_YS, FOCAL_TS, gamma=g))(1.5)),
    Case("alpha-traced", lambda f: jax.jit(lambda a: f(FOCAL_YS, FOCAL_TS, alpha=a))(0.25)),
    Case(
        "alpha-per-class",
        lambda f: f(FOCAL_YS, FOCAL_TS, alpha=np.array([0.25, 0.5, 0.75], np.float32)),
    ),
    Case("labels-broadcast-rows", lambda f: f(FOCAL_YS, FOCAL_TS[:1])),
    Case("labels-broadcast-rank", lambda f: f(FOCAL_YS, FOCAL_TS[0])),
]


# --------------------------------------------------------------------------------------------
# kl_divergence and kl_divergence_with_log_targets
# --------------------------------------------------------------------------------------------

KL_CASES = [
    # KLDivergenceTest
    Case("scalar-jit", lambda f: jax.jit(f)(KL_LOG_PS[0], KL_QS[0])),
    Case("batched-jit", lambda f: jax.jit(f)(KL_LOG_PS, KL_QS)),
    *[c for c in _mask_cases() if "-log" not in c.id],
    *_axis_cases(),
    # what optax's tests do not spell out
    Case("float32", lambda f: f(KL_LOG_PS.astype(np.float32), KL_QS.astype(np.float32))),
    Case("bfloat16", lambda f: f(KL_LOG_PS.astype(jnp.bfloat16), KL_QS.astype(jnp.bfloat16))),
    Case("grad", lambda f: _sum_grad(f, KL_LOG_PS[:1], KL_QS[:1], argnums=(0, 1))),  # q > 0
    Case("positional-axis-where", lambda f: f(KL_LOG_PS, KL_QS, -1, np.array([[True], [False]]))),
    Case("axis-none", lambda f: f(KL_LOG_PS, KL_QS, axis=None)),
    Case("axis-tuple", lambda f: f(*_axis_data(0), axis=(1, 2))),
    Case("where-per-class", lambda f: f(KL_LOG_PS, KL_QS, where=KL_QS > 0.1)),
    Case("targets-broadcast", lambda f: f(KL_LOG_PS, KL_QS[:1])),
    Case(
        "zero-targets",
        lambda f: f(KL_LOG_PS, np.array([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])),
    ),
    Case("empty-batch", lambda f: f(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))),
]

KL_LOG_CASES = [
    # KLDivergenceWithLogTargetsTest
    Case("scalar-jit", lambda f: jax.jit(f)(KL_LOG_PS[0], KL_LOG_QS[0])),
    Case("batched-jit", lambda f: jax.jit(f)(KL_LOG_PS, KL_LOG_QS)),
    *[c for c in _mask_cases() if "-log" in c.id],
    *_axis_cases(log_targets=True),
    # what optax's tests do not spell out
    Case("float32", lambda f: f(KL_LOG_PS.astype(np.float32), KL_LOG_QS.astype(np.float32))),
    Case("bfloat16", lambda f: f(KL_LOG_PS.astype(jnp.bfloat16), KL_LOG_QS.astype(jnp.bfloat16))),
    Case("grad", lambda f: _sum_grad(f, KL_LOG_PS, KL_LOG_QS, argnums=(0, 1))),
    Case(
        "positional-axis-where", lambda f: f(KL_LOG_PS, KL_LOG_QS, -1, np.array([[True], [False]]))
    ),
    Case("axis-none", lambda f: f(KL_LOG_PS, KL_LOG_QS, axis=None)),
    Case("where-per-class", lambda f: f(KL_LOG_PS, KL_LOG_QS, where=KL_LOG_QS > -2.0)),
    Case("targets-broadcast", lambda f: f(KL_LOG_PS, KL_LOG_QS[:1])),
    Case("empty-batch", lambda f: f(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))),
]


CASES = {
    "softmax_cross_entropy": DENSE_CASES,
    "safe_softmax_cross_entropy": SAFE_CASES,
    "softmax_cross_entropy_with_integer_labels": SPARSE_CASES,
    "smooth_labels": SMOOTH_CASES,
    "poly_loss_cross_entropy": POLY_CASES,
    "sigmoid_binary_cross_entropy": BCE_CASES,
    "sigmoid_focal_loss": FOCAL_CASES,
    "kl_divergence": KL_CASES,
    "kl_divergence_with_log_targets": KL_LOG_CASES,
}


def _params(name):
    return pytest.mark.parametrize("case", CASES[name], ids=[c.id for c in CASES[name]])


@_params("softmax_cross_entropy")
def test_softmax_cross_entropy(case):
    compare("softmax_cross_entropy", case)


@_params("safe_softmax_cross_entropy")
def test_safe_softmax_cross_entropy(case):
    compare("safe_softmax_cross_entropy", case)


@_params("softmax_cross_entropy_with_integer_labels")
def test_softmax_cross_entropy_with_integer_labels(case):
    compare("softmax_cross_entropy_with_integer_labels", case)


@_params("smooth_labels")
def test_smooth_labels(case):
    compare("smooth_labels", case, loss=False)


@_params("poly_loss_cross_entropy")
def test_poly_loss_cross_entropy(case):
    compare("poly_loss_cross_entropy", case)


@_params("sigmoid_binary_cross_entropy")
def test_sigmoid_binary_cross_entropy(case):
    compare("sigmoid_binary_cross_entropy", case)


@_params("sigmoid_focal_loss")
def test_sigmoid_focal_loss(case):
    compare("sigmoid_focal_loss", case)


@_params("kl_divergence")
def test_kl_divergence(case):
    compare("kl_divergence", case)


@_params("kl_divergence_with_log_targets")
def test_kl_divergence_with_log_targets(case):
    compare("kl_divergence_with_log_targets", case)


# --------------------------------------------------------------------------------------------
# optax's test_gradient: numerical against automatic derivatives (forward and reverse)
# --------------------------------------------------------------------------------------------

GRAD_CHECKS = {
    "softmax_cross_entropy": (jxent.softmax_cross_entropy, (YS[:2], TS[:2])),
    "safe_softmax_cross_entropy": (jxent.safe_softmax_cross_entropy, (SAFE_YS[:2], SAFE_TS[:2])),
    "softmax_cross_entropy_with_integer_labels": (
        functools.partial(jxent.softmax_cross_entropy_with_integer_labels, labels=INT_TS),
        (YS,),
    ),
}


@pytest.mark.parametrize("name", list(GRAD_CHECKS))
def test_check_grads(name):
    fn, args = GRAD_CHECKS[name]
    jax.test_util.check_grads(fn, args, order=1)


# --------------------------------------------------------------------------------------------
# Inputs optax accepts that jxent refuses on purpose: a clear error naming the argument
# --------------------------------------------------------------------------------------------


_ENLARGE_RNG = np.random.default_rng(26)
_ENLARGE_BX = _ENLARGE_RNG.normal(size=(4, 3)).astype(np.float32)
_ENLARGE_BT = (_ENLARGE_RNG.random((4, 3)) < 0.5).astype(np.float32)
_ENLARGE_LOGITS = _ENLARGE_RNG.normal(size=(4, 3)).astype(np.float32)
_ENLARGE_PROBS = np.asarray(jax.nn.softmax(_ENLARGE_RNG.normal(size=(4, 3))), np.float32)


class Refused(NamedTuple):
    id: str
    name: str
    args: tuple
    kwargs: dict
    exc: type
    words: tuple  # the message names these


REFUSED = [
    # optax broadcasts a label array of another shape against the batch (take_along_axis);
    # its docstring asks for labels of shape [batch_size].
    Refused(
        "integer-labels-broadcast",
        "softmax_cross_entropy_with_integer_labels",
        (YS, np.array([1])),
        {},
        ValueError,
        ("labels", "(2,)"),
    ),
    # optax multiplies a per-example epsilon array into the loss; jxent's is a scalar.
    Refused(
        "poly-epsilon-per-example",
        "poly_loss_cross_entropy",
        (POLY_BLOGITS, POLY_BLABELS),
        {"epsilon": np.array([1.0, 2.0])},
        ValueError,
        ("epsilon", "scalar"),
    ),
    # optax computes a (negative or meaningless) number outside the documented ranges.
    Refused(
        "focal-gamma-negative",
        "sigmoid_focal_loss",
        (FOCAL_YS, FOCAL_TS),
        {"gamma": -1.0},
        ValueError,
        ("gamma",),
    ),
    Refused(
        "focal-alpha-above-one",
        "sigmoid_focal_loss",
        (FOCAL_YS, FOCAL_TS),
        {"alpha": 1.5},
        ValueError,
        ("alpha",),
    ),
    # a `where` of lower rank is a row mask of the batch shape in jxent (as in optax's
    # softmax_cross_entropy); optax's KL broadcasts it as a class mask instead.
    Refused(
        "kl-where-class-vector",
        "kl_divergence",
        (KL_LOG_PS, KL_QS),
        {"where": np.array([True, True, True, False, True, True])},
        ValueError,
        ("where", "batch shape"),
    ),
    Refused(
        "kl-log-where-class-vector",
        "kl_divergence_with_log_targets",
        (KL_LOG_PS, KL_LOG_QS),
        {"where": np.array([True, True, True, False, True, True])},
        ValueError,
        ("where", "batch shape"),
    ),
    # no classes: optax returns 0, -0 or -inf per row; a loss over no classes is a mistake.
    Refused(
        "dense-zero-classes",
        "softmax_cross_entropy",
        (np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32)),
        {},
        ValueError,
        ("logits",),
    ),
    Refused(
        "integer-labels-zero-classes",
        "softmax_cross_entropy_with_integer_labels",
        (np.zeros((2, 0), np.float32), np.zeros((2,), np.int32)),
        {},
        ValueError,
        ("logits",),
    ),
    # optax broadcasts a target that enlarges the loss: logits [N, 1] with labels [N] give
    # an [N, N] loss and a plausible wrong mean (PyTorch raises).
    *[
        Refused(f"{name}-enlarging-broadcast", name, args, {}, ValueError, words)
        for name, args, words in [
            (
                "sigmoid_binary_cross_entropy",
                (_ENLARGE_BX[:, :1], _ENLARGE_BT[:, 0]),
                ("labels", "(4,)", "(4, 1)", "(4, 4)"),
            ),
            (
                "sigmoid_focal_loss",
                (_ENLARGE_BX[:, :1], _ENLARGE_BT[:, 0]),
                ("labels", "(4,)", "(4, 1)", "(4, 4)"),
            ),
            (
                "softmax_cross_entropy",
                (_ENLARGE_LOGITS[:1], _ENLARGE_PROBS),
                ("labels", "(1, 3)", "(4, 3)"),
            ),
            (
                "poly_loss_cross_entropy",
                (_ENLARGE_LOGITS[:1], _ENLARGE_PROBS),
                ("labels", "(1, 3)", "(4, 3)"),
            ),
            (
                "kl_divergence",
                (np.log(_ENLARGE_PROBS[:1]), _ENLARGE_PROBS),
                ("targets", "log_predictions", "(4, 3)"),
            ),
            (
                "kl_divergence_with_log_targets",
                (np.log(_ENLARGE_PROBS[:1]), np.log(_ENLARGE_PROBS)),
                ("log_targets", "log_predictions", "(4, 3)"),
            ),
            (
                "smooth_labels",
                (_ENLARGE_PROBS[0], np.full((4, 1), 0.1, np.float32)),
                ("alpha", "(3,)", "(4, 3)"),
            ),
        ]
    ],
    Refused(
        "focal-alpha-enlarging-broadcast",
        "sigmoid_focal_loss",
        (_ENLARGE_BX[0], _ENLARGE_BT[0]),
        {"alpha": np.full((2, 3), 0.25, np.float32)},
        ValueError,
        ("alpha", "(2, 3)"),
    ),
    Refused(
        "kl-zero-classes",
        "kl_divergence",
        (np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32)),
        {},
        ValueError,
        ("log_predictions",),
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_refused(case):
    with optax_defaults():  # optax accepts it
        jax.block_until_ready(getattr(optax.losses, case.name)(*case.args, **case.kwargs))
    checks.assert_raises_naming(
        case.exc, getattr(jxent, case.name), case.args, case.kwargs, case.words
    )


# --------------------------------------------------------------------------------------------
# Deliberate differences of value: jxent is finite (or NaN on purpose) where optax is not
# --------------------------------------------------------------------------------------------


def _optax(name, *args, **kwargs):
    with optax_defaults():
        return np.asarray(getattr(optax.losses, name)(*args, **kwargs))


def test_dense_neg_inf_logits_are_safe():
    """optax's softmax_cross_entropy is NaN for a -inf logit with a zero target; jxent's is
    its safe_softmax_cross_entropy (0 log 0 = 0), in value and gradient."""
    assert np.isnan(_optax("softmax_cross_entropy", SAFE_YS, SAFE_TS)).any()
    want = _optax("safe_softmax_cross_entropy", SAFE_YS, SAFE_TS)
    checks.assert_close(jxent.softmax_cross_entropy(SAFE_YS, SAFE_TS), want, rtol=2e-6)
    rows = [0, 1, 2, 4]  # finite losses
    g = _sum_grad(jxent.softmax_cross_entropy, SAFE_YS[rows], SAFE_TS[rows])
    with optax_defaults():
        want_g = _sum_grad(optax.losses.safe_softmax_cross_entropy, SAFE_YS[rows], SAFE_TS[rows])
    checks.assert_close(g, want_g, rtol=2e-6, atol=2e-6)


def test_negative_integer_label_is_nan():
    """optax reads label -1 as the last class (numpy indexing); jxent gives NaN for every
    label outside [0, num_classes) (README: a bad label never gives a plausible number)."""
    optax_loss = _optax("softmax_cross_entropy_with_integer_labels", YS, np.array([-1, 0]))
    assert np.isfinite(optax_loss).all()
    loss = np.asarray(jxent.softmax_cross_entropy_with_integer_labels(YS, np.array([-1, 0])))
    assert np.isnan(loss[0])
    checks.assert_close(loss[1], optax_loss[1], rtol=2e-6)


def test_binary_infinite_logits_are_finite():
    """+-inf logits: optax gives NaN where the prediction is right and inf where it is
    wrong; jxent clamps the logits to the largest finite float (0 and finfo.max)."""
    x, t = np.array([np.inf, -np.inf, np.inf, -np.inf]), np.array([1.0, 0.0, 0.0, 1.0])
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(
            _optax("sigmoid_binary_cross_entropy", x, t), [np.nan, np.nan, np.inf, np.inf]
        )
    big = np.finfo(np.float64).max
    np.testing.assert_array_equal(jxent.sigmoid_binary_cross_entropy(x, t), [0.0, 0.0, big, big])
    g = jax.grad(lambda x: jnp.sum(jxent.sigmoid_binary_cross_entropy(x, t)))(x)
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0, -1.0])


# optax's own NaN (-inf - -inf), which this test asserts, warns on numpy inputs.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_kl_zero_targets_are_safe():
    """0 log 0 = 0 in value and gradient: optax gives NaN for a zero target with a -inf
    log-prediction, for a -inf log-target, and for the targets' gradient at a zero target."""
    lp, q = np.array([[-np.inf, 0.0]]), np.array([[0.0, 1.0]])
    assert np.isnan(_optax("kl_divergence", lp, q)).all()
    np.testing.assert_array_equal(jxent.kl_divergence(lp, q), [0.0])
    log_q = np.array([[-np.inf, 0.0]])
    assert np.isnan(_optax("kl_divergence_with_log_targets", lp, log_q)).all()
    np.testing.assert_array_equal(jxent.kl_divergence_with_log_targets(lp, log_q), [0.0])
    with optax_defaults():
        optax_g = _sum_grad(optax.losses.kl_divergence, KL_LOG_PS, KL_QS, argnums=1)
    assert np.isnan(optax_g[1, 5])  # KL_QS[1, 5] == 0
    g = _sum_grad(jxent.kl_divergence, KL_LOG_PS, KL_QS, argnums=1)
    assert np.isfinite(g).all()
    checks.assert_close(np.delete(g.ravel(), 11), np.delete(optax_g.ravel(), 11))


@pytest.mark.parametrize("name", ["kl_divergence", "poly_loss_cross_entropy"])
def test_where_of_batch_shape_masks_rows(name):
    """With as many rows as classes, optax's KL and poly loss broadcast a ``where`` of
    shape [batch] as a class mask; jxent reads it as a row mask, as optax's
    softmax_cross_entropy does: the result is optax's with ``where[:, None]``."""
    log_p = np.log(np.full((3, 3), 1 / 3))
    q = np.eye(3) * 0.5 + 1 / 6
    rows = np.array([True, False, True])
    got = getattr(jxent, name)(log_p, q, where=rows)
    want = _optax(name, log_p, q, where=rows[:, None])
    checks.assert_close(got, np.where(rows, want, 0.0))
    assert not np.allclose(got, _optax(name, log_p, q, where=rows))
