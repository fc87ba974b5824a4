"""Multi-device checks of jxent under ``jax.sharding``, on 8 fake CPU devices.

XLA_FLAGS must be set before JAX initialises, and the rest of the test suite runs in one
process with one device, so ``tests/test_parallel.py`` runs this script in a subprocess:

    python tests/parallel_checks.py GROUP      # GROUP in GROUPS below

It prints one JSON list of records ``{"case": str, "checks": {name: [ratio, detail]}}`` where
``ratio <= 1`` means the check passed (``max |a - b| / (atol + rtol |b|)`` for comparisons,
0/2 for boolean checks). Expectations come from the single-device functions (the issue's
criterion: equal to float32 round-off) and from the float64 NumPy reference
(``tests/reference.py``), never from the sharded code under test.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

# The suite's settings (tests/conftest.py): the library must be clean under them.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as ref  # noqa: E402
import reference_linear as ref_linear  # noqa: E402

import jxent  # noqa: E402
import jxent.parallel  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
ROWS = 16
IGNORE = -100
# Every option at once; the class weights are multiples of 1/8 (exact in bfloat16).
ALL_OPTIONS = dict(
    ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=4.0, class_weights=True
)
SINGLE_OPTIONS = {
    "plain": {},
    "ignore_index": dict(ignore_index=IGNORE),
    "smoothing": dict(label_smoothing=0.2, ignore_index=IGNORE),
    "z_loss": dict(z_loss=1e-2),
    "soft_cap": dict(logit_soft_cap=3.0),
    "class_weights": dict(class_weights=True, ignore_index=IGNORE),
}


def make_mesh(shape, kind="explicit"):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AXIS_TYPES[kind],) * 2)


def put(mesh, a, *spec):
    return jax.device_put(a, NamedSharding(mesh, P(*spec)))


def padded_size(num_classes, shards):
    return -(-num_classes // shards) * shards


def make_data(num_classes, seed=0, batch=(ROWS,), opts=None, finite=False):
    """Logits with one -inf, labels with ignored rows, bf16-exact class weights, targets.

    No -inf logit with a soft cap (what the cap makes of -inf is the core's business, tested
    in test_categorical.py) and no ignored label without ignore_index (it would be NaN).
    """
    opts = {} if opts is None else opts
    rng = np.random.default_rng(seed)
    x = 3.0 * rng.standard_normal(batch + (num_classes,))
    flat = x.reshape(-1, num_classes)
    if opts.get("logit_soft_cap") is None and not finite:
        flat[1, 5] = -np.inf
    y = rng.integers(0, num_classes, batch).reshape(-1)
    y[1] = 6 if y[1] == 5 else y[1]
    if opts.get("ignore_index") is not None:
        y[3] = IGNORE
        y[ROWS - 2] = IGNORE
    y = y.reshape(batch)
    cw = rng.integers(4, 17, num_classes) / 8.0
    t = rng.dirichlet(np.ones(num_classes), size=int(np.prod(batch))).reshape(x.shape)
    t.reshape(-1, num_classes)[1, 5] = 0.0
    return x, y, cw, t


def ratio(actual, expected, rtol, atol):
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    if a.shape != b.shape:
        return float("inf"), f"shape {a.shape} != {b.shape}"
    if np.any(np.isnan(a) != np.isnan(b)):
        return float("inf"), "NaN pattern differs"
    ok = ~np.isnan(b)
    err = np.abs(a[ok] - b[ok])
    r = float(np.max(err / (atol + rtol * np.abs(b[ok])), initial=0.0))
    return r, f"max abs err {float(np.max(err, initial=0.0)):.3g}"


def tolerances(dtype, grad_scale):
    """(rtol, atol) for losses and gradients: float32 round-off, or one bfloat16 ulp."""
    if dtype == jnp.bfloat16:
        return (1e-5, 1e-6), (1e-2, 4e-3 * grad_scale)
    return (1e-5, 1e-6), (1e-5, 1e-6 * max(grad_scale, 1.0))


def objective(loss_fn, reduction):
    """A scalar of the loss whose gradient weights every row differently."""
    if reduction == "none":
        return lambda *a: jnp.sum(jnp.sin(loss_fn(*a)))
    return loss_fn


_SINGLE_DEVICE = {}  # single-device results, shared by the cases that differ only in mesh


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def run_pair(sharded, single, sharded_args, single_args, key):
    """Value and gradient of ``sharded`` and of the single-device ``single`` (memoised)."""
    v1, g1 = jax.jit(jax.value_and_grad(sharded))(*sharded_args)
    if key not in _SINGLE_DEVICE:
        v0, g0 = jax.jit(jax.value_and_grad(single))(*single_args)
        _SINGLE_DEVICE[key] = _f64(v0), _f64(g0)
    return (_f64(v1), _f64(g1), *_SINGLE_DEVICE[key])


def compare(dtype, v1, g1, v0, g0, num_classes, ref_value=None, ref_grad=None):
    """Checks for (sharded value/grad) against (single-device value/grad) and the reference."""
    lt, gt = tolerances(dtype, float(np.max(np.abs(g0))))
    checks = {
        "value": ratio(v1, v0, *lt),
        "grad": ratio(g1[..., :num_classes], g0, *gt),
    }
    if g1.shape[-1] > num_classes:
        pad = float(np.max(np.abs(g1[..., num_classes:])))
        checks["padding grad is 0"] = (0.0 if pad == 0 else 2.0, f"max |grad| {pad:.3g}")
    if ref_value is not None:
        # float32 accumulation against float64: a little above round-off.
        checks["value vs float64 reference"] = ratio(v1, ref_value, 1e-4, 1e-5)
        scale = float(np.max(np.abs(ref_grad)))
        rtol, atol = (2e-2, 8e-3 * scale) if dtype == jnp.bfloat16 else (1e-4, 1e-5)
        checks["grad vs float64 reference"] = ratio(g1[..., :num_classes], ref_grad, rtol, atol)
    return {k: [float(r), d] for k, (r, d) in checks.items()}


def reference_integer(x, y, cw, opts, reduction):
    """float64 loss and gradient of ``objective`` for integer labels."""
    kw = dict(opts)
    kw["class_weights"] = cw if kw.pop("class_weights", False) else None
    xr = np.asarray(jnp.asarray(x).astype(jnp.float64))
    first = ref.softmax_cross_entropy_with_integer_labels(xr, y, reduction=reduction, **kw)
    if reduction != "none":
        return first.loss, first.grad_logits
    cot = np.cos(first.per_row)
    res = ref.softmax_cross_entropy_with_integer_labels(
        xr, y, reduction="none", cotangent=cot, **kw
    )
    return np.sum(np.sin(res.per_row)), res.grad_logits


# ------------------------------------------------------------------------------------------
# Group "jit": the ordinary losses under jit with sharded logits (GSPMD / explicit sharding)
# ------------------------------------------------------------------------------------------


def integer_loss(opts, reduction, cw):
    kw = dict(opts)
    use_cw = kw.pop("class_weights", False)

    def loss(x, y, w, where=None):
        return jxent.softmax_cross_entropy_with_integer_labels(
            x, y, where=where, reduction=reduction, class_weights=w if use_cw else None, **kw
        )

    return loss


def jit_integer_case(
    mesh_shape, kind, opts_name, opts, dtype, num_classes, reduction, pad_with="where", finite=False
):
    mesh = make_mesh(mesh_shape, kind)
    vp = padded_size(num_classes, mesh_shape[1])
    x, y, cw, _ = make_data(num_classes, opts=opts, finite=finite)
    x = jnp.asarray(x, dtype)
    # Padding rule under jit: pad the class axis (any values) and mask the padding with a
    # class-shaped `where` (or, without a soft cap, pad with -inf logits instead).
    pad_value = -jnp.inf if pad_with == "-inf" else 1.0
    xp = jnp.pad(x, ((0, 0), (0, vp - num_classes)), constant_values=pad_value)
    cwp = np.pad(cw, (0, vp - num_classes), constant_values=1.0)
    mask = (np.arange(vp) < num_classes)[None, :] | (pad_with == "-inf")
    loss = objective(integer_loss(opts, reduction, cw), reduction)
    with jax.set_mesh(mesh):
        args = (
            put(mesh, xp, "data", "model"),
            put(mesh, y, "data"),
            put(mesh, cwp, "model"),
            put(mesh, mask, None, "model"),
        )
        key = ("jit", opts_name, dtype, num_classes, reduction, finite)
        v1, g1, v0, g0 = run_pair(loss, loss, args, (x, y, cw, None), key)
    rv, rg = reference_integer(x, y, cw, opts, reduction)
    return {
        "case": f"jit {kind} {mesh_shape} {opts_name} {jnp.dtype(dtype).name} V={num_classes} "
        f"{reduction} padded with {pad_with}",
        "checks": compare(dtype, v1, g1, v0, g0, num_classes, rv, rg),
    }


def jit_dense_case(mesh_shape, kind, dtype, num_classes):
    mesh = make_mesh(mesh_shape, kind)
    vp = padded_size(num_classes, mesh_shape[1])
    x, _, _, t = make_data(num_classes, seed=1)
    x = jnp.asarray(x, dtype)
    xp = jnp.pad(x, ((0, 0), (0, vp - num_classes)), constant_values=-jnp.inf)
    tp = np.pad(t, ((0, 0), (0, vp - num_classes)))
    where = np.ones(ROWS, bool)
    where[2] = False

    def loss(x, t, w):
        return jxent.softmax_cross_entropy(
            x, t, where=w, label_smoothing=0.1, z_loss=1e-3, reduction="mean"
        )

    with jax.set_mesh(mesh):
        args = (
            put(mesh, xp, "data", "model"),
            put(mesh, tp, "data", "model"),
            put(mesh, where, "data"),
        )
        v1, g1, v0, g0 = run_pair(loss, loss, args, (x, t, where), ("dense", dtype, num_classes))
    xr = np.asarray(x.astype(jnp.float64))
    r = ref.softmax_cross_entropy(
        xr, t, where=where, label_smoothing=0.1, z_loss=1e-3, reduction="mean"
    )
    return {
        "case": f"jit {kind} {mesh_shape} dense {jnp.dtype(dtype).name} V={num_classes}",
        "checks": compare(dtype, v1, g1, v0, g0, num_classes, r.loss, r.grad_logits),
    }


def group_jit():
    out = []
    for kind in AXIS_TYPES:
        for shape in MESHES:
            out.append(jit_integer_case(shape, kind, "all", ALL_OPTIONS, jnp.float32, 61, "none"))
            out.append(jit_integer_case(shape, kind, "all", ALL_OPTIONS, jnp.bfloat16, 64, "mean"))
            out.append(
                jit_dense_case(shape, kind, jnp.float32 if shape[0] > 2 else jnp.bfloat16, 61)
            )
        for name, opts in SINGLE_OPTIONS.items():
            pad = "where" if "logit_soft_cap" in opts else "-inf"
            out.append(jit_integer_case((2, 4), kind, name, opts, jnp.float32, 61, "mean", pad))
        # Every logit finite: smoothing takes the matrix-product path, over sharded weights.
        opts = dict(label_smoothing=0.1, class_weights=True, ignore_index=IGNORE)
        for dtype in (jnp.float32, jnp.bfloat16):
            out.append(
                jit_integer_case(
                    (4, 2), kind, "smoothing+weights, finite", opts, dtype, 64, "none", finite=True
                )
            )
    return out


# ------------------------------------------------------------------------------------------
# Group "shard_map": jxent.parallel inside shard_map
# ------------------------------------------------------------------------------------------


def parallel_case(mesh_shape, kind, opts_name, opts, dtype, num_classes, reduction, batch=(ROWS,)):
    mesh = make_mesh(mesh_shape, kind)
    vp = padded_size(num_classes, mesh_shape[1])
    x, y, cw, _ = make_data(num_classes, seed=2, batch=batch, opts=opts)
    x = jnp.asarray(x, dtype)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, vp - num_classes)]
    # Padding rule of jxent.parallel: any values, and num_classes=V.
    xp = jnp.pad(x, pad, constant_values=5.0)
    cwp = np.pad(cw, (0, vp - num_classes), constant_values=3.0)
    kw = dict(opts)
    use_cw = kw.pop("class_weights", False)
    lead = (None,) * (len(batch) - 1)

    def local(xl, yl, wl):
        return jxent.parallel.softmax_cross_entropy_with_integer_labels(
            xl,
            yl,
            axis_name="model",
            num_classes=num_classes,
            class_weights=wl if use_cw else None,
            reduction=reduction,
            batch_axis_name="data",
            **kw,
        )

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data", *lead, "model"), P("data", *lead), P("model")),
        out_specs=P("data", *lead) if reduction == "none" else P(),
    )
    single = integer_loss(opts, reduction, cw)
    args = (
        put(mesh, xp, "data", *lead, "model"),
        put(mesh, y, "data", *lead),
        put(mesh, cwp, "model"),
    )
    key = ("shard_map", opts_name, dtype, num_classes, reduction, batch)
    v1, g1, v0, g0 = run_pair(
        objective(sharded, reduction), objective(single, reduction), args, (x, y, cw), key
    )
    flat = (-1, num_classes)
    rv, rg = reference_integer(x.reshape(flat), y.reshape(-1), cw, opts, reduction)
    return {
        "case": f"shard_map {kind} {mesh_shape} {opts_name} {jnp.dtype(dtype).name} "
        f"V={num_classes} {reduction} batch={batch}",
        "checks": compare(dtype, v1, g1, v0, g0, num_classes, rv, rg.reshape(x.shape)),
    }


def parallel_flat_axes_case():
    """The vocabulary split 8 ways over both mesh axes: axis_name=("data", "model")."""
    mesh = make_mesh((2, 4))
    opts = dict(label_smoothing=0.1, ignore_index=IGNORE)
    x, y, cw, _ = make_data(61, seed=3, opts=opts)
    xp = np.pad(x, ((0, 0), (0, 3)), constant_values=-2.0)

    def local(xl, yl):
        return jxent.parallel.softmax_cross_entropy_with_integer_labels(
            xl, yl, axis_name=("data", "model"), num_classes=61, reduction="mean", **opts
        )

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(None, ("data", "model")), P()), out_specs=P()
    )
    single = integer_loss(opts, "mean", cw)
    args = (put(mesh, xp, None, ("data", "model")), put(mesh, y))
    v1, g1, v0, g0 = run_pair(sharded, lambda x, y: single(x, y, None), args, (x, y), "flat")
    rv, rg = reference_integer(x, y, cw, opts, "mean")
    return {
        "case": "shard_map vocabulary over ('data', 'model')",
        "checks": compare(jnp.float64, v1, g1, v0, g0, 61, rv, rg),
    }


def group_shard_map():
    out = []
    for i, shape in enumerate(MESHES):
        for num_classes in (64, 61):
            out.append(
                parallel_case(shape, "explicit", "plain", {}, jnp.float32, num_classes, "mean")
            )
            out.append(
                parallel_case(
                    shape, "explicit", "all", ALL_OPTIONS, jnp.bfloat16, num_classes, "none"
                )
            )
        kind = ("auto", "explicit")[i % 2]
        out.append(parallel_case(shape, kind, "all", ALL_OPTIONS, jnp.float32, 61, "mean"))
    for name, opts in SINGLE_OPTIONS.items():
        out.append(parallel_case((2, 4), "auto", name, opts, jnp.float32, 61, "none"))
    out.append(
        parallel_case((2, 4), "explicit", "all", ALL_OPTIONS, jnp.float32, 61, "none", (4, 4))
    )
    out.append(parallel_flat_axes_case())
    return out


# ------------------------------------------------------------------------------------------
# Group "linear": jxent.parallel.linear_softmax_cross_entropy (vocabulary-sharded w)
# ------------------------------------------------------------------------------------------

HIDDEN = 8


def make_linear_data(num_classes, seed, opts, hidden=HIDDEN):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, hidden))
    w = 0.7 * rng.standard_normal((hidden, num_classes))
    b = 0.3 * rng.standard_normal(num_classes)
    y = rng.integers(0, num_classes, ROWS)
    if opts.get("ignore_index") is not None:
        y[3] = IGNORE
        y[ROWS - 2] = IGNORE
    cw = rng.integers(4, 17, num_classes) / 8.0
    return x, w, b, y, cw


def reference_linear(x, w, b, y, cw, opts, reduction):
    """float64 ``(value, dx, dw, db)`` of ``objective`` through the categorical reference."""
    f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float64))  # noqa: E731
    x, w, b = f64(x), f64(w), f64(b)
    value, g = reference_integer(x @ w + b, y, cw, opts, reduction)
    return value, g @ w.T, x.T @ g, g.sum(axis=0)


def linear_case(mesh_shape, kind, opts_name, opts, dtype, num_classes, reduction, chunk):
    mesh = make_mesh(mesh_shape, kind)
    vp = padded_size(num_classes, mesh_shape[1])
    x, w, b, y, cw = make_linear_data(num_classes, seed=4, opts=opts)
    x, w, b = (jnp.asarray(a, dtype) for a in (x, w, b))
    # Padding rule of jxent.parallel: columns with any values, and num_classes=V.
    wp = jnp.pad(w, ((0, 0), (0, vp - num_classes)), constant_values=0.5)
    bp = jnp.pad(b, (0, vp - num_classes), constant_values=3.0)
    cwp = np.pad(cw, (0, vp - num_classes), constant_values=2.0)
    kw = dict(opts)
    use_cw = kw.pop("class_weights", False)

    def local(xl, wl, bl, yl, cwl):
        return jxent.parallel.linear_softmax_cross_entropy(
            xl,
            wl,
            yl,
            axis_name="model",
            bias=bl,
            num_classes=num_classes,
            class_weights=cwl if use_cw else None,
            reduction=reduction,
            batch_axis_name="data",
            chunk_size=chunk,
            **kw,
        )

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data", None), P(None, "model"), P("model"), P("data"), P("model")),
        out_specs=P("data") if reduction == "none" else P(),
    )

    def single(x, w, b, y):
        return jxent.linear_softmax_cross_entropy(
            x, w, y, bias=b, class_weights=cw if use_cw else None, reduction=reduction, **kw
        )

    obj1, obj0 = objective(sharded, reduction), objective(single, reduction)
    args = (
        put(mesh, x, "data", None),
        put(mesh, wp, None, "model"),
        put(mesh, bp, "model"),
        put(mesh, y, "data"),
        put(mesh, cwp, "model"),
    )
    v1, g1 = jax.jit(jax.value_and_grad(obj1, argnums=(0, 1, 2)))(*args)
    key = ("linear", opts_name, dtype, num_classes, reduction)
    if key not in _SINGLE_DEVICE:
        v0, g0 = jax.jit(jax.value_and_grad(obj0, argnums=(0, 1, 2)))(x, w, b, y)
        _SINGLE_DEVICE[key] = _f64(v0), [_f64(g) for g in g0]
    v0, g0 = _SINGLE_DEVICE[key]
    g1 = [_f64(g) for g in g1]
    rv, *rg = reference_linear(x, w, b, y, cw, opts, reduction)
    checks = {}
    for name, a1, a0, ar in zip(("x", "w", "bias"), g1, g0, rg, strict=True):
        part = compare(dtype, v1, a1, v0, a0, a0.shape[-1], rv, ar)
        checks.update({f"{k} d{name}" if k != "value" else k: c for k, c in part.items()})
    return {
        "case": f"linear {kind} {mesh_shape} {opts_name} {jnp.dtype(dtype).name} "
        f"V={num_classes} {reduction} chunk={chunk}",
        "checks": checks,
    }


def linear_jit_case(mesh_shape, opts_name, opts, dtype, reduction, chunk, w_spec=("model",)):
    """jxent.linear_softmax_cross_entropy itself under jit, arrays typed with Explicit axes."""
    mesh = make_mesh(mesh_shape, "explicit")
    num_classes = 64
    x, w, b, y, cw = make_linear_data(num_classes, seed=5, opts=opts)
    x, w, b = (jnp.asarray(a, dtype) for a in (x, w, b))
    kw = dict(opts)
    use_cw = kw.pop("class_weights", False)

    def loss(x, w, b, y, c):
        return jxent.linear_softmax_cross_entropy(
            x,
            w,
            y,
            bias=b,
            class_weights=c if use_cw else None,
            reduction=reduction,
            chunk_size=chunk,
            **kw,
        )

    obj = objective(loss, reduction)
    args = (
        put(mesh, x, "data", None),
        put(mesh, w, None, *w_spec),
        put(mesh, b, *w_spec),
        put(mesh, y, "data"),
        put(mesh, cw, *w_spec),
    )
    with jax.set_mesh(mesh):
        v1, g1 = jax.jit(jax.value_and_grad(obj, argnums=(0, 1, 2)))(*args)
    v0, g0 = jax.jit(jax.value_and_grad(obj, argnums=(0, 1, 2)))(x, w, b, y, cw)
    rv, *rg = reference_linear(x, w, b, y, cw, opts, reduction)
    checks = {}
    for name, a1, a0, ar in zip(("x", "w", "bias"), g1, g0, rg, strict=True):
        part = compare(dtype, _f64(v1), _f64(a1), _f64(v0), _f64(a0), a0.shape[-1], rv, ar)
        checks.update({f"{k} d{name}" if k != "value" else k: c for k, c in part.items()})
    return {
        "case": f"linear jit explicit {mesh_shape} w{w_spec} {opts_name} "
        f"{jnp.dtype(dtype).name} {reduction} chunk={chunk}",
        "checks": checks,
    }


def linear_padded_case(mesh_shape, opts_name, opts, dtype, num_classes, reduction, chunk, kind):
    """jxent.linear_softmax_cross_entropy under jit, w sharded over the vocabulary, x and the
    labels over the tokens: on Auto axes (plain NamedSharding inputs, GSPMD, no mesh set) or
    Explicit ones. Padding rule: pad w (bias, class weights) with columns at the end to a
    multiple of the model-axis size and pass num_classes=V. On Auto axes the compiled step
    gathers neither w nor x: its only all-gathers are of per-token numbers from each
    vocabulary shard (where GSPMD combines a variadic row reduction)."""
    mesh = make_mesh(mesh_shape, kind)
    vp = padded_size(num_classes, mesh_shape[1])
    # hidden 32: x (16 x 32) is larger than any [tokens, model shards] array.
    x, w, b, y, cw = make_linear_data(num_classes, seed=6, opts=opts, hidden=32)
    x, w, b = (jnp.asarray(a, dtype) for a in (x, w, b))
    wp = jnp.pad(w, ((0, 0), (0, vp - num_classes)), constant_values=0.5)
    bp = jnp.pad(b, (0, vp - num_classes), constant_values=3.0)
    cwp = np.pad(cw, (0, vp - num_classes), constant_values=2.0)
    kw = dict(opts)
    use_cw = kw.pop("class_weights", False)

    def loss(x, w, b, y, c, num_classes=None):
        return jxent.linear_softmax_cross_entropy(
            x,
            w,
            y,
            bias=b,
            class_weights=c if use_cw else None,
            reduction=reduction,
            chunk_size=chunk,
            num_classes=num_classes,
            **kw,
        )

    obj = objective(functools.partial(loss, num_classes=num_classes), reduction)
    args = (
        put(mesh, x, "data", None),
        put(mesh, wp, None, "model"),
        put(mesh, bp, "model"),
        put(mesh, y, "data"),
        put(mesh, cwp, "model"),
    )
    step = jax.jit(jax.value_and_grad(obj, argnums=(0, 1, 2)))
    if kind == "auto":
        v1, g1 = step(*args)
    else:
        with jax.set_mesh(mesh):
            v1, g1 = step(*args)
    key = ("linear padded", opts_name, dtype, num_classes, reduction, chunk)
    if key not in _SINGLE_DEVICE:
        single = objective(loss, reduction)
        v0, g0 = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2)))(x, w, b, y, cw)
        _SINGLE_DEVICE[key] = _f64(v0), [_f64(g) for g in g0]
    v0, g0 = _SINGLE_DEVICE[key]
    rv, *rg = reference_linear(x, w, b, y, cw, opts, reduction)
    checks = {}
    for name, a1, a0, ar in zip(("x", "w", "bias"), g1, g0, rg, strict=True):
        part = compare(dtype, _f64(v1), _f64(a1), v0, a0, a0.shape[-1], rv, ar)
        checks.update({f"{k} d{name}" if k != "value" else k: c for k, c in part.items()})
    if kind == "auto":
        text = step.lower(*args).compile().as_text()
        gathers = [n for op, n in collectives(text) if op == "all-gather"]
        checks["all-gathers only of per-token numbers"] = [
            0.0 if max(gathers, default=0) <= ROWS * mesh_shape[1] else 2.0,
            f"all-gathers: {gathers} (x: {x.size} elements, w: {wp.size})",
        ]
    return {
        "case": f"linear jit {kind} {mesh_shape} {opts_name} {jnp.dtype(dtype).name} "
        f"V={num_classes} (w padded to {vp}) {reduction} chunk={chunk}",
        "checks": checks,
    }


def _issue14_data(num_classes, vp, seed):
    """float64 data for the token-weight / lse / tied-table checks: ``w`` as a ``[V, D]``
    table, its padding rows (to ``vp``) holding NaN and inf (as the bias and class
    weights'), token weights with zeros, and a per-token cotangent for the lse."""
    opts = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=4.0)
    x, w, b, y, cw = make_linear_data(num_classes, seed=seed, opts=opts)
    rng = np.random.default_rng(seed + 100)
    tw = rng.uniform(0.0, 2.0, ROWS)
    tw[[0, 5]] = 0.0
    lse_cot = rng.standard_normal(ROWS)
    table = np.ascontiguousarray(w.T)  # [V, D]
    pad = vp - num_classes
    tp = np.pad(table, ((0, pad), (0, 0)), constant_values=np.nan)
    if pad:
        tp[num_classes, 0] = np.inf
    bp = np.pad(b, (0, pad), constant_values=np.inf)
    cwp = np.pad(cw, (0, pad), constant_values=np.nan)
    return opts, (x, table, b, y, cw, tw, lse_cot), (tp, bp, cwp)


