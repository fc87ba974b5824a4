"""Gradient filtering (``filter_eps=``, jxent/_fused/filtering.py) against the rule it
documents and the bound it promises.

* The rule, exactly (float64): a block's products are replaced by its targets' when,
  for every token of the block, the ``L1`` mass of ``dloss/dz`` off the token's label
  is at most ``eps * u_n * width / V`` (``u_n = 2 |g_n|`` for the plain
  cross-entropy: its coefficients are ``g_n`` for the softmax and ``g_n`` for the
  label). The expected gradients come from the float64 NumPy reference's ``dloss/dz``
  with the skipped entries zeroed (``tests/reference_linear.py``), for ``eps`` chosen
  between the blocks' critical values so that no decision is near a tie.
* The bound, in the precision users train in (x64 off, float32 and bfloat16): the
  filtered gradients within the rounding tolerance of the float64 reference plus the
  documented loss of mass ``eps * u_n``.
* Targets are never filtered, for every loss that has them: blocks whose only mass is
  a target keep it exactly, and the skipped blocks' weight-gradient columns are exactly
  0 (the products did not run) where the unfiltered ones are not.
"""

from __future__ import annotations

import checks
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference_fused as ref_fused
import reference_linear as ref

import jxent
from jxent._fused import filtering
from jxent._fused.plan import MIN_VOCAB_RUN, block_groups

jax.config.update("jax_enable_x64", True)


def peaked_inputs(n, d, v, seed, dtype=np.float64, power=3.0):
    """A trained-like softmax: a Zipf prior ``p_k ~ (k + 1)^-power`` through the bias
    (frequent classes first, as a tokenizer numbers them) times the hidden states' own
    logits; labels drawn from the softmax, so that most fall on the frequent classes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, v)) / np.sqrt(d)
    b = -power * np.log1p(np.arange(v))
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(v, p=row) for row in p])
    cast = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)  # noqa: E731
    return cast(x), cast(w), cast(b), labels


def blocks_of(start, stop, width):
    return [(c, min(c + width, stop)) for c in range(start, stop, width)]


def critical_eps(dz, labels, token_blocks, vocab_blocks, unit, v):
    """Each (token block, vocabulary block)'s smallest eps that skips it."""
    off = np.abs(dz)
    off[np.arange(dz.shape[0]), labels] = 0.0
    out = {}
    for t0, t1 in token_blocks:
        for c0, c1 in vocab_blocks:
            mass = off[t0:t1, c0:c1].sum(axis=1)
            out[(t0, t1, c0, c1)] = float(np.max(mass * v / (unit[t0:t1] * (c1 - c0))))
    return out


def filtered_reference(r, x, w, labels, skipped):
    """The reference's gradients with the skipped blocks' off-label entries dropped."""
    dz = r.grad_z.copy()
    for t0, t1, c0, c1 in skipped:
        keep = dz[np.arange(t0, t1), labels[t0:t1]].copy()
        dz[t0:t1, c0:c1] = 0.0
        inside = (labels[t0:t1] >= c0) & (labels[t0:t1] < c1)
        dz[np.arange(t0, t1)[inside], labels[t0:t1][inside]] = keep[inside]
    return dz @ w.T, x.T @ dz, dz.sum(axis=0)


