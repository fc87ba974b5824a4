"""The ``"pallas_tpu"`` implementation of the fused cross-entropy (jxent/_fused/pallas_tpu.py,
issue 25).

On CPU the kernels run in Pallas' interpreter (the same kernel bodies, as XLA loops),
x64 off, float32 and bfloat16 inputs, against the independent float64 NumPy reference
``tests/reference_linear.py`` (the loss and its gradients w.r.t. ``x``, ``w`` and
``bias``) to tolerances derived from epsilon and the reference's error scales
(``checks.float_tolerance``), never tuned: every option of the XLA implementation, one
at a time and all at once, with blocks of 16 tokens x 128 columns (Mosaic's tiles) that
divide neither N nor V. ``tests/test_fused_losses.py`` holds it to the fused reference
too (token weights, the normalizer, ``return_lse``; float64). Then the choice (``"auto"``
takes ``"xla"`` until the kernels are timed on a TPU; other losses and a vocabulary split
take ``"xla"``), the
VMEM-sized blocks, and a compile for TPU v5e without a device (libtpu, in a subprocess
as ``tests/test_accelerators.py``): Mosaic lowers every kernel, and the temporary
memory of ``value_and_grad`` is at most 1 MiB.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys

import checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_linear as ref
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent._fused import engine, pallas_tpu

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20
N, D, V = 44, 32, 300
BLOCKS = (16, 128)  # Mosaic-shaped blocks: N = 2 * 16 + 12, V = 2 * 128 + 44
PAD = 20  # padding columns after V (holding NaN, +inf, a finite number)


def make_case(seed, dtype, pad=0, pad_value=np.nan, layout="dv"):
    """``(x, w, b, y)`` rounded to ``dtype`` (w in ``layout``), and their float64 values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)) * 1.5
    w = rng.normal(size=(D, V + pad)) * 0.5
    b = rng.normal(size=(V + pad,)) * 0.5
    w[:, V:], b[V:] = pad_value, pad_value
    y = rng.integers(0, V, size=(N,)).astype(np.int32)
    jx, jw, jb = (jnp.asarray(a, dtype) for a in (x, w, b))
    exact = tuple(np.asarray(a, np.float64) for a in (jx, jw, jb))
    if layout == "vd":
        jw = jw.T
    return (jx, jw, jb, jnp.asarray(y)), (*exact, y)


def run(x, w, b, y, opts):
    """The loss and its gradients w.r.t. ``(x, w, bias)``, implementation="pallas_tpu"."""
    kw = {k: v for k, v in opts.items() if k != "cotangent"}

    def loss(x, w, b):
        out = jxent.linear_softmax_cross_entropy(
            x, w, y, bias=b, chunk_size=BLOCKS, implementation="pallas_tpu", **kw
        )
        return jnp.sum(out * opts.get("cotangent", 1.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)
    return out, grads


def check(dtype, opts, seed=0, pad=0, pad_value=np.nan, layout="dv"):
    with checks.x64_off():
        (x, w, b, y), (ex, ew, eb, ey) = make_case(seed, dtype, pad, pad_value, layout)
        jopts = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in opts.items()}
        out, (gx, gw, gb) = run(x, w, b, y, dict(jopts, w_layout=layout))
    if layout == "vd":
        gw = gw.T
    ref_opts = {k: v for k, v in opts.items() if k not in ("w_layout",)}
    r = ref.linear_softmax_cross_entropy(ex, ew, ey, bias=eb, **ref_opts)
    terms = N * D * V
    value_tol = checks.float_tolerance(jnp.float32, terms)
    grad_tol = value_tol + (checks.float_tolerance(dtype, terms) if dtype == jnp.bfloat16 else 0)
    assert out.dtype == jnp.float32
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    ref.assert_within(out, r.loss, value_tol * r.loss_scale, "loss")
    ref.assert_within(gx, r.grad_x, grad_tol * r.grad_x_scale, "dx")
    ref.assert_within(gw[:, :V], r.grad_w[:, :V], grad_tol * r.grad_w_scale[:, :V], "dw")
    ref.assert_within(gb[:V], r.grad_bias[:V], grad_tol * r.grad_bias_scale[:V], "dbias")
    # Padding columns: exactly zero gradient, whatever they hold.
    assert np.all(np.asarray(gw[:, V:], np.float64) == 0)
    assert np.all(np.asarray(gb[V:], np.float64) == 0)