def _issue14_objective(loss_fn, reduction, lse_cot):
    """A scalar of ``(loss, lse)`` with a cotangent on both outputs."""

    def obj(*a):
        out = loss_fn(*a)
        loss, lse = out if isinstance(out, tuple) else (out, None)
        total = jnp.sum(jnp.sin(loss)) if reduction == "none" else loss
        return total if lse is None else total + jnp.sum(lse_cot * jnp.sin(lse))

    return obj


def _issue14_compare(v1, g1, v0, g0, num_classes, w_axis, lse1=None, lse0=None):
    """float64 value / lse / dx, dw, dbias against the one-device call, tight tolerances;
    the padding rows of dw (axis ``w_axis``) and of dbias exactly 0."""
    checks = {"value": ratio(v1, v0, 1e-11, 1e-13)}
    if lse0 is not None:
        checks["lse"] = ratio(lse1, lse0, 1e-11, 1e-13)
    for name, a1, a0 in zip(("x", "w", "bias"), g1, g0, strict=True):
        a1 = np.asarray(a1, np.float64)
        a0 = np.asarray(a0, np.float64)
        axis = w_axis if name == "w" else a1.ndim - 1
        real = np.take(a1, np.arange(a0.shape[axis]), axis=axis)
        scale = float(np.max(np.abs(a0)))
        checks[f"d{name}"] = ratio(real, a0, 1e-10, 1e-12 * max(scale, 1.0))
        if a1.shape != a0.shape:
            pad = np.take(a1, np.arange(a0.shape[axis], a1.shape[axis]), axis=axis)
            m = float(np.max(np.abs(pad)))
            checks[f"padding d{name} is 0"] = (0.0 if m == 0 else 2.0, f"max |grad| {m:.3g}")
    return {k: [float(r), d] for k, (r, d) in checks.items()}