@pytest.mark.parametrize(
    "schedule, n, v, chunk_size, token_block, vocab_block",
    [
        ("streaming", 8, 96, (8, 16), 8, 16),
        ("streaming", 9, 96, (4, 16), 4, 16),
        # The single pass filters column chunks of its whole-vocabulary blocks.
        ("single_pass", 9, 9000, (4, 9000), 4, filtering.SINGLE_PASS_CHUNK),
    ],
)
def test_filtered_gradient_follows_the_rule(schedule, n, v, chunk_size, token_block, vocab_block):
    d = 5
    x, w, b, labels = peaked_inputs(n, d, v, seed=3)
    # Contiguous blocks (no groups), as blocks_of lists them.
    assert block_groups(n, token_block) == 1
    if schedule == "streaming":
        assert block_groups(v, vocab_block, MIN_VOCAB_RUN) == 1
    r = ref.linear_softmax_cross_entropy(x, w, labels, bias=b, reduction="sum")
    unit = np.full(n, 2.0)  # u_n = 2 |g_n|, g_n = 1 for a sum
    tblocks, vblocks = blocks_of(0, n, token_block), blocks_of(0, v, vocab_block)
    crit = critical_eps(r.grad_z, labels, tblocks, vblocks, unit, v)
    levels = np.unique(list(crit.values()))
    levels = levels[(levels > 1e-300) & (levels <= 1.0)]
    # eps between consecutive critical values, 2% or more from each: float64 rounding
    # (1e-15 relative) cannot tip a decision.
    mids = [np.sqrt(a * b) for a, b in zip(levels[:-1], levels[1:], strict=True) if b > 1.05 * a]
    assert len(mids) >= 2, levels  # the data must give some blocks to skip and keep
    picked = {mids[0], mids[len(mids) // 2], mids[-1]}

    def grads(eps):
        def loss(x, w, b):
            return jxent.linear_softmax_cross_entropy(
                x, w, labels, bias=b, reduction="sum", chunk_size=chunk_size,
                schedule=schedule, filter_eps=eps,
            )  # fmt: skip

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)

    for eps in sorted(picked):
        skipped = [blk for blk, c in crit.items() if c <= eps]
        assert 0 < len(skipped) < len(crit)
        gx, gw, gb = grads(float(eps))
        ex, ew, eb = filtered_reference(r, x, w, labels, skipped)
        checks.assert_close(gx, ex, rtol=1e-9, atol=1e-12)
        checks.assert_close(gw, ew, rtol=1e-9, atol=1e-12)
        checks.assert_close(gb, eb, rtol=1e-9, atol=1e-12)


def _ce_unit(z, labels, g, smoothing, class_weights, z_loss, v):
    """u_n of the cross-entropy: |g_n| (|scale_n| + (1 - a) w_y + a / V), with
    scale_n = (1 - a) w_y + a sum(w) / V + 2 z_loss lse_n (its coefficients)."""
    cw = np.ones(v) if class_weights is None else class_weights
    lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
    w_y = cw[labels]
    scale = (1 - smoothing) * w_y + smoothing * cw.sum() / v + 2 * z_loss * lse
    return np.abs(g) * (np.abs(scale) + (1 - smoothing) * w_y + smoothing / v)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("eps", ["auto", 1e-3])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1, "class_weights": True, "z_loss": 1e-3},
        {"reduction": "mean", "w_layout": "vd", "chunk_size": (8, 64)},
        {"reduction": "none", "chunk_size": (16, 64)},
    ],
    ids=["plain", "smoothing-weights-zloss", "mean-vd-streaming", "none"],
)
def test_low_precision_within_the_bound(dtype, eps, options):
    n, d, v = 32, 8, 256
    x, w, b, labels = peaked_inputs(n, d, v, seed=5, dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(1)
    opts = dict(options)
    reduction = opts.pop("reduction", "sum")
    cw = rng.uniform(0.5, 2.0, v) if opts.pop("class_weights", False) else None
    layout = opts.get("w_layout", "dv")
    g = rng.standard_normal(n) if reduction == "none" else 1.0
    r = ref.linear_softmax_cross_entropy(
        x, w, labels, bias=b, reduction=reduction, class_weights=cw, cotangent=g,
        label_smoothing=opts.get("label_smoothing", 0.0), z_loss=opts.get("z_loss", 0.0),
    )  # fmt: skip
    with checks.x64_off():
        xs, ws, bs = (jnp.asarray(a, dtype) for a in (x, w.T if layout == "vd" else w, b))

        def loss(x, w, b):
            out = jxent.linear_softmax_cross_entropy(
                x, w, jnp.asarray(labels, jnp.int32), bias=b, reduction=reduction,
                class_weights=None if cw is None else jnp.asarray(cw, jnp.float32),
                filter_eps=eps, **opts,
            )  # fmt: skip
            return jnp.sum(out * jnp.asarray(g, jnp.float32)) if reduction == "none" else out

        gx, gw, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(xs, ws, bs)
    gw = np.asarray(gw, np.float64)
    gw = gw.T if layout == "vd" else gw
    eps_value = filtering.auto_eps(dtype) if eps == "auto" else eps
    scale = 1.0 / n if reduction == "mean" else 1.0
    unit = scale * _ce_unit(x @ w + b, labels, g, opts.get("label_smoothing", 0.0), cw,
                            opts.get("z_loss", 0.0), v)  # fmt: skip
    tol = checks.float_tolerance(dtype, v)
    # |dx_n - dx_n^f| <= eps u_n max_k |w_kd|; |dw - dw^f|_F <= eps sum_n u_n |x_n|_2;
    # |db - db^f|_1 <= eps sum_n u_n (the module docstring's bound).
    ref.assert_within(
        gx, r.grad_x, tol * r.grad_x_scale + eps_value * unit[:, None] * np.abs(w).max(1), "dx"
    )  # noqa: E501
    w_err = np.abs(gw - r.grad_w) - tol * r.grad_w_scale
    assert np.sqrt(np.sum(np.maximum(w_err, 0) ** 2)) <= eps_value * np.sum(
        unit * np.linalg.norm(x, axis=1)
    )  # noqa: E501
    b_err = np.abs(np.asarray(gb, np.float64) - r.grad_bias) - tol * r.grad_bias_scale
    assert np.sum(np.maximum(b_err, 0)) <= eps_value * np.sum(unit)


def _cold_setup(n=8, d=4, v=64, k=1, seed=0):
    """Logits near -60 everywhere but one hot class per token in the first block, and the
    targets (labels, a teacher's top-k) in the last blocks: those blocks' only mass is
    their targets', so filtering skips them and must keep the targets' products."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x[:, 0] = 1.0
    w = 0.05 * rng.standard_normal((d, v))
    w[0, :] = -60.0
    w[0, rng.integers(0, 16, n)] = 10.0
    w[0, :16] = np.where(w[0, :16] > 0, w[0, :16], 0.0)
    targets = rng.choice(np.arange(32, v), size=(n, k), replace=True)
    return x, w, targets


def _check_cold(fn, x, w, expected_dx, expected_dw, cold):
    grads = {}
    for eps in (None, 1e-6):
        grads[eps] = jax.jit(jax.grad(lambda x, w: fn(x, w, eps), argnums=(0, 1)))(x, w)  # noqa: B023
    for gx, gw in grads.values():
        checks.assert_close(gx, expected_dx, rtol=1e-9, atol=1e-12)
        checks.assert_close(gw, expected_dw, rtol=1e-9, atol=1e-12)
    # Skipped blocks: no product ran, so their off-target columns are exactly 0.
    off = np.asarray(grads[1e-6][1])[:, cold]
    assert np.all(off == 0.0)
    assert np.any(np.asarray(grads[None][1])[:, cold] != 0.0)


@pytest.mark.parametrize("n, token_block", [(8, 8), (256, 128)], ids=["one-block", "grouped"])
def test_targets_kept_cross_entropy_and_log_probs(n, token_block):
    """The blocks' targets kept; with 256 tokens in blocks of 128 the token blocks are
    grouped (64 groups of runs of 2: jxent._fused.blocks), so a skipped block's rows are
    read from grouped views."""
    x, w, targets = _cold_setup(n=n)
    assert block_groups(n, token_block) == (1 if n == token_block else 64)
    chunk = (token_block, 16)
    labels = targets[:, 0]
    v = w.shape[1]
    cold = np.setdiff1d(np.arange(16, v), labels)
    r = ref.linear_softmax_cross_entropy(x, w, labels, reduction="sum")
    fn = lambda x, w, eps: jxent.linear_softmax_cross_entropy(  # noqa: E731
        x, w, labels, reduction="sum", chunk_size=chunk, filter_eps=eps
    )
    _check_cold(fn, x, w, r.grad_x, r.grad_w, cold)
    rl = ref_fused.linear_log_probs(x, w, labels)
    fn = lambda x, w, eps: jnp.sum(  # noqa: E731
        jxent.linear_log_probs(x, w, labels, chunk_size=chunk, filter_eps=eps)
    )
    _check_cold(fn, x, w, rl.grad_x, rl.grad_w, cold)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_targets_kept_top_k_distillation(alpha):
    x, w, top = _cold_setup(k=3, seed=1)
    n, v = x.shape[0], w.shape[1]
    rng = np.random.default_rng(2)
    top = np.stack([rng.choice(np.arange(32, v), 3, replace=False) for _ in range(n)])
    log_p = np.log(rng.dirichlet(np.ones(3), n))
    labels = top[:, 1]
    cold = np.setdiff1d(np.arange(16, v), top)
    y = labels
    r = ref_fused.linear_distillation_loss(x, w, y, (top, log_p), alpha=alpha, reduction="sum")
    fn = lambda x, w, eps: jxent.linear_distillation_loss(  # noqa: E731
        x, w, y, (top, log_p), alpha=alpha, reduction="sum", chunk_size=(8, 16), filter_eps=eps
    )
    _check_cold(fn, x, w, r.grad_x, r.grad_w, cold)


def test_filtering_is_a_conditional():
    """Filtering adds a real conditional (XLA runs one branch), and only when asked for
    (the lowering already holds one per-platform switch)."""
    x, w, b, labels = peaked_inputs(8, 4, 64, seed=0)

    def cases(eps):
        f = lambda x, w: jxent.linear_softmax_cross_entropy(  # noqa: E731
            x, w, labels, chunk_size=(8, 16), filter_eps=eps
        )
        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text().count("stablehlo.case")

    assert cases("auto") > cases(None)


@pytest.mark.parametrize("bad", ["fast", -1e-3, 2.0, float("nan"), [1e-3]])
def test_bad_filter_eps_named(bad):
    x, w, _, labels = peaked_inputs(4, 3, 10, seed=0)
    checks.assert_raises_naming(
        (TypeError, ValueError),
        jxent.linear_softmax_cross_entropy,
        (x, w, labels),
        {"filter_eps": bad},
        ["filter_eps"],
    )


def test_vmap_filters_each_example():
    """Under vmap the conditional is a select: each example's gradient is still its own
    filtered one (the decisions are per example)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 4))
    w = 0.2 * rng.standard_normal((4, 64))
    b = -3.0 * np.log1p(np.arange(64))
    y = rng.integers(0, 4, (3, 8))

    def grad(eps):
        f = lambda x, y: jxent.linear_softmax_cross_entropy(  # noqa: E731
            x, w, y, bias=b, chunk_size=(8, 16), filter_eps=eps
        )
        return jax.grad(f)

    batched = jax.jit(jax.vmap(grad(1e-3)))(x, y)
    one_by_one = np.stack([jax.jit(grad(1e-3))(x[i], y[i]) for i in range(3)])
    unfiltered = jax.jit(jax.vmap(grad(None)))(x, y)
    checks.assert_close(batched, one_by_one, rtol=1e-12, atol=1e-15)
    assert np.max(np.abs(np.asarray(batched) - np.asarray(unfiltered))) > 0  # some skipped


