"""jxent.parallel on one device (a 1 x 1 mesh): padding holding any value, x64 disabled
(float32, bfloat16) against the float64 NumPy reference with epsilon-derived bounds,
class weights as constants, and the trace-time check that per-token arrays are not
split over the vocabulary axis. The multi-device float32 checks are the "float32" group
of tests/parallel_checks.py.

The logits form is checked through tests/reference_linear.py with ``w`` the identity:
``x @ I`` is the logits exactly, and the reference then gives the categorical loss, its
gradient w.r.t. the logits (``grad_x``) and their error scales.
"""

from __future__ import annotations

import checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_linear as ref
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jxent.parallel

REDUCTIONS = ("none", "sum", "mean")
PAD_VALUES = {"+inf": np.inf, "-inf": -np.inf, "nan": np.nan, "finite": 7.0}
ROWS, CLASSES, PAD, HIDDEN = 9, 13, 3, 5
OPTIONS = {
    "plain": {},
    "all": dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=30.0, ignore_index=-100),
}


def put(mesh, a, *spec):
    return jax.device_put(a, NamedSharding(mesh, P(*spec)))


def logits_loss(mesh, reduction, num_classes, opts, weighted):
    def local(x, y, cw):
        return jxent.parallel.softmax_cross_entropy_with_integer_labels(
            x,
            y,
            axis_name="model",
            class_weights=cw if weighted else None,
            reduction=reduction,
            num_classes=num_classes,
            batch_axis_name="data",
            **opts,
        )

    out = P("data") if reduction == "none" else P()
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P("data", "model"), P("data"), P("model")), out_specs=out
    )


def linear_loss(mesh, reduction, num_classes, opts, weighted, chunk_size=(4, 5)):
    def local(x, w, b, y, cw):
        return jxent.parallel.linear_softmax_cross_entropy(
            x,
            w,
            y,
            axis_name="model",
            bias=b,
            class_weights=cw if weighted else None,
            reduction=reduction,
            num_classes=num_classes,
            batch_axis_name="data",
            chunk_size=chunk_size,
            **opts,
        )

    out = P("data") if reduction == "none" else P()
    specs = (P("data", None), P(None, "model"), P("model"), P("data"), P("model"))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out)


def make_data(seed, pad_value, dtype, offset=0.0, ignore=True):
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((ROWS, CLASSES + PAD)) + offset
    x = rng.standard_normal((ROWS, HIDDEN))
    w = rng.standard_normal((HIDDEN, CLASSES + PAD)) / np.sqrt(HIDDEN)
    b = 0.5 * rng.standard_normal(CLASSES + PAD) + offset
    cw = rng.uniform(0.5, 2.0, CLASSES + PAD)
    fill = PAD_VALUES[pad_value]
    for a in (logits, w, b, cw):
        a[..., CLASSES:] = fill
    y = rng.integers(0, CLASSES, ROWS).astype(np.int32)
    if ignore:  # only with ignore_index: otherwise -100 is out of range (a NaN loss)
        y[1] = -100
    # The inputs as the dtype holds them, and those exact values in float64.
    rounded = [np.asarray(jnp.asarray(a, dtype)) for a in (logits, x, w, b)]
    exact = [a.astype(np.float64) for a in rounded]
    return rounded, exact, y, cw.astype(np.float32)


def tolerances(dtype, terms):
    tol = checks.float_tolerance(jnp.float32, terms)  # float32 accumulation
    return tol, tol + (checks.float_tolerance(dtype, terms) if dtype == jnp.bfloat16 else 0.0)