def linear_options_shard_map_case(mesh_shape, num_classes, w_layout, reduction, with_normalizer):
    """Issue 14 in jxent.parallel.linear_softmax_cross_entropy under shard_map, float64:
    token_weights, return_lse (a cotangent on the lse too) or a normalizer, the weight as
    a [V, D] table (w_layout="vd", split P("model", None)) or [D, V]; padding rows holding
    NaN / inf. Values and dx, dw, dbias against the one-device function."""
    mesh = make_mesh(mesh_shape, "explicit")
    vp = padded_size(num_classes, mesh_shape[1])
    opts, (x, table, b, y, cw, tw, lse_cot), (tp, bp, cwp) = _issue14_data(num_classes, vp, 7)
    return_lse = not with_normalizer
    normalizer = 23.0 if with_normalizer else None
    w0 = table if w_layout == "vd" else table.T
    wp = tp if w_layout == "vd" else tp.T
    w_spec = ("model", None) if w_layout == "vd" else (None, "model")

    def local(xl, wl, bl, yl, cwl, twl):
        return jxent.parallel.linear_softmax_cross_entropy(
            xl,
            wl,
            yl,
            axis_name="model",
            bias=bl,
            class_weights=cwl,
            num_classes=num_classes,
            reduction=reduction,
            batch_axis_name="data",
            chunk_size=(8, 6),
            token_weights=twl,
            normalizer=normalizer,
            return_lse=return_lse,
            w_layout=w_layout,
            **opts,
        )

    out = P("data") if reduction == "none" else P()
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data", None), P(*w_spec), P("model"), P("data"), P("model"), P("data")),
        out_specs=(out, P("data")) if return_lse else out,
    )

    def single(x, w, b):
        return jxent.linear_softmax_cross_entropy(
            x,
            w,
            y,
            bias=b,
            class_weights=cw,
            reduction=reduction,
            token_weights=tw,
            normalizer=normalizer,
            return_lse=return_lse,
            w_layout=w_layout,
            **opts,
        )

    args = (
        put(mesh, x, "data", None),
        put(mesh, wp, *w_spec),
        put(mesh, bp, "model"),
        put(mesh, y, "data"),
        put(mesh, cwp, "model"),
        put(mesh, tw, "data"),
    )
    obj1 = _issue14_objective(sharded, reduction, lse_cot)
    v1, g1 = jax.jit(jax.value_and_grad(obj1, argnums=(0, 1, 2)))(*args)
    v0, g0 = jax.jit(jax.value_and_grad(_issue14_objective(single, reduction, lse_cot), (0, 1, 2)))(
        x, w0, b
    )
    lse1 = lse0 = None
    if return_lse:
        lse1 = jax.jit(sharded)(*args)[1]
        lse0 = single(x, w0, b)[1]
    checks = _issue14_compare(v1, g1, v0, g0, num_classes, 0 if w_layout == "vd" else 1, lse1, lse0)
    what = "normalizer" if with_normalizer else "return_lse"
    return {
        "case": f"linear shard_map {mesh_shape} token_weights {what} w_layout={w_layout} "
        f"float64 V={num_classes} (padded to {vp}) {reduction}",
        "checks": checks,
    }