def _cond_branch_dots(fn, *args):
    """For every two-way conditional in ``fn``'s jaxpr (not the per-platform switches):
    the number of matrix products in each of its branches (sorted), inner jaxprs
    included."""

    def dots(jaxpr):
        count = 0
        for eqn in jaxpr.eqns:
            count += eqn.primitive.name == "dot_general"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                count += dots(sub)
        return count

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "cond" and len(eqn.params["branches"]) == 2:
                found.append(sorted(dots(b.jaxpr) for b in eqn.params["branches"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize(
    "loss, ahead",
    [
        ({"label_smoothing": 0.0}, True),
        ({"label_smoothing": 0.1}, False),
        ("log_probs", True),
        ("entropy", False),
    ],
    ids=["xent", "xent-smoothing", "log-probs", "entropy"],
)
def test_streaming_decides_before_making_the_logits(loss, ahead):
    """The streaming schedule decides a block of a loss of the softmax form (the plain
    cross-entropy, log p(label)) from the forward pass's numbers: a skipped block runs
    no product at all, its logits included (one conditional holds the block's three
    products). Otherwise (label smoothing, the entropy) the block's logits are made
    first and only the two gradient products are conditional."""
    x, w, b, labels = peaked_inputs(8, 4, 64, seed=0)
    kw = {"chunk_size": (8, 16), "filter_eps": "auto"}

    def f(x, w):
        if loss == "log_probs":
            return jnp.sum(jxent.linear_log_probs(x, w, labels, **kw))
        if loss == "entropy":
            return jxent.linear_entropy(x, w, **kw)
        return jxent.linear_softmax_cross_entropy(x, w, labels, **kw, **loss)

    branches = _cond_branch_dots(jax.grad(f, argnums=(0, 1)), x, w)
    expected = [0, 3] if ahead else [0, 2]
    assert branches and all(b == expected for b in branches), branches


def _temp_bytes(fn, *specs) -> int:
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("schedule", ["single_pass", "streaming"])
def test_filtering_takes_no_large_temporary(dtype, schedule):
    """Compiled temporary memory (XLA's exact figure): with filtering, the single pass
    takes less than half a ``[D, V]`` float32 accumulator more than without, and
    streaming no more than its record (``4 N (blocks + 1)`` bytes) and a quarter of a
    float32 copy of ``x``. Two regressions this catches: a data-dependent loop over the
    targets inside the single pass's chunk conditionals (XLA:CPU copied the ``[D, V]``
    accumulator), and bfloat16 rows of ``x`` read without ``_backend.index_bits``
    (XLA:CPU converted the whole of ``x`` to float32)."""
    with checks.x64_off():
        if schedule == "single_pass":
            n, d, v, kw = 1024, 256, 16384, {}
        else:
            n, d, v, kw = 4096, 256, 8192, {"chunk_size": (256, 1024)}
        specs = (
            jax.ShapeDtypeStruct((n, d), jnp.dtype(dtype)),
            jax.ShapeDtypeStruct((d, v), jnp.dtype(dtype)),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )

        def grad(eps):
            def loss(x, w, y):
                return jxent.linear_softmax_cross_entropy(
                    x, w, y, filter_eps=eps, schedule=schedule, **kw
                )

            return jax.grad(loss, argnums=(0, 1))

        plain, filtered = (_temp_bytes(grad(eps), *specs) for eps in (None, "auto"))
    if schedule == "single_pass":
        assert filtered <= plain + d * v * 4 // 2, (filtered, plain)
    else:
        record = 4 * n * (v // 1024 + 1)
        assert filtered <= plain + record + n * d * 4 // 4, (filtered, plain)
