"""jxent under jax.sharding (issue 6): sharded jit, jxent.parallel (shard_map), compiled HLO.

The multi-device checks need 8 devices, which XLA_FLAGS must ask for before JAX initialises;
this process already has JAX with one CPU device, so each group runs in a subprocess
(``tests/parallel_checks.py GROUP``) that reports its comparisons as JSON. The single-device
properties of ``jxent.parallel`` (against the float64 reference, ``check_grads``, errors) run
here, on a 1 x 1 mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jxent
import jxent.parallel

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = ("jit", "shard_map", "linear", "hlo", "float32")


def run_group(group: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "parallel_checks.py"), group],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"parallel_checks.py {group} failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("group", GROUPS)
def test_multi_device(group):
    """8 fake CPU devices: meshes 8x1, 4x2, 2x4, 1x8; Auto and Explicit axes; every option.

    jit: the ordinary losses with sharded logits equal the single-device ones (and the float64
    reference). shard_map: jxent.parallel equals the single-device loss. hlo: no collective in
    the compiled programs has a vocabulary-sized result, jxent.parallel has no all-gather and
    its backward pass adds no collective. float32: jxent.parallel with x64 disabled, padding
    holding +inf or NaN, against the float64 NumPy reference within epsilon-derived bounds.
    """
    records = run_group(group)
    assert records, "no checks ran"
    failures = [
        f"{r['case']}: {name}: ratio {ratio:.3g} ({detail})"
        for r in records
        for name, (ratio, detail) in r["checks"].items()
        if not ratio <= 1.0
    ]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------
# jxent.parallel on one device: a 1 x 1 mesh, padding, options, gradients, errors
# ------------------------------------------------------------------------------------------


def one_device(loss_kwargs, reduction="none"):
    """``(local_logits, labels[, class_weights]) -> loss`` through shard_map on a 1x1 mesh."""
    mesh = jax.make_mesh((1, 1), ("data", "model"))

    def local(x, y, w):
        return jxent.parallel.softmax_cross_entropy_with_integer_labels(
            x,
            y,
            axis_name="model",
            class_weights=w,
            reduction=reduction,
            batch_axis_name="data",
            **loss_kwargs,
        )

    out = P("data") if reduction == "none" else P()
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data", "model"), P("data"), P()), out_specs=out
    )

    def call(x, y, w=None):
        put = lambda a, *s: jax.device_put(a, NamedSharding(mesh, P(*s)))  # noqa: E731
        return fn(put(x, "data", "model"), put(y, "data"), None if w is None else put(w))

    return call


@st.composite
def parallel_cases(draw):
    rows = draw(st.integers(1, 6))
    num_classes = draw(st.integers(1, 7))
    pad = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**16))
    opts = {}
    if draw(st.booleans()):
        opts["label_smoothing"] = draw(st.sampled_from([0.1, 0.5, 1.0]))
    if draw(st.booleans()):
        opts["z_loss"] = 1e-2
    if draw(st.booleans()):
        opts["logit_soft_cap"] = 2.5
    if draw(st.booleans()):
        opts["ignore_index"] = -1
    weighted = draw(st.booleans())
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    return rows, num_classes, pad, seed, opts, weighted, reduction


@settings(max_examples=12)
@given(parallel_cases())
def test_one_device_matches_reference(case):
    rows, num_classes, pad, seed, opts, weighted, reduction = case
    rng = np.random.default_rng(seed)
    x = 2.0 * rng.standard_normal((rows, num_classes))
    y = rng.integers(0, num_classes, rows)
    if "ignore_index" in opts and rows > 1:
        y[0] = -1
    cw = rng.uniform(0.5, 2.0, num_classes) if weighted else None
    xp = np.pad(x, ((0, 0), (0, pad)), constant_values=9.0)  # padding: any value
    cwp = None if cw is None else np.pad(cw, (0, pad), constant_values=5.0)
    loss = one_device(dict(opts, num_classes=num_classes), reduction)
    cot = rng.uniform(0.5, 1.5, rows) if reduction == "none" else 1.0

    def objective(x):
        out = loss(x, y, cwp)
        return jnp.sum(out * cot) if reduction == "none" else out

    value, grad = jax.jit(jax.value_and_grad(objective))(xp)
    expect = ref.softmax_cross_entropy_with_integer_labels(
        x, y, class_weights=cw, reduction=reduction, cotangent=cot, **opts
    )
    expect_value = np.sum(expect.loss * cot) if reduction == "none" else expect.loss
    np.testing.assert_allclose(value, expect_value, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad[:, :num_classes], expect.grad_logits, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(grad[:, num_classes:], 0.0)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_one_device_check_grads(reduction):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6))
    y = np.array([0, 3, -1, 4])
    cw = rng.uniform(0.5, 2.0, 6)
    opts = dict(label_smoothing=0.2, z_loss=1e-2, logit_soft_cap=3.0, ignore_index=-1)
    loss = one_device(dict(opts, num_classes=5), reduction)

    @jax.jit
    def objective(x):
        return jnp.sum(jnp.sin(loss(x, y, cw)))

    check_grads(objective, (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_one_device_neg_inf_and_bfloat16():
    x = np.array([[0.5, -np.inf, 2.0, 0.0], [-np.inf, -np.inf, -np.inf, 0.0]])
    y = np.array([2, 1])
    loss = one_device(dict(label_smoothing=0.1, num_classes=3))
    for dtype in (jnp.float32, jnp.bfloat16):
        value, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(loss(x, y))))(
            jnp.asarray(x, dtype)
        )
        assert value.dtype == jnp.float32 and grad.dtype == dtype
        expect = ref.softmax_cross_entropy_with_integer_labels(
            np.asarray(jnp.asarray(x[:, :3], dtype).astype(jnp.float64)), y, label_smoothing=0.1
        )
        np.testing.assert_allclose(value, np.sum(expect.loss), rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(grad[:, :3].astype(jnp.float32)), expect.grad_logits, atol=4e-3
        )
        assert not np.any(np.isnan(np.asarray(grad.astype(jnp.float32))))
        np.testing.assert_array_equal(np.asarray(grad[:, 3:].astype(jnp.float32)), 0.0)


def test_float32_gradient_at_logits_near_1000():
    """The backward pass's softmax is ``exp((x - max) - log sum exp(x - max))``, float32 to
    ~1e-6 relative; ``exp(x - lse)`` with a float32 ``lse`` near 1000 is off by up to 3e-5."""
    rng = np.random.default_rng(7)
    # Multiples of 1/8 near 1000 (std ~5): exact in float32, so the float64 reference sees
    # the same logits and only the softmax differs.
    x = (1000 + rng.integers(-40, 41, size=(16, 40)) / 8).astype(np.float32)
    y = rng.integers(0, 37, 16)
    loss = one_device(dict(num_classes=37))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(loss(x, y))))(x)
    expect = ref.softmax_cross_entropy_with_integer_labels(x[:, :37].astype(np.float64), y)
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grad[:, :37], np.float64), expect.grad_logits, rtol=3e-6)
    np.testing.assert_array_equal(grad[:, 37:], 0.0)


def test_linear_float32_gradients_at_logits_near_1000():
    """As above for the linear form: logits x @ w of about 1000 (std ~5), exact in float32
    (integers times multiples of 1/512). Each gradient is a sum of terms dz * (w or x); its
    error is compared with the sum of their magnitudes."""
    rng = np.random.default_rng(8)
    rows, hidden, num_classes, pad = 16, 4, 37, 3
    x = (250 + rng.integers(-2, 3, size=(rows, hidden))).astype(np.float32)
    w = (1 + rng.integers(-8, 9, size=(hidden, num_classes)) / 512).astype(np.float32)
    b = np.zeros(num_classes, np.float32)
    y = rng.integers(0, num_classes, rows)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731

    def local(x, w, b, y):
        return jxent.parallel.linear_softmax_cross_entropy(
            x,
            w,
            y,
            axis_name="model",
            bias=b,
            reduction="sum",
            num_classes=num_classes,
            batch_axis_name="data",
            chunk_size=(5, 11),
        )

    specs = (P("data", None), P(None, "model"), P("model"), P("data"))
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
    wp = np.pad(w, ((0, 0), (0, pad)), constant_values=1.0)
    bp = np.pad(b, (0, pad))
    args = (put(x, "data", None), put(wp, None, "model"), put(bp, "model"))
    grads = jax.jit(jax.grad(lambda *a: fn(*a, put(y, "data")), argnums=(0, 1, 2)))(*args)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    expect = ref.softmax_cross_entropy_with_integer_labels(x64 @ w64, y, reduction="sum")
    dz = expect.grad_logits
    size = np.abs(dz)
    wanted = (dz @ w64.T, x64.T @ dz, dz.sum(axis=0))
    bounds = (size @ np.abs(w64.T), np.abs(x64.T) @ size, size.sum(axis=0))
    for g, e, bound in zip(grads, wanted, bounds, strict=True):
        g = np.asarray(g, np.float64)[..., : e.shape[-1]]
        err = np.abs(g - e)
        assert np.all(err <= 1e-6 * bound), float(np.max(err / bound))


def test_out_of_range_label_is_nan():
    x = np.zeros((3, 4))
    y = np.array([0, 3, 7])  # 3 is on the padding (num_classes=3), 7 out of range
    out = jax.jit(one_device(dict(num_classes=3)))(x, y)
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])


@settings(max_examples=8)
@given(parallel_cases(), st.sampled_from([None, 3, (2, 3)]))
def test_one_device_linear_matches_reference(case, chunk):
    rows, num_classes, pad, seed, opts, weighted, reduction = case
    rng = np.random.default_rng(seed)
    hidden = 3
    x = rng.standard_normal((rows, hidden))
    w = rng.standard_normal((hidden, num_classes))
    b = 0.3 * rng.standard_normal(num_classes)
    y = rng.integers(0, num_classes, rows)
    if "ignore_index" in opts and rows > 1:
        y[0] = -1
    cw = rng.uniform(0.5, 2.0, num_classes) if weighted else None
    wp = np.pad(w, ((0, 0), (0, pad)), constant_values=2.0)  # padding: any value
    bp = np.pad(b, (0, pad), constant_values=4.0)
    cwp = None if cw is None else np.pad(cw, (0, pad), constant_values=5.0)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731

    def local(x, w, b, y, c):
        return jxent.parallel.linear_softmax_cross_entropy(
            x,
            w,
            y,
            axis_name="model",
            bias=b,
            class_weights=c,
            reduction=reduction,
            num_classes=num_classes,
            batch_axis_name="data",
            chunk_size=chunk,
            **opts,
        )

    out = P("data") if reduction == "none" else P()
    specs = (P("data", None), P(None, "model"), P("model"), P("data"), P("model"))
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out)
    cot = rng.uniform(0.5, 1.5, rows) if reduction == "none" else 1.0

    def objective(x, w, b):
        loss = fn(x, w, b, put(y, "data"), None if cwp is None else put(cwp, "model"))
        return jnp.sum(loss * cot) if reduction == "none" else loss

    args = (put(x, "data", None), put(wp, None, "model"), put(bp, "model"))
    value, (dx, dw, db) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))(*args)
    expect = ref.softmax_cross_entropy_with_integer_labels(
        x @ w + b, y, class_weights=cw, reduction=reduction, cotangent=cot, **opts
    )
    g = expect.grad_logits
    expect_value = np.sum(expect.loss * cot) if reduction == "none" else expect.loss
    tol = dict(rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(value, expect_value, **tol)
    np.testing.assert_allclose(dx, g @ w.T, **tol)
    np.testing.assert_allclose(dw[:, :num_classes], x.T @ g, **tol)
    np.testing.assert_allclose(db[:num_classes], g.sum(axis=0), **tol)
    np.testing.assert_array_equal(dw[:, num_classes:], 0.0)
    np.testing.assert_array_equal(db[num_classes:], 0.0)


_FAMILY = ["linear_entropy", "linear_distillation_loss", "linear_softmax_jensen_shannon_divergence"]


@pytest.mark.parametrize("name", _FAMILY)
def test_parallel_family_normalizer_is_checked(name):
    """The normalizer of the parallel log-prob family: only with "mean", only a scalar."""
    mesh = jax.make_mesh((1,), ("model",))
    x, y = jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32)
    top = (jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1)))
    w = jax.device_put(jnp.zeros((3, 4)), NamedSharding(mesh, P(None, "model")))
    fn = getattr(jxent.parallel, name)
    args = {"linear_entropy": (), "linear_distillation_loss": (y, top)}.get(name, (top,))

    def call(**kw):
        local = lambda w: fn(x, w, *args, axis_name="model", **kw)  # noqa: E731
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(None, "model"), out_specs=P()))(w)

    with pytest.raises(ValueError, match='normalizer divides the "mean"'):
        call(normalizer=4.0, reduction="sum")
    with pytest.raises(ValueError, match="normalizer must be a scalar"):
        call(normalizer=jnp.ones(2))
    assert float(call(normalizer=4.0)) == pytest.approx(2 * float(call()) / 4.0, abs=1e-6)


def test_linear_bad_inputs_raise():
    mesh = jax.make_mesh((1,), ("model",))
    x, y = jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32)
    w = jax.device_put(jnp.zeros((3, 4)), NamedSharding(mesh, P(None, "model")))

    def call(w, **kw):
        def local(w):
            return jxent.parallel.linear_softmax_cross_entropy(x, w, y, axis_name="model", **kw)

        return jax.shard_map(local, mesh=mesh, in_specs=P(None, "model"), out_specs=P())(w)

    with pytest.raises(ValueError, match="local_w"):
        call(jax.device_put(jnp.zeros((5, 4)), NamedSharding(mesh, P(None, "model"))))
    with pytest.raises(ValueError, match="bias"):
        call(w, bias=jnp.zeros(3))
    with pytest.raises(ValueError, match="num_classes"):
        call(w, num_classes=9)
    # Issue 14's options: token weights, normalizer, return_lse, w_layout.
    with pytest.raises(ValueError, match="token_weights"):
        call(w, token_weights=jnp.ones(3))
    with pytest.raises(TypeError, match="token_weights"):
        call(w, token_weights=jnp.ones(2, jnp.int32))
    with pytest.raises(ValueError, match='normalizer divides the "mean"'):
        call(w, normalizer=4.0, reduction="sum")
    with pytest.raises(ValueError, match="normalizer must be a scalar"):
        call(w, normalizer=jnp.ones(2))
    with pytest.raises(TypeError, match="return_lse"):
        call(w, return_lse=1)
    with pytest.raises(ValueError, match="w_layout"):
        call(w, w_layout="dd")
    with pytest.raises(ValueError, match=r"local_w must have shape \(V, D\)"):
        call(w, w_layout="vd")  # [3, 4]: D = 3 is w's first axis, not its second
    with pytest.raises(TypeError, match="labels"):
        jax.shard_map(
            lambda w: jxent.parallel.linear_softmax_cross_entropy(
                x, w, jnp.zeros(2), axis_name="model"
            ),
            mesh=mesh,
            in_specs=P(None, "model"),
            out_specs=P(),
        )(w)
    with pytest.raises(ValueError, match="local_w must be split over axis_name"):
        jax.shard_map(
            lambda w: jxent.parallel.linear_softmax_cross_entropy(x, w, y, axis_name="model"),
            mesh=mesh,
            in_specs=P(),
            out_specs=P(),
        )(jnp.zeros((3, 4)))


def _bad_calls():
    x = jnp.zeros((2, 4))
    y = jnp.zeros((2,), jnp.int32)
    return (
        {
            "integer logits": (
                TypeError,
                "local_logits",
                dict(local_logits=jnp.zeros((2, 4), jnp.int32)),
            ),
            "float labels": (TypeError, "labels", dict(labels=jnp.zeros((2,)))),
            "labels shape": (ValueError, "labels", dict(labels=jnp.zeros((3,), jnp.int32))),
            "scalar logits": (ValueError, "local_logits", dict(local_logits=jnp.zeros(()))),
            "num_classes too big": (ValueError, "num_classes", dict(num_classes=5)),
            "num_classes zero": (ValueError, "num_classes", dict(num_classes=0)),
            "num_classes float": (TypeError, "num_classes", dict(num_classes=3.0)),
            "class_weights shape": (ValueError, "class_weights", dict(class_weights=jnp.ones(5))),
            "where dtype": (TypeError, "where", dict(where=jnp.ones(2))),
            "where shape": (ValueError, "where", dict(where=jnp.ones((2, 4), bool))),
            "reduction": (ValueError, "reduction", dict(reduction="avg")),
            "smoothing": (ValueError, "label_smoothing", dict(label_smoothing=1.5)),
            "axis_name type": (TypeError, "axis_name", dict(axis_name=3)),
            "unbound axis": (ValueError, "axis_name", dict(axis_name="vocab")),
        },
        x,
        y,
    )


@pytest.mark.parametrize("name", list(_bad_calls()[0]))
def test_bad_inputs_raise(name):
    cases, x, y = _bad_calls()
    error, word, override = cases[name]
    kwargs = dict(local_logits=x, labels=y, axis_name="model")
    kwargs.update(override)
    mesh = jax.make_mesh((1,), ("model",))

    def local(_):
        return jxent.parallel.softmax_cross_entropy_with_integer_labels(**kwargs)

    fn = jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P())
    with pytest.raises(error, match=word):
        fn(jnp.zeros(()))


@pytest.mark.parametrize("check_vma", [True, False])
def test_vocabulary_not_split_raises(check_vma):
    """Logits not split over axis_name, or check_vma=False: the gradient would be wrong."""
    mesh = jax.make_mesh((1,), ("model",))
    spec = P() if check_vma else P(None, "model")

    def local(x, y):
        return jxent.parallel.softmax_cross_entropy_with_integer_labels(x, y, axis_name="model")

    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=P(), check_vma=check_vma)
    x = jax.device_put(jnp.zeros((2, 4)), NamedSharding(mesh, spec))
    with pytest.raises(ValueError, match="local_logits must be split over axis_name"):
        fn(x, jnp.zeros((2,), jnp.int32))


def test_outside_shard_map_raises():
    with pytest.raises(ValueError, match="shard_map"):
        jxent.parallel.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), axis_name="model"
        )