def linear_options_explicit_case(mesh_shape, w_split, reduction, with_normalizer, mesh_context):
    """Issue 14 in jxent.linear_softmax_cross_entropy on arrays typed with Explicit axes,
    float64: token_weights, return_lse, a normalizer (with "mean"), the weight as a
    [V, D] table split over "model" (padded, NaN / inf rows: jxent.parallel under the
    hood) or whole (each device's tokens against the whole table); under jax.set_mesh or
    with no mesh set (the arrays' types name it)."""
    mesh = make_mesh(mesh_shape, "explicit")
    num_classes = 61 if w_split else 64
    vp = padded_size(num_classes, mesh_shape[1]) if w_split else num_classes
    opts, (x, table, b, y, cw, tw, lse_cot), (tp, bp, cwp) = _issue14_data(num_classes, vp, 8)
    normalizer = 29.0 if with_normalizer else None

    def loss(x, w, b, y, c, t, num_classes=None):
        return jxent.linear_softmax_cross_entropy(
            x,
            w,
            y,
            bias=b,
            class_weights=c,
            reduction=reduction,
            num_classes=num_classes,
            chunk_size=(8, 8),
            token_weights=t,
            normalizer=normalizer,
            return_lse=True,
            w_layout="vd",
            **opts,
        )

    v_spec = ("model",) if w_split else (None,)
    args = (
        put(mesh, x, "data", None),
        put(mesh, tp, *v_spec, None),
        put(mesh, bp, *v_spec),
        put(mesh, y, "data"),
        put(mesh, cwp, *v_spec),
        put(mesh, tw, "data"),
    )
    obj1 = _issue14_objective(functools.partial(loss, num_classes=num_classes), reduction, lse_cot)
    with jax.set_mesh(mesh) if mesh_context else contextlib.nullcontext():
        v1, g1 = jax.jit(jax.value_and_grad(obj1, argnums=(0, 1, 2)))(*args)
        lse1 = jax.jit(functools.partial(loss, num_classes=num_classes))(*args)[1]
    obj0 = _issue14_objective(loss, reduction, lse_cot)
    v0, g0 = jax.jit(jax.value_and_grad(obj0, argnums=(0, 1, 2)))(x, table, b, y, cw, tw)
    lse0 = loss(x, table, b, y, cw, tw)[1]
    checks = _issue14_compare(v1, g1, v0, g0, num_classes, 0, lse1, lse0)
    return {
        "case": f"linear jit explicit {mesh_shape} w_layout=vd w{v_spec} token_weights "
        f"return_lse normalizer={normalizer} float64 V={num_classes} (padded to {vp}) "
        f"{reduction}{'' if mesh_context else ' (no mesh set)'}",
        "checks": checks,
    }