RNG = np.random.default_rng(7)
#: One option at a time (the dtypes alternate), then all of them at once.
OPTIONS = {
    "ignore_index": dict(ignore_index=3, reduction="mean"),
    "where": dict(where=RNG.random(N) < 0.7, reduction="sum"),
    "label_smoothing": dict(label_smoothing=0.2, reduction="none"),
    "z_loss": dict(z_loss=1e-2, reduction="mean"),
    "soft_cap": dict(logit_soft_cap=3.0, reduction="none"),
    "class_weights": dict(class_weights=RNG.uniform(0.5, 2.0, size=V), reduction="mean"),
    "cotangent": dict(reduction="none", cotangent=RNG.normal(size=N)),
}
ALL = dict(
    ignore_index=5,
    where=RNG.random(N) < 0.8,
    label_smoothing=0.1,
    z_loss=1e-3,
    logit_soft_cap=4.0,
    class_weights=RNG.uniform(0.5, 2.0, size=V + PAD),
    num_classes=V,
    reduction="mean",
)


@pytest.mark.parametrize(
    "name, dtype",
    [(n, (jnp.float32, jnp.bfloat16)[i % 2]) for i, n in enumerate(OPTIONS)],
    ids=[f"{n}-{('float32', 'bfloat16')[i % 2]}" for i, n in enumerate(OPTIONS)],
)
def test_each_option_matches_reference(name, dtype):
    check(dtype, OPTIONS[name], seed=len(name))


def test_padding_columns():
    """Padding columns holding +inf (w and bias; NaN below) take no part, with smoothing."""
    check(jnp.float32, dict(num_classes=V, label_smoothing=0.3, reduction="none"), 1, PAD, np.inf)


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_every_option_at_once(dtype, layout):
    check(dtype, ALL, seed=2, pad=PAD, layout=layout)


def test_logit_offset_and_label_smoothing_without_cancellation():
    """Logits near 1000: the smoothing's gap sum is re-centred, never ``m sum c - sum c z``."""
    with checks.x64_off():
        (x, w, b, y), (ex, ew, eb, ey) = make_case(3, jnp.float32)
        b = b + 1000.0
        opts = dict(label_smoothing=0.5, reduction="none")
        out, _ = run(x, w, b, y, opts)
    r = ref.linear_softmax_cross_entropy(ex, ew, ey, bias=np.asarray(b, np.float64), **opts)
    # The loss is O(10): its error must not scale with the offset.
    tol = checks.float_tolerance(jnp.float32, N * D * V)
    ref.assert_within(out, r.loss, tol * (r.loss_scale / 1000 + 10 * np.abs(r.loss)), "loss")


def test_only_wanted_gradients_and_matching_xla():
    """Gradient w.r.t. x alone runs the dx kernel alone; values match "xla" closely."""
    with checks.x64_off():
        (x, w, b, y), _ = make_case(4, jnp.float32)

        def f(impl):
            return jax.jit(
                jax.grad(
                    lambda x: jxent.linear_softmax_cross_entropy(
                        x, w, y, bias=b, chunk_size=BLOCKS, implementation=impl
                    )
                )
            )

        jaxpr = str(jax.make_jaxpr(f("pallas_tpu"))(x))
        assert "dx_kernel" in jaxpr and "dw_kernel" not in jaxpr
        np.testing.assert_allclose(f("pallas_tpu")(x), f("xla")(x), rtol=1e-4, atol=1e-6)


def test_symbolic_token_count():
    """jax.export with a symbolic number of tokens (the driver pads them to its block)."""
    with checks.x64_off():
        (x, w, b, y), _ = make_case(5, jnp.float32)

        def f(x, w, y):
            return jxent.linear_softmax_cross_entropy(x, w, y, implementation="pallas_tpu")

        (n,) = jax.export.symbolic_shape("n")
        args = [jax.ShapeDtypeStruct(s, a.dtype) for s, a in (((n, D), x), (w.shape, w), ((n,), y))]
        exported = jax.export.export(jax.jit(f), platforms=["cpu"])(*args)
        np.testing.assert_allclose(exported.call(x, w, y), f(x, w, y), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The choice, the blocks
# --------------------------------------------------------------------------------------------


def test_auto_takes_xla_and_the_name_takes_the_kernels():
    """ "auto" runs "xla" (first in the registry until the kernels are timed on a TPU);
    implementation="pallas_tpu" runs the kernels, on any platform."""
    x, w = jnp.ones((8, 4)), jnp.ones((4, 16))
    y = jnp.zeros((8,), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda x: jxent.linear_softmax_cross_entropy(x, w, y))(x))
    assert "forward_kernel" not in jaxpr
    explicit = lambda x: jxent.linear_softmax_cross_entropy(x, w, y, implementation="pallas_tpu")  # noqa: E731
    assert "forward_kernel" in str(jax.make_jaxpr(explicit)(x))
    assert list(engine.IMPLEMENTATIONS) == ["xla", "pallas_tpu"]