@pytest.mark.parametrize("pad_value", list(PAD_VALUES))
@pytest.mark.parametrize("opts_name", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_logits_form_float32_padding_any_value(dtype, reduction, opts_name, pad_value):
    """x64 disabled; the padding column holds +inf, -inf, NaN or 7: loss and gradient of
    the unpadded problem within float32 (bfloat16) bounds, exactly 0 on the padding."""
    opts = OPTIONS[opts_name]
    rounded, exact, y, cw = make_data(11, pad_value, dtype, ignore="ignore_index" in opts)
    ct = np.linspace(0.5, 1.5, ROWS) if reduction == "none" else 0.75
    with checks.x64_off():
        mesh = jax.make_mesh((1, 1), ("data", "model"))
        loss = logits_loss(mesh, reduction, CLASSES, opts, weighted=True)
        args = (put(mesh, y, "data"), put(mesh, cw, "model"))

        @jax.jit
        def run(x):
            out, vjp = jax.vjp(lambda x: loss(x, *args), x)
            return out, vjp(jnp.asarray(ct, out.dtype))[0]

        out, grad = run(put(mesh, rounded[0], "data", "model"))
    assert out.dtype == jnp.float32 and grad.dtype == dtype
    r = ref.linear_softmax_cross_entropy(
        exact[0][:, :CLASSES],
        np.eye(CLASSES),
        y,
        class_weights=cw[:CLASSES].astype(np.float64),
        reduction=reduction,
        cotangent=ct,
        **opts,
    )
    loss_tol, grad_tol = tolerances(dtype, ROWS * CLASSES)
    ref.assert_within(out, r.loss, loss_tol * r.loss_scale, "loss")
    grad = np.asarray(grad, np.float64)
    ref.assert_within(grad[:, :CLASSES], r.grad_x, grad_tol * r.grad_x_scale, "dlogits")
    assert np.all(grad[:, CLASSES:] == 0)


@pytest.mark.parametrize("pad_value", list(PAD_VALUES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_linear_form_float32_padding_any_value(dtype, reduction, pad_value):
    """As above for the linear form: padding columns of w, bias and class weights; blocks
    of 4 tokens and 5 columns divide neither 9 tokens nor 16 columns."""
    opts = OPTIONS["all"]
    rounded, exact, y, cw = make_data(12, pad_value, dtype, offset=100.0)
    ct = np.linspace(0.5, 1.5, ROWS) if reduction == "none" else 0.75
    with checks.x64_off():
        mesh = jax.make_mesh((1, 1), ("data", "model"))
        loss = linear_loss(mesh, reduction, CLASSES, opts, weighted=True)
        labels, weights = put(mesh, y, "data"), put(mesh, cw, "model")

        @jax.jit
        def run(x, w, b):
            out, vjp = jax.vjp(lambda x, w, b: loss(x, w, b, labels, weights), x, w, b)
            return out, vjp(jnp.asarray(ct, out.dtype))

        x, w, b = rounded[1:]
        out, (gx, gw, gb) = run(
            put(mesh, x, "data", None), put(mesh, w, None, "model"), put(mesh, b, "model")
        )
    r = ref.linear_softmax_cross_entropy(
        *exact[1:3],
        y,
        bias=exact[3],
        class_weights=cw.astype(np.float64),
        reduction=reduction,
        num_classes=CLASSES,
        cotangent=ct,
        **opts,
    )
    loss_tol, grad_tol = tolerances(dtype, ROWS * HIDDEN * (CLASSES + PAD))
    ref.assert_within(out, r.loss, loss_tol * r.loss_scale, "loss")
    ref.assert_within(gx, r.grad_x, grad_tol * r.grad_x_scale, "dx")
    for name, g, e, scale in (
        ("dw", gw, r.grad_w, r.grad_w_scale),
        ("dbias", gb, r.grad_bias, r.grad_bias_scale),
    ):
        g = np.asarray(g, np.float64)
        ref.assert_within(g[..., :CLASSES], e[..., :CLASSES], grad_tol * scale[..., :CLASSES], name)
        assert np.all(g[..., CLASSES:] == 0), name


@pytest.mark.parametrize("pad_value", ["+inf", "nan"])
def test_logits_form_float64_padding_exact(pad_value):
    """float64: the padded loss equals the unpadded one to float64 round-off."""
    opts = dict(OPTIONS["all"], logit_soft_cap=4.0)
    rounded, exact, y, cw = make_data(13, pad_value, jnp.float64)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    loss = logits_loss(mesh, "mean", CLASSES, opts, weighted=True)
    args = (put(mesh, y, "data"), put(mesh, cw.astype(np.float64), "model"))
    value, grad = jax.jit(jax.value_and_grad(lambda x: loss(x, *args)))(
        put(mesh, exact[0], "data", "model")
    )
    r = ref.linear_softmax_cross_entropy(
        exact[0][:, :CLASSES],
        np.eye(CLASSES),
        y,
        class_weights=cw[:CLASSES].astype(np.float64),
        reduction="mean",
        **opts,
    )
    checks.assert_close(value, r.loss)
    checks.assert_close(grad[:, :CLASSES], r.grad_x)
    assert np.all(np.asarray(grad)[:, CLASSES:] == 0)


# ------------------------------------------------------------------------------------------
# class_weights are constants
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["logits", "linear"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_weights_get_no_gradient(form, reduction):
    rounded, exact, y, cw = make_data(14, "finite", jnp.float64)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    opts = dict(label_smoothing=0.1, ignore_index=-100)
    labels = put(mesh, y, "data")
    if form == "logits":
        loss = logits_loss(mesh, reduction, CLASSES, opts, weighted=True)
        inputs = (put(mesh, exact[0], "data", "model"),)
    else:
        loss = linear_loss(mesh, reduction, CLASSES, opts, weighted=True)
        x, w, b = exact[1:]
        inputs = (put(mesh, x, "data", None), put(mesh, w, None, "model"), put(mesh, b, "model"))

    def objective(cw, first, *rest):
        if form == "logits":
            return jnp.sum(loss(first, labels, cw))
        return jnp.sum(loss(first, *rest, labels, cw))

    g_cw, g_first = jax.jit(jax.grad(objective, argnums=(0, 1)))(
        put(mesh, cw.astype(np.float64), "model"), *inputs
    )
    assert np.all(np.asarray(g_cw) == 0), g_cw
    assert np.any(np.asarray(g_first) != 0)  # the loss does depend on its other inputs


# ------------------------------------------------------------------------------------------
# Per-token arrays must not be split over the vocabulary axis
# ------------------------------------------------------------------------------------------


def test_sequence_split_x_raises():
    """x split over the vocabulary axis (sequence parallelism on the same mesh axis): each
    shard would reduce other rows than its neighbours; refused at trace time."""
    mesh = jax.make_mesh((1,), ("model",))
    x, w, y = jnp.zeros((4, 3)), jnp.zeros((3, 8)), jnp.zeros((4,), jnp.int32)

    def local(x, w, y):
        return jxent.parallel.linear_softmax_cross_entropy(x, w, y, axis_name="model")

    specs = (P("model", None), P(None, "model"), P())
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P("model"))
    args = (put(mesh, x, "model", None), put(mesh, w, None, "model"), put(mesh, y))
    with pytest.raises(ValueError) as info:
        jax.jit(fn)(*args)
    message = str(info.value)
    for words in ("x must be the same on every shard", "axis_name='model'", "varies over"):
        assert words in message, message


@pytest.mark.parametrize("argument", ["labels", "where"])
@pytest.mark.parametrize("form", ["logits", "linear"])
def test_split_labels_or_where_raise(form, argument):
    mesh = jax.make_mesh((1,), ("model",))
    y = put(mesh, jnp.zeros((4,), jnp.int32), "model" if argument == "labels" else None)
    where = put(mesh, jnp.ones((4,), bool), "model" if argument == "where" else None)
    if form == "logits":
        first = put(mesh, jnp.zeros((4, 8)), None, "model")

        def local(a, y, where):
            return jxent.parallel.softmax_cross_entropy_with_integer_labels(
                a, y, axis_name="model", where=where, reduction="sum"
            )

        specs = (P(None, "model"), P(y.sharding.spec[0]), P(where.sharding.spec[0]))
        fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P("model"))
        args = (first, y, where)
    else:
        x, w = put(mesh, jnp.zeros((4, 3))), put(mesh, jnp.zeros((3, 8)), None, "model")

        def local(x, w, y, where):
            return jxent.parallel.linear_softmax_cross_entropy(
                x, w, y, axis_name="model", where=where, reduction="sum"
            )

        specs = (P(), P(None, "model"), P(y.sharding.spec[0]), P(where.sharding.spec[0]))
        fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P("model"))
        args = (x, w, y, where)
    with pytest.raises(ValueError, match=f"{argument} must be the same on every shard"):
        jax.jit(fn)(*args)


def test_unsplit_arguments_pass():
    """The same call with labels and where replicated over the vocabulary axis runs."""
    mesh = jax.make_mesh((1,), ("model",))

    def local(a, y, where):
        return jxent.parallel.softmax_cross_entropy_with_integer_labels(
            a, y, axis_name="model", where=where, reduction="sum"
        )

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "model"), P(), P()), out_specs=P())
    out = jax.jit(fn)(
        put(mesh, jnp.zeros((4, 8)), None, "model"),
        put(mesh, jnp.zeros((4,), jnp.int32)),
        put(mesh, jnp.ones((4,), bool)),
    )
    np.testing.assert_allclose(float(out), 4 * np.log(8), rtol=1e-12)