def linear_filtered_shard_map_case(mesh_shape, eps=1e-3):
    """Gradient filtering (filter_eps) under shard_map with the vocabulary split, float64:
    each shard filters its own blocks, sharing the bound by the whole vocabulary's width
    (a psum of the shard count), so the gradients stay within the documented loss of
    mass of the one-device unfiltered ones (|dx_n - dx_n'| <= eps u_n max_k |w_k|,
    ||dw - dw'||_F <= eps sum_n u_n ||x_n||, u_n = 2 for a summed cross-entropy), while
    some blocks are skipped (their dw columns exactly 0)."""
    num_classes, shards = 64, mesh_shape[1]
    mesh = make_mesh(mesh_shape, "explicit")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((ROWS, HIDDEN))
    w = 0.3 * rng.standard_normal((HIDDEN, num_classes))
    b = -3.0 * np.log1p(np.arange(num_classes))  # a peaked (Zipf) softmax
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(num_classes, p=row) for row in p])

    def local(xl, wl, bl, yl):
        return jxent.parallel.linear_softmax_cross_entropy(
            xl, wl, yl, axis_name="model", bias=bl, reduction="sum", batch_axis_name="data",
            chunk_size=(8, 4), filter_eps=eps,
        )  # fmt: skip

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data", None), P(None, "model"), P("model"), P("data")),
        out_specs=P(),
    )

    def single(x, w, b):
        return jxent.linear_softmax_cross_entropy(x, w, y, bias=b, reduction="sum")

    args = (put(mesh, x, "data", None), put(mesh, w, None, "model"), put(mesh, b, "model"),
            put(mesh, y, "data"))  # fmt: skip
    v1, (dx1, dw1, db1) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(*args)
    v0, (dx0, dw0, db0) = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2)))(x, w, b)
    dx1, dw1 = np.asarray(dx1, np.float64), np.asarray(dw1, np.float64)
    dx0, dw0 = np.asarray(dx0, np.float64), np.asarray(dw0, np.float64)
    unit = 2.0
    tight = 1e-12
    dx_bound = eps * unit * np.max(np.abs(w), axis=1)[None, :] + tight
    dw_bound = eps * unit * float(np.sum(np.linalg.norm(x, axis=1))) + tight
    zeros = int(np.sum((dw1 == 0) & (dw0 != 0)))
    checks = {
        "value": ratio(v1, v0, 1e-11, 1e-13),
        "dx within the filtering bound": (
            float(np.max(np.abs(dx1 - dx0) / dx_bound)),
            "max |dx - dx0| / bound",
        ),
        "dw within the filtering bound": (
            float(np.linalg.norm(dw1 - dw0) / dw_bound),
            "||dw - dw0||_F / bound",
        ),
        "some blocks skipped": (0.0 if zeros else 2.0, f"{zeros} dw entries exactly 0"),
    }
    return {
        "case": f"linear shard_map {mesh_shape} filter_eps={eps} float64 V={num_classes} "
        f"over {shards} shards",
        "checks": {k: [float(r), d] for k, (r, d) in checks.items()},
    }