def test_other_losses_and_filtering_take_xla():
    x, w = jnp.ones((8, 4)), jnp.ones((4, 16))
    y = jnp.zeros((8,), jnp.int32)
    with pytest.raises(ValueError, match="implementation='pallas_tpu' does not support"):
        jxent.linear_entropy(x, w, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="implementation='pallas_tpu' does not support"):
        jxent.linear_softmax_cross_entropy(x, w, y, filter_eps=0.1, implementation="pallas_tpu")
    # "auto" runs them (on "xla").
    assert jnp.isfinite(jxent.linear_entropy(x, w))


def test_tpu_blocks_fit_vmem_and_tile():
    for n, d, v, size in [
        (8192, 2304, 256000, 2),
        (8192, 4096, 128256, 2),
        (8192, 4096, 128256, 4),
        (100, 64, 1000, 4),
    ]:
        tb, vb = pallas_tpu.tpu_blocks(n, d, v, size)
        assert tb == n or tb % 16 == 0, (n, tb)
        assert vb == v or vb % 128 == 0, (v, vb)
        assert 2 * (tb + vb) * d * size + max(tb, vb) * d * 4 <= pallas_tpu.VMEM_BUDGET
    # A divisor of V where one of at least half the largest block exists.
    assert pallas_tpu.tpu_blocks(8192, 2304, 256000, 2) == (512, 512)
    assert 128256 % pallas_tpu.tpu_blocks(8192, 4096, 128256, 2)[1] == 0


# --------------------------------------------------------------------------------------------
# A TPU v5e compile without a device (libtpu)
# --------------------------------------------------------------------------------------------

#: Small enough to compile in seconds, large enough for many blocks, dividing neither the
#: token nor the vocabulary block. V is a multiple of 128: XLA:TPU lays a [D, V] array
#: with a ragged last tile out column-major, and Mosaic's operands are row-major (a copy of
#: w, and of dw, at V = 50000: 49 MiB in bfloat16).
TPU_SHAPE = (2000, 512, 50048)


def tpu_compile(target: str) -> None:
    """Compiles value_and_grad of the fused cross-entropy with implementation="pallas_tpu"
    (bfloat16 and float32) for ``target`` and prints its memory as JSON."""
    topo = topologies.get_topology_desc(f"{target}=1x1", "tpu", chips_per_host_bounds=(1, 1, 1))
    sharding = NamedSharding(topologies.make_mesh(topo, (1,), ("d",)), P())
    n, d, v = TPU_SHAPE
    out = {}
    # A caller's precision is the float32 products' (Mosaic rejects it for bfloat16).
    for dtype, precision in ((jnp.bfloat16, None), (jnp.float32, None), (jnp.bfloat16, "highest")):

        def f(x, w, y, precision=precision):
            return jxent.linear_softmax_cross_entropy(
                x, w, y, implementation="pallas_tpu", precision=precision
            )

        args = [
            jax.ShapeDtypeStruct(s, t, sharding=sharding)
            for s, t in (((n, d), dtype), ((d, v), dtype), ((n,), jnp.int32))
        ]
        program = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
        out[jnp.dtype(dtype).name + ("" if precision is None else "_" + precision)] = {
            "temp_mib": program.memory_analysis().temp_size_in_bytes / MiB,
            "mosaic_calls": program.as_text().count("tpu_custom_call"),
        }
    print(json.dumps(out))


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None
    and (sys.platform != "linux" or platform.machine() != "x86_64"),
    reason="libtpu is only published for Linux x86-64",
)
def test_tpu_compiled_temp_memory_is_at_most_1_mib():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "v5e"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    for dtype in ("bfloat16", "float32", "bfloat16_highest"):
        assert mem[dtype]["mosaic_calls"] == 3, mem  # forward, dx, dw: Mosaic kernels
        assert mem[dtype]["temp_mib"] <= 1.0, mem


if __name__ == "__main__":
    tpu_compile(sys.argv[1] if len(sys.argv) > 1 else "v5e")