def group_linear_options():
    """Issue 14's options (token weights, normalizer, lse, [V, D] tables) across devices."""
    return [
        linear_options_shard_map_case((2, 4), 61, "vd", "mean", False),
        linear_options_shard_map_case((4, 2), 61, "dv", "mean", True),
        linear_options_explicit_case((2, 4), True, "mean", True, mesh_context=False),
        linear_options_explicit_case((2, 4), True, "none", False, mesh_context=True),
        linear_options_explicit_case((4, 2), False, "mean", False, mesh_context=True),
        linear_filtered_shard_map_case((2, 4)),
    ]


def group_linear():
    out = [linear_case((2, 4), "explicit", "plain", {}, jnp.float32, 64, "mean", 6)]
    for i, shape in enumerate(MESHES):
        kind = ("explicit", "auto")[i % 2]
        out.append(linear_case(shape, kind, "all", ALL_OPTIONS, jnp.float32, 61, "none", (8, 6)))
        num_classes = (64, 61)[i % 2]
        out.append(
            linear_case(shape, kind, "all", ALL_OPTIONS, jnp.bfloat16, num_classes, "mean", None)
        )
    for name in ("smoothing", "soft_cap", "class_weights"):
        out.append(
            linear_case((2, 4), "explicit", name, SINGLE_OPTIONS[name], jnp.float32, 61, "mean", 5)
        )
    out.append(linear_jit_case((2, 4), "all", ALL_OPTIONS, jnp.float32, "none", 8))
    out.append(linear_jit_case((1, 8), "all", ALL_OPTIONS, jnp.bfloat16, "mean", None))
    out.append(linear_jit_case((4, 2), "plain", {}, jnp.float32, "sum", (8, 16), w_spec=()))
    # Auto axes, V = 2048 and 2045 (padded): vocabulary blocks of 1024 (and 1536: a shorter
    # last block) take 128 columns or more from each of 8 groups, token blocks of 8 one row
    # from each of 8 groups, so up to 8 shards of each axis slice their own part.
    for i, shape in enumerate(MESHES):
        for num_classes in (2048, 2045):
            out.append(
                linear_padded_case(
                    shape, "all", ALL_OPTIONS, jnp.float32, num_classes, "none", (8, 1024), "auto"
                )
            )
        num_classes = (2048, 2045)[i % 2]
        out.append(
            linear_padded_case(
                shape, "all", ALL_OPTIONS, jnp.bfloat16, num_classes, "mean", (8, 1536), "auto"
            )
        )
        out.append(linear_padded_case(shape, "plain", {}, jnp.float32, 2045, "mean", None, "auto"))
    # Explicit axes with the same padding rule (jxent.parallel under the hood).
    for shape, dtype, reduction, chunk in (
        ((2, 4), jnp.float32, "none", (8, 1024)),
        ((1, 8), jnp.bfloat16, "mean", None),
    ):
        out.append(
            linear_padded_case(shape, "all", ALL_OPTIONS, dtype, 2045, reduction, chunk, "explicit")
        )
    return out + group_linear_options()


# ------------------------------------------------------------------------------------------
# Group "float32": x64 disabled, as users train; padding holding +inf / NaN
# ------------------------------------------------------------------------------------------


def float_tolerance(dtype, terms):
    """``8 eps log2(terms)``, as tests/checks.py (not importable here: it imports pytest)."""
    return 8 * float(jnp.finfo(dtype).eps) * max(float(np.log2(max(terms, 2))), 1.0)


def bound_ratio(actual, expected, bound):
    """``max |actual - expected| / bound`` (inf if the NaN patterns differ)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape or np.any(np.isnan(a) != np.isnan(e)):
        return float("inf"), f"shape {a.shape} vs {e.shape} or NaN pattern differs"
    ok = ~np.isnan(e)
    err = np.abs(a - e)[ok]
    r = float(np.max(err / np.maximum(np.asarray(bound)[ok], 1e-300), initial=0.0))
    return r, f"max abs err {float(np.max(err, initial=0.0)):.3g}"


def float32_case(form, mesh_shape, dtype, pad_value, reduction):
    """jxent.parallel with x64 disabled against the float64 NumPy reference of the exact
    input values, within float_tolerance times the reference's error scales."""
    num_classes, hidden = 61, 8
    vp = padded_size(num_classes, mesh_shape[1])
    opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=30.0, ignore_index=IGNORE)
    rng = np.random.default_rng(9)
    logits = 3.0 * rng.standard_normal((ROWS, vp))
    x = rng.standard_normal((ROWS, hidden))
    w = rng.standard_normal((hidden, vp)) / np.sqrt(hidden)
    b = 0.3 * rng.standard_normal(vp) + 100.0
    cw = rng.integers(4, 17, vp) / 8.0
    for a in (logits, w, b, cw):
        a[..., num_classes:] = pad_value
    y = rng.integers(0, num_classes, ROWS).astype(np.int32)
    y[3] = IGNORE
    rounded = [np.asarray(jnp.asarray(a, dtype)) for a in (logits, x, w, b)]
    exact = [a.astype(np.float64) for a in rounded]
    cot = np.linspace(0.5, 1.5, ROWS) if reduction == "none" else 0.75
    with jax.enable_x64(False):
        mesh = make_mesh(mesh_shape)
        out = P("data") if reduction == "none" else P()
        kw = dict(
            axis_name="model",
            num_classes=num_classes,
            reduction=reduction,
            batch_axis_name="data",
            **opts,
        )
        labels, weights = put(mesh, y, "data"), put(mesh, cw.astype(np.float32), "model")
        if form == "logits":

            def local(z, yl, cwl):
                return jxent.parallel.softmax_cross_entropy_with_integer_labels(
                    z, yl, class_weights=cwl, **kw
                )

            specs = (P("data", "model"), P("data"), P("model"))
            loss = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out)
            args = (put(mesh, rounded[0], "data", "model"),)
        else:

            def local(xl, wl, bl, yl, cwl):
                return jxent.parallel.linear_softmax_cross_entropy(
                    xl, wl, yl, bias=bl, class_weights=cwl, chunk_size=(8, 5), **kw
                )

            specs = (P("data", None), P(None, "model"), P("model"), P("data"), P("model"))
            loss = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out)
            args = (
                put(mesh, rounded[1], "data", None),
                put(mesh, rounded[2], None, "model"),
                put(mesh, rounded[3], "model"),
            )

        def run(*a):
            if form == "logits":
                value, vjp = jax.vjp(lambda z: loss(z, labels, weights), *a)
            else:
                value, vjp = jax.vjp(lambda *p: loss(*p, labels, weights), *a)
            return value, vjp(jnp.asarray(cot, value.dtype))

        value, grads = jax.jit(run)(*args)
        value, grads = _f64(value), [_f64(g) for g in grads]
    if form == "logits":
        r = ref_linear.linear_softmax_cross_entropy(
            exact[0][:, :num_classes], np.eye(num_classes), y,
            class_weights=cw[:num_classes], reduction=reduction, cotangent=cot, **opts,
        )  # fmt: skip
        wanted = [("dlogits", r.grad_x, r.grad_x_scale)]
        terms = ROWS * vp
    else:
        r = ref_linear.linear_softmax_cross_entropy(
            exact[1], exact[2], y, bias=exact[3], class_weights=cw, reduction=reduction,
            num_classes=num_classes, cotangent=cot, **opts,
        )  # fmt: skip
        wanted = [
            ("dx", r.grad_x, r.grad_x_scale),
            ("dw", r.grad_w[:, :num_classes], r.grad_w_scale[:, :num_classes]),
            ("dbias", r.grad_bias[:num_classes], r.grad_bias_scale[:num_classes]),
        ]
        terms = ROWS * hidden * vp
    tol = float_tolerance(jnp.float32, terms)
    grad_tol = tol + (float_tolerance(dtype, terms) if dtype == jnp.bfloat16 else 0.0)
    checks = {"value": bound_ratio(value, r.loss, tol * r.loss_scale)}
    for (name, e, scale), g in zip(wanted, grads, strict=True):
        real = g[..., :num_classes] if name != "dx" else g
        checks[name] = bound_ratio(real, e, grad_tol * scale)
        if name != "dx":
            pad = float(np.max(np.abs(g[..., num_classes:]), initial=0.0))
            checks[f"{name} padding is 0"] = (0.0 if pad == 0 else 2.0, f"max {pad:.3g}")
    return {
        "case": f"float32 {form} {mesh_shape} {jnp.dtype(dtype).name} padding={pad_value} "
        f"{reduction}",
        "checks": {k: [float(q), d] for k, (q, d) in checks.items()},
    }


def group_float32():
    out = []
    for form in ("logits", "linear"):
        for shape, dtype, pad_value, reduction in (
            ((2, 4), jnp.float32, np.inf, "mean"),
            ((1, 8), jnp.float32, np.nan, "none"),
            ((4, 2), jnp.bfloat16, np.nan, "sum"),
        ):
            out.append(float32_case(form, shape, dtype, pad_value, reduction))
    return out


# ------------------------------------------------------------------------------------------
# Group "hlo": no vocabulary-sized collective in the compiled programs
# ------------------------------------------------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<op>all-gather|all-reduce|all-to-all|"
    r"collective-permute|reduce-scatter)(?:-start)?\("
)
_ARRAY = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text):
    """``[(op, largest result element count)]`` of every collective in the HLO text."""
    out = []
    for m in _COLLECTIVE.finditer(hlo_text):
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            for dims in _ARRAY.findall(m.group("shape"))
        ]
        out.append((m.group("op"), max(sizes, default=0)))
    return out


def hlo_record(case, text, local_classes, expect_no_all_gather=False, max_gather=None):
    """Checks of the compiled HLO: no collective result of ``local_classes`` elements or more;
    no all-gather at all, or (``max_gather``) none of more than that many elements."""
    ops = collectives(text)
    biggest = max((n for _, n in ops), default=0)
    gathers = [n for op, n in ops if op == "all-gather"]
    checks = {
        "collectives found": (0.0 if ops else 2.0, f"{len(ops)} collectives"),
        "no vocabulary-sized collective": (
            0.0 if biggest < local_classes else 2.0,
            f"largest collective result {biggest} elements, V_local = {local_classes}: {ops}",
        ),
    }
    if expect_no_all_gather:
        checks["no all-gather"] = (0.0 if not gathers else 2.0, f"all-gathers: {gathers}")
    if max_gather is not None:
        checks[f"all-gathers of at most {max_gather} elements"] = (
            0.0 if max(gathers, default=0) <= max_gather else 2.0,
            f"all-gathers: {gathers}",
        )
    return {"case": case, "checks": {k: [float(r), d] for k, (r, d) in checks.items()}}


def group_hlo():
    vocab, rows = 8192, 32
    out = []
    for kind in AXIS_TYPES:
        mesh = make_mesh((2, 4), kind)
        local_classes = vocab // 4
        for dtype in (jnp.float32, jnp.bfloat16):
            x = put(mesh, jnp.zeros((rows, vocab), dtype), "data", "model")
            y = put(mesh, jnp.zeros((rows,), jnp.int32), "data")
            cw = put(mesh, jnp.ones((vocab,), jnp.float32), "model")
            t = put(mesh, jnp.zeros((rows, vocab), jnp.float32), "data", "model")
            sparse = jax.value_and_grad(integer_loss(ALL_OPTIONS, "mean", None))
            dense = jax.value_and_grad(
                lambda x, t: jxent.softmax_cross_entropy(
                    x, t, label_smoothing=0.1, z_loss=1e-3, reduction="mean"
                )
            )
            with jax.set_mesh(mesh):
                for name, fn, args in (
                    ("integer labels", sparse, (x, y, cw)),
                    ("dense", dense, (x, t)),
                ):
                    text = jax.jit(fn).lower(*args).compile().as_text()
                    out.append(
                        hlo_record(
                            f"hlo jit {kind} {name} {jnp.dtype(dtype).name}", text, local_classes
                        )
                    )
            # Per-device temporary memory: no [rows, V_local] float32 buffer (a gather or
            # select that XLA cannot partition, or a converted copy of the logits).
            # Without the soft cap: a bfloat16 soft cap costs such a buffer on one device too.
            no_cap = {k: v for k, v in ALL_OPTIONS.items() if k != "logit_soft_cap"}
            fn = jax.value_and_grad(integer_loss(no_cap, "mean", None))
            with jax.set_mesh(mesh):
                temp = jax.jit(fn).lower(x, y, cw).compile().memory_analysis().temp_size_in_bytes
            limit = rows // 2 * local_classes * 4 // 2
            out[-1]["checks"]["no [rows, V_local] temporary"] = [
                0.0 if temp < limit else 2.0,
                f"{temp} bytes of temporaries per device (limit {limit})",
            ]
        # shard_map form: no all-gather at all, and the backward pass adds no collective.
        for dtype in (jnp.float32, jnp.bfloat16):
            x = put(mesh, jnp.zeros((rows, vocab), dtype), "data", "model")
            y = put(mesh, jnp.zeros((rows,), jnp.int32), "data")
            cw = put(mesh, jnp.ones((vocab,), jnp.float32), "model")
            opts = {k: v for k, v in ALL_OPTIONS.items() if k != "class_weights"}

            def local(xl, yl, wl, opts=opts):
                return jxent.parallel.softmax_cross_entropy_with_integer_labels(
                    xl, yl, axis_name="model", class_weights=wl, **opts
                )

            per_row = jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(P("data", "model"), P("data"), P("model")),
                out_specs=P("data"),
            )

            def fn(*args, per_row=per_row):
                return jnp.sum(per_row(*args))

            fwd = jax.jit(fn).lower(x, y, cw).compile().as_text()
            both = jax.jit(jax.value_and_grad(fn)).lower(x, y, cw).compile().as_text()
            name = f"hlo shard_map {kind} {jnp.dtype(dtype).name}"
            out.append(hlo_record(name, both, local_classes, expect_no_all_gather=True))
            n_fwd, n_both = len(collectives(fwd)), len(collectives(both))
            out[-1]["checks"]["backward adds no collective"] = [
                0.0 if n_both == n_fwd else 2.0,
                f"{n_fwd} collectives forward, {n_both} forward + backward",
            ]
        # Rows longer than the CPU row limit (one device would reduce them in pieces):
        # on a mesh the rows stay whole, so nothing of the logits' size is gathered.
        long_vocab = 2 * 32768
        x = put(mesh, jnp.zeros((rows, long_vocab), jnp.float32), "data", "model")
        y = put(mesh, jnp.zeros((rows,), jnp.int32), "data")
        cw = put(mesh, jnp.ones((long_vocab,), jnp.float32), "model")
        fn = jax.value_and_grad(integer_loss(ALL_OPTIONS, "mean", None))
        with jax.set_mesh(mesh):
            text = jax.jit(fn).lower(x, y, cw).compile().as_text()
        out.append(hlo_record(f"hlo jit {kind} long rows", text, long_vocab // 4))
    return out


def group_hlo_linear():
    """The fused linear loss with w sharded over the vocabulary: no w-sized collective."""
    tokens, hidden, vocab = 64, 64, 8192
    local_classes = vocab // 4
    out = group_hlo_linear_auto()
    mesh = make_mesh((2, 4))
    for dtype in (jnp.float32, jnp.bfloat16):
        x = put(mesh, jnp.zeros((tokens, hidden), dtype), "data", None)
        w = put(mesh, jnp.zeros((hidden, vocab), dtype), None, "model")
        y = put(mesh, jnp.zeros((tokens,), jnp.int32), "data")
        opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=30.0, ignore_index=IGNORE)

        def local(x, w, y, opts=opts):
            return jxent.parallel.linear_softmax_cross_entropy(
                x, w, y, axis_name="model", batch_axis_name="data", chunk_size=512, **opts
            )

        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data", None), P(None, "model"), P("data")),
            out_specs=P(),
        )

        def plain(x, w, y, opts=opts):
            return jxent.linear_softmax_cross_entropy(x, w, y, chunk_size=512, **opts)

        for name, fn in (("shard_map", sharded), ("jit explicit", plain)):
            with jax.set_mesh(mesh):
                step = jax.value_and_grad(fn, argnums=(0, 1))
                text = jax.jit(step).lower(x, w, y).compile().as_text()
            # The largest allowed is dw's all-reduce over the data axis, of w's local
            # columns (hidden * V_local, as for any data-parallel weight); a gathered w
            # (hidden * V) or a row block of full logits (tokens / 2 * V) is larger.
            out.append(
                hlo_record(
                    f"hlo linear {name} {jnp.dtype(dtype).name}",
                    text,
                    hidden * local_classes + 1,
                    expect_no_all_gather=True,
                )
            )
    return out


def group_hlo_linear_auto():
    """jxent.linear_softmax_cross_entropy under jit on Auto axes (plain NamedSharding inputs,
    GSPMD), streaming over vocabulary and token blocks: no collective larger than dw's
    data-axis all-reduce of w's local columns, and no all-gather of w or x (the only ones:
    per-token partial sums from each vocabulary shard, [tokens, model shards] at most, where
    GSPMD combines a variadic row reduction). V = 8192 divides every model-axis size;
    V = 8190 is padded to 8192 and passed as num_classes."""
    tokens, hidden, padded = 64, 64, 8192
    opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=30.0, ignore_index=IGNORE)
    out = []
    for shape in MESHES:
        mesh = make_mesh(shape, "auto")
        local_classes = padded // shape[1]
        for dtype, num_classes in ((jnp.float32, 8192), (jnp.bfloat16, 8190)):
            x = put(mesh, jnp.zeros((tokens, hidden), dtype), "data", None)
            w = put(mesh, jnp.zeros((hidden, padded), dtype), None, "model")
            y = put(mesh, jnp.zeros((tokens,), jnp.int32), "data")

            def loss(x, w, y, num_classes=num_classes):
                return jxent.linear_softmax_cross_entropy(
                    x, w, y, chunk_size=(16, 1024), num_classes=num_classes, **opts
                )

            step = jax.value_and_grad(loss, argnums=(0, 1))
            text = jax.jit(step).lower(x, w, y).compile().as_text()
            name = f"hlo linear jit auto {shape} {jnp.dtype(dtype).name} V={num_classes}"
            out.append(
                hlo_record(name, text, hidden * local_classes + 1, max_gather=tokens * shape[1])
            )
    return out


GROUPS = {
    "jit": group_jit,
    "shard_map": group_shard_map,
    "linear": group_linear,
    "linear_options": group_linear_options,
    "hlo": lambda: group_hlo() + group_hlo_linear(),
    "float32": group_float32,
}


def main(argv):
    (group,) = argv
    assert jax.device_count() == 8, jax.devices()
    records = GROUPS[group]()
    print(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1:])
