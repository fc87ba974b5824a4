"""The fused losses beyond cross-entropy (issue 14): ``linear_log_probs`` (and its
entropy), ``linear_entropy``, ``linear_softmax_kl_divergence`` and
``linear_distillation_loss`` and ``linear_softmax_jensen_shannon_divergence`` (the
teacher's top-k, or its hidden states and weight: the names ``kl_h``, ``distill_h`` and
``jsd_h`` below), and the cross-entropy's ``token_weights``, ``normalizer`` and
``return_lse``.

Each is checked against the float64 NumPy reference of ``tests/reference_fused.py``
(values and the gradients w.r.t. ``x``, ``w``, ``bias``): in float64 to a tight
tolerance, in float32 and bfloat16 with x64 off to tolerances derived from the dtype's
epsilon and the reference's error scales (``checks.float_tolerance``), with
``jax.test_util.check_grads``, with blocks that do not divide the tokens or the
vocabulary, with the single-pass schedule, all-ignored batches, the teacher's ``-inf``
classes, padding columns holding NaN and inf, temperatures, soft caps and ``where``; then
against the unfused composition of jxent's own logits losses, for bad inputs (errors at
trace time naming the argument), and for the structural memory bound (compiled
temporary memory at a language model's output layer, compile only).
"""

from __future__ import annotations

import functools
import math

import checks
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import reference_fused as ref
from hypothesis import given

import jxent
from jxent._fused import engine

MiB = 2**20
NAMES = ("log_probs", "entropy", "kl", "distill", "ce", "kl_h", "distill_h", "jsd_h")
#: The losses whose teacher is given as hidden states (x_t, w_t, b_t), and their top-k twin.
HIDDEN = {"kl_h": "kl", "distill_h": "distill", "jsd_h": "jsd"}
PAD_VALUES = {"+inf": np.inf, "-inf": -np.inf, "nan": np.nan, "finite": 7.0}

# --------------------------------------------------------------------------------------------
# One call for every function: options static (hashable), arrays in a dict
# --------------------------------------------------------------------------------------------


def call(name, x, w, b, data, opts):
    """The jxent function ``name`` on ``(x, w, b)``; its outputs as a tuple."""
    common = dict(
        bias=b,
        where=data.get("where"),
        logit_soft_cap=opts.get("soft_cap"),
        chunk_size=opts.get("chunk_size"),
        num_classes=opts.get("num_classes"),
        implementation=opts.get("implementation"),
    )
    t = opts.get("temperature", 1.0)
    reduced = dict(
        reduction=opts.get("reduction", "mean"),
        token_weights=data.get("token_weights"),
        normalizer=data.get("normalizer"),
        schedule=opts.get("schedule", "auto"),
    )
    teacher = (data.get("indices"), data.get("log_probs"))
    if name in HIDDEN:
        name, teacher = HIDDEN[name], (data["x_t"], data["w_t"], data["b_t"])
    if name == "log_probs":
        entropy = opts.get("return_entropy", False)
        out = jxent.linear_log_probs(
            x, w, data["labels"], temperature=t, return_entropy=entropy, **common
        )
        return out if entropy else (out,)
    if name == "entropy":
        red = opts.get("reduction", "none")
        tw, norm = data.get("token_weights"), data.get("normalizer")
        return (
            jxent.linear_entropy(
                x,
                w,
                temperature=t,
                reduction=red,
                token_weights=tw,
                normalizer=norm,
                **common,
            ),
        )
    if name == "kl":
        return (
            jxent.linear_softmax_kl_divergence(x, w, teacher, temperature=t, **common, **reduced),
        )
    if name == "distill":
        alpha = opts.get("alpha", 0.5)
        return (
            jxent.linear_distillation_loss(
                x, w, data["labels"], teacher, alpha=alpha, temperature=t, **common, **reduced
            ),
        )
    if name == "jsd":
        return (
            jxent.linear_softmax_jensen_shannon_divergence(
                x, w, teacher, beta=opts["beta"], temperature=t, **common, **reduced
            ),
        )
    if name == "ce":
        lse = opts.get("return_lse", False)
        out = jxent.linear_softmax_cross_entropy(
            x,
            w,
            data["labels"],
            class_weights=data.get("class_weights"),
            return_lse=lse,
            **common,
            **reduced,
        )
        return out if lse else (out,)
    raise ValueError(name)


def reference(name, x, w, b, data, opts, cts):
    """The float64 NumPy reference of ``call`` and the gradients of ``sum(ct * out)``."""
    common = dict(
        bias=b,
        where=data.get("where"),
        logit_soft_cap=opts.get("soft_cap"),
        num_classes=opts.get("num_classes"),
    )
    t = opts.get("temperature", 1.0)
    reduced = dict(
        reduction=opts.get("reduction", "mean"),
        token_weights=data.get("token_weights"),
        normalizer=data.get("normalizer"),
    )
    teacher = (data.get("indices"), data.get("log_probs"))
    if name in HIDDEN:
        name, teacher = HIDDEN[name], (data["x_t"], data["w_t"], data["b_t"])
    if name == "log_probs":
        return ref.linear_log_probs(
            x,
            w,
            data["labels"],
            temperature=t,
            return_entropy=opts.get("return_entropy", False),
            cotangents=cts,
            **common,
        )
    if name == "entropy":
        red = opts.get("reduction", "none")
        return ref.linear_entropy(
            x,
            w,
            temperature=t,
            reduction=red,
            cotangent=cts[0],
            token_weights=data.get("token_weights"),
            normalizer=data.get("normalizer"),
            **common,
        )
    if name == "kl":
        return ref.linear_softmax_kl_divergence(
            x, w, teacher, temperature=t, cotangent=cts[0], **common, **reduced
        )
    if name == "distill":
        return ref.linear_distillation_loss(
            x,
            w,
            data["labels"],
            teacher,
            alpha=opts.get("alpha", 0.5),
            temperature=t,
            cotangent=cts[0],
            **common,
            **reduced,
        )
    if name == "jsd":
        return ref.linear_softmax_jensen_shannon_divergence(
            x, w, teacher, beta=opts["beta"], temperature=t, cotangent=cts[0], **common, **reduced
        )
    if name == "ce":
        lse = opts.get("return_lse", False)
        return ref.linear_softmax_cross_entropy(
            x,
            w,
            data["labels"],
            class_weights=data.get("class_weights"),
            return_lse=lse,
            cotangent=cts[0],
            lse_cotangent=cts[1] if lse else None,
            **common,
            **reduced,
        )
    raise ValueError(name)


def per_token_outputs(name, opts):
    """Which outputs are per token (the others are scalars)."""
    if name == "log_probs":
        return (True, True) if opts.get("return_entropy") else (True,)
    default = "none" if name == "entropy" else "mean"
    loss = opts.get("reduction", default) == "none"
    return (loss, True) if name == "ce" and opts.get("return_lse") else (loss,)


@functools.cache
def vjp_function(name, opts_key, jit=True):
    """``(x, w, b, data, cts) -> (outputs, (dx, dw, db))``, compiled once per options."""
    opts = dict(opts_key)

    def run(x, w, b, data, cts):
        out, vjp = jax.vjp(lambda x, w, b: call(name, x, w, b, data, opts), x, w, b)
        return out, vjp(tuple(c.astype(o.dtype) for c, o in zip(cts, out, strict=True)))

    return jax.jit(run) if jit else run


def key(opts):
    return tuple(sorted(opts.items()))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_data(
    name,
    batch,
    d,
    v,
    *,
    pad=0,
    k=4,
    seed=0,
    pad_value="finite",
    offset=0.0,
    where=False,
    token_weights=False,
    class_weights=False,
    normalizer=None,
    dropped_teacher=True,
    w_scale=1.0,
):
    """float64 inputs ``(x, w, b)`` and a dict of the other arrays (NumPy).

    The teacher's top-k: ``k`` classes (duplicates possible) with the log-probabilities of
    part of a distribution (``P < 1``); with ``dropped_teacher`` some entries are
    ``-inf`` at index -1, a padding column, far out of range, or a real class. A teacher
    as hidden states (``kl_h``, ``distill_h``, ``jsd_h``): ``x_t`` with ``D + 3`` features, ``w_t``
    and ``b_t`` padded as ``w`` and ``b``; with ``dropped_teacher`` a few classes the
    teacher rules out (``b_t = -inf``).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(batch + (d,))
    w = rng.standard_normal((d, v + pad)) * (w_scale / np.sqrt(d))
    b = 0.5 * rng.standard_normal(v + pad) + offset
    fill = PAD_VALUES[pad_value]
    w[:, v:], b[v:] = fill, fill
    data = {"labels": rng.integers(0, v, batch).astype(np.int32)}
    if name in ("kl", "distill", "jsd"):
        indices = rng.integers(0, v, batch + (k,)).astype(np.int32)
        if name == "jsd":  # the generalised JSD takes distinct classes (a top-k)
            indices = np.argsort(rng.random(batch + (v,)), -1)[..., :k].astype(np.int32)
        probs = rng.dirichlet(np.ones(k + 1), batch)[..., :k]
        log_probs = np.log(probs)
        if dropped_teacher:
            drop = rng.random(batch + (k,)) < 0.3
            log_probs[drop] = -np.inf
            junk = rng.choice(np.array([-1, v, v + pad + 5, 0], np.int32), batch + (k,))
            indices[drop] = junk[drop]
        data["indices"], data["log_probs"] = indices, log_probs
    if name in HIDDEN:
        dt = d + 3
        data["x_t"] = rng.standard_normal(batch + (dt,))
        w_t = rng.standard_normal((dt, v + pad)) * (1.5 * w_scale / np.sqrt(dt))
        b_t = 0.5 * rng.standard_normal(v + pad) + offset
        w_t[:, v:], b_t[v:] = fill, fill
        if dropped_teacher:
            b_t[rng.choice(v, 2, replace=False)] = -np.inf
        data["w_t"], data["b_t"] = w_t, b_t
    if where:
        data["where"] = rng.random(batch) < 0.75
    if token_weights:
        data["token_weights"] = rng.uniform(0.2, 2.0, batch)
    if class_weights:
        cw = rng.uniform(0.5, 2.0, v + pad)
        cw[v:] = fill
        data["class_weights"] = cw
    if normalizer is not None:
        data["normalizer"] = np.float64(normalizer)
    return (x, w, b), data


def make_cts(name, opts, batch, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(
        rng.uniform(0.5, 1.5, batch) if per_token else np.float64(0.75)
        for per_token in per_token_outputs(name, opts)
    )


def to_jax(data, float_dtype):
    """The data dict as JAX arrays: floats in ``float_dtype``, integers int32."""
    out = {}
    for k, a in data.items():
        a = np.asarray(a)
        if a.dtype == bool:
            out[k] = jnp.asarray(a)
        elif np.issubdtype(a.dtype, np.integer):
            out[k] = jnp.asarray(a, jnp.int32)
        elif k in ("token_weights", "class_weights", "normalizer"):
            out[k] = jnp.asarray(a, jnp.float32 if float_dtype == jnp.bfloat16 else float_dtype)
        else:
            out[k] = jnp.asarray(a, float_dtype)
    return out


def exact(data):
    """The data as the library sees it: floats rounded as ``to_jax`` rounded them."""
    return {
        k: np.asarray(a).astype(np.float64) if np.asarray(a).dtype.kind == "f" else np.asarray(a)
        for k, a in data.items()
    }


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_against_reference(
    name, opts, arrays, data, cts, *, dtype=jnp.float64, jit=True, padding_zero=True
):
    """Runs the fused function (x64 on for float64, off otherwise) and compares its
    outputs and gradients with the reference, to the dtype's tolerance. Returns both."""
    x, w, b = arrays
    if dtype == jnp.float64:
        jx = [jnp.asarray(a) if a is not None else None for a in (x, w, b)]
        jdata = to_jax(data, jnp.float64)
        jcts = tuple(jnp.asarray(c) for c in cts)
        out, grads = vjp_function(name, key(opts), jit)(*jx, jdata, jcts)
    else:
        with checks.x64_off():
            jx = [jnp.asarray(a, dtype) if a is not None else None for a in (x, w, b)]
            jdata = to_jax(data, dtype)
            jcts = tuple(jnp.asarray(c, jnp.float32) for c in cts)
            out, grads = vjp_function(name, key(opts), jit)(*jx, jdata, jcts)
        # The reference sees exactly the rounded inputs.
        x, w, b = (None if a is None else np.asarray(a, np.float64) for a in jx)
        data = {
            k: np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)
            for k, a in jdata.items()
        }
        data = exact(data)
    r = reference(name, x, w, b, data, opts, cts)
    v = opts.get("num_classes") or w.shape[1]
    terms = x.size // x.shape[-1] * x.shape[-1] * w.shape[1]
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    value_tol = checks.float_tolerance(acc, terms)
    grad_tol = value_tol + (checks.float_tolerance(dtype, terms) if dtype == jnp.bfloat16 else 0.0)
    rel = 1e-9 if dtype == jnp.float64 else 0.0  # float64: also checks.F64's relative part
    assert len(out) == len(r.values)
    for i, (o, e, s) in enumerate(zip(out, r.values, r.value_scales, strict=True)):
        assert o.dtype == acc, (i, o.dtype)
        ref.assert_within(o, e, value_tol * s + rel * np.abs(e), f"output {i}")
    gx, gw, gb = grads
    assert gx.dtype == gw.dtype == dtype
    ref.assert_within(gx, r.grad_x, grad_tol * r.grad_x_scale + rel * np.abs(r.grad_x), "dx")
    ref.assert_within(
        gw[:, :v],
        r.grad_w[:, :v],
        grad_tol * r.grad_w_scale[:, :v] + rel * np.abs(r.grad_w[:, :v]),
        "dw",
    )
    # Padding columns: exactly zero gradient, whatever they hold.
    if padding_zero:
        assert np.all(np.asarray(gw[:, v:], np.float64) == 0), "dw padding"
    if b is not None:
        ref.assert_within(
            gb[:v],
            r.grad_bias[:v],
            grad_tol * r.grad_bias_scale[:v] + rel * np.abs(r.grad_bias[:v]),
            "dbias",
        )
        if padding_zero:
            assert np.all(np.asarray(gb[v:], np.float64) == 0), "dbias padding"
    return out, grads, r


BATCH, D, V, PAD = (5, 6), 8, 70, 3  # N = 30 tokens, 73 columns
BLOCKS = (8, 24)  # divides neither N, V nor the columns

#: (id, name, options, make_data keywords): every option of each function, blocks that
#: divide nothing, padding holding NaN.
FULL = dict(chunk_size=BLOCKS, num_classes=V, soft_cap=5.0)
FULL_DATA = dict(pad=PAD, pad_value="nan", where=True)
CASES = [
    ("log_probs", "log_probs", dict(FULL, temperature=1.0), FULL_DATA),
    (
        "log_probs_entropy_T",
        "log_probs",
        dict(FULL, temperature=0.7, return_entropy=True),
        FULL_DATA,
    ),
    ("entropy_none_T", "entropy", dict(FULL, temperature=1.6, reduction="none"), FULL_DATA),
    ("entropy_mean_T", "entropy", dict(FULL, temperature=0.5, reduction="mean"), FULL_DATA),
    (
        "entropy_weighted",
        "entropy",
        dict(FULL, temperature=1.2, reduction="mean"),
        dict(FULL_DATA, token_weights=True),
    ),
    (
        "entropy_none_weighted",
        "entropy",
        dict(FULL, reduction="none"),
        dict(FULL_DATA, token_weights=True),
    ),
    (
        "entropy_normalizer",
        "entropy",
        dict(FULL, reduction="mean"),
        dict(FULL_DATA, token_weights=True, normalizer=31.0),
    ),
    (
        "kl_none_T",
        "kl",
        dict(FULL, temperature=2.0, reduction="none"),
        dict(FULL_DATA, token_weights=True),
    ),
    (
        "kl_mean_weighted_T",
        "kl",
        dict(FULL, temperature=0.6, reduction="mean"),
        dict(FULL_DATA, token_weights=True),
    ),
    ("kl_mean_normalizer", "kl", dict(FULL, reduction="mean"), dict(FULL_DATA, normalizer=57.0)),
    (
        "distill_none_T",
        "distill",
        dict(FULL, alpha=0.3, temperature=0.7, reduction="none"),
        FULL_DATA,
    ),
    (
        "distill_mean_weighted",
        "distill",
        dict(FULL, alpha=0.5, temperature=1.5, reduction="mean"),
        dict(FULL_DATA, token_weights=True),
    ),
    (
        "ce_mean_weights_lse",
        "ce",
        dict(FULL, reduction="mean", return_lse=True),
        dict(FULL_DATA, token_weights=True, class_weights=True),
    ),
    ("jsd_none_T", "jsd", dict(FULL, beta=0.5, temperature=1.3, reduction="none"), FULL_DATA),
    (
        "jsd_mean_weighted",
        "jsd",
        dict(FULL, beta=0.2, reduction="mean"),
        dict(FULL_DATA, token_weights=True),
    ),
    ("jsd_forward_kl", "jsd", dict(FULL, beta=0.0, temperature=0.8, reduction="sum"), FULL_DATA),
    (
        "ce_none_weights",
        "ce",
        dict(FULL, reduction="none"),
        dict(FULL_DATA, token_weights=True, class_weights=True),
    ),
    (
        "ce_mean_normalizer",
        "ce",
        dict(FULL, reduction="mean"),
        dict(FULL_DATA, token_weights=True, normalizer=40.0),
    ),
    (
        "kl_h_none_T",
        "kl_h",
        dict(FULL, temperature=2.0, reduction="none"),
        dict(FULL_DATA, token_weights=True),
    ),
    (
        # No cap: the teacher's -inf classes stay -inf (p = 0 there).
        "kl_h_sum_uncapped",
        "kl_h",
        dict(chunk_size=BLOCKS, num_classes=V, temperature=0.7, reduction="sum"),
        FULL_DATA,
    ),
    (
        "distill_h_mean_weighted",
        "distill_h",
        dict(FULL, alpha=0.3, temperature=1.5, reduction="mean"),
        dict(FULL_DATA, token_weights=True, normalizer=23.0),
    ),
    (
        "jsd_h_none_T",
        "jsd_h",
        dict(FULL, beta=0.5, temperature=1.3, reduction="none"),
        dict(FULL_DATA, token_weights=True),
    ),
    (
        # No cap: the teacher's -inf classes stay -inf (p = 0 there).
        "jsd_h_sum_uncapped",
        "jsd_h",
        dict(chunk_size=BLOCKS, num_classes=V, beta=0.3, temperature=0.7, reduction="sum"),
        FULL_DATA,
    ),
    (
        "jsd_h_forward_kl",
        "jsd_h",
        dict(FULL, beta=0.0, temperature=1.6, reduction="mean"),
        dict(FULL_DATA, token_weights=True, normalizer=19.0),
    ),
    (
        # The cap makes the teacher's -inf bias classes finite: the reverse KL is finite.
        "jsd_h_reverse_kl",
        "jsd_h",
        dict(FULL, beta=1.0, temperature=0.8, reduction="none"),
        dict(FULL_DATA, token_weights=True),
    ),
    (
        "jsd_h_reverse_kl_uncapped",
        "jsd_h",
        dict(chunk_size=BLOCKS, num_classes=V, beta=1.0, reduction="mean"),
        dict(FULL_DATA, dropped_teacher=False),
    ),
]


#: Every implementation of the engine (issue 23's seam) is held to the same references.
IMPLEMENTATIONS = sorted(engine.IMPLEMENTATIONS)
#: The functions an implementation runs, where not all of them ("auto" takes "xla" for
#: the others; naming it there is an error, tests/test_pallas_tpu.py).
RUNS = {"pallas_tpu": ("ce",)}


def runs(name: str, implementation: str) -> bool:
    return implementation not in RUNS or name in RUNS[implementation]


def with_implementations(cases, name_of):
    """``(case, implementation)`` for every implementation that runs the case's loss."""
    return [
        pytest.param(c, impl, id=f"{c[0]}-{impl}")
        for c in cases
        for impl in IMPLEMENTATIONS
        if runs(name_of(c), impl)
    ]


@pytest.mark.parametrize("case, implementation", with_implementations(CASES, lambda c: c[1]))
def test_float64_matches_reference(case, implementation):
    _, name, opts, kw = case
    arrays, data = make_data(name, BATCH, D, V, seed=11, **kw)
    cts = make_cts(name, opts, BATCH)
    opts = dict(opts, implementation=implementation)
    out, _, r = check_against_reference(name, opts, arrays, data, cts)
    for o in out:
        checks.assert_finite(o)


#: float32 and bfloat16: each function with its options, padding cycling through values,
#: a logit offset, blocks that divide nothing.
LOW = [
    (
        "log_probs",
        dict(FULL, temperature=0.8, return_entropy=True),
        dict(pad=PAD, pad_value="+inf", where=True, offset=30.0),
    ),
    (
        "entropy",
        dict(FULL, temperature=1.5, reduction="mean"),
        dict(pad=PAD, pad_value="-inf", where=True),
    ),
    (
        "kl",
        dict(FULL, temperature=2.0, reduction="mean"),
        dict(pad=PAD, pad_value="nan", where=True, token_weights=True, offset=100.0),
    ),
    (
        "distill",
        dict(FULL, alpha=0.4, temperature=1.7, reduction="none"),
        dict(pad=PAD, pad_value="finite", where=True, token_weights=True),
    ),
    (
        "jsd",
        dict(FULL, beta=0.5, temperature=1.2, reduction="mean"),
        dict(pad=PAD, pad_value="nan", where=True, token_weights=True, offset=50.0),
    ),
    (
        "kl_h",
        dict(FULL, temperature=2.0, reduction="mean"),
        dict(pad=PAD, pad_value="nan", where=True, token_weights=True, offset=30.0),
    ),
    (
        "distill_h",
        dict(chunk_size=BLOCKS, num_classes=V, alpha=0.4, temperature=1.7, reduction="none"),
        dict(pad=PAD, pad_value="+inf", where=True),
    ),
    (
        # Uncapped: the teacher's -inf classes (p = 0) beside a logit offset.
        "jsd_h",
        dict(chunk_size=BLOCKS, num_classes=V, beta=0.4, temperature=1.2, reduction="mean"),
        dict(pad=PAD, pad_value="nan", where=True, token_weights=True, offset=30.0),
    ),
    (
        "ce",
        dict(FULL, reduction="mean", return_lse=True),
        dict(
            pad=PAD,
            pad_value="nan",
            where=True,
            token_weights=True,
            class_weights=True,
            offset=10.0,
        ),
    ),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case, implementation", with_implementations(LOW, lambda c: c[0]))
def test_low_precision_matches_reference(case, dtype, implementation):
    name, opts, kw = case
    arrays, data = make_data(name, BATCH, D, V, seed=12, **kw)
    cts = make_cts(name, opts, BATCH)
    opts = dict(opts, implementation=implementation)
    check_against_reference(name, opts, arrays, data, cts, dtype=dtype)


# --------------------------------------------------------------------------------------------
# check_grads (float64)
# --------------------------------------------------------------------------------------------

GRAD_CASES = [
    # Default blocks (one block at this size: compiles fast); the blocked schedules'
    # gradients are checked against the reference above. kl: blocks of 3 x 5.
    ("log_probs", dict(temperature=0.7, return_entropy=True, soft_cap=3.0, num_classes=9)),
    ("entropy", dict(temperature=1.3, reduction="sum", num_classes=9)),
    ("kl", dict(temperature=2.0, reduction="mean", soft_cap=3.0, chunk_size=(3, 5), num_classes=9)),
    ("distill", dict(alpha=0.3, temperature=0.8, reduction="none", num_classes=9)),
    ("ce", dict(reduction="mean", return_lse=True, soft_cap=4.0, num_classes=9)),
    ("jsd", dict(beta=0.4, temperature=1.4, reduction="mean", chunk_size=(3, 5), num_classes=9)),
    ("kl_h", dict(temperature=2.0, reduction="mean", chunk_size=(3, 5), num_classes=9)),
    ("distill_h", dict(alpha=0.3, temperature=0.8, reduction="none", soft_cap=3.0, num_classes=9)),
    (
        "jsd_h",
        dict(
            beta=0.6,
            temperature=1.4,
            reduction="mean",
            soft_cap=3.0,
            chunk_size=(3, 5),
            num_classes=9,
        ),
    ),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_check_grads(case):
    _check_grads(*case)


@pytest.mark.parametrize("beta, soft_cap", [(0.0, None), (1.0, 3.0)], ids=["forward", "reverse"])
def test_check_grads_jensen_shannon_hidden_ends(beta, soft_cap):
    """The hidden teacher's JSD at its ends: the forward KL (one pass) and the reverse KL
    (the second pass with m = p; capped, so the teacher's -inf bias classes are finite)."""
    opts = dict(beta=beta, temperature=0.9, reduction="sum", chunk_size=(3, 5), num_classes=9)
    _check_grads("jsd_h", dict(opts, soft_cap=soft_cap))


def _check_grads(name, opts):
    (x, w, b), data = make_data(
        name,
        (7,),
        4,
        9,
        pad=2,
        pad_value="+inf",
        where=True,
        token_weights=name != "entropy",
        seed=13,
    )
    w_pad = w[:, 9:]
    jdata = to_jax(data, jnp.float64)

    @jax.jit
    def f(x, w_real, b):
        w_all = jnp.concatenate([w_real, jnp.asarray(w_pad)], axis=1)
        out = call(name, x, w_all, b, jdata, opts)
        return sum(jnp.sum(o * (i + 1.0)) for i, o in enumerate(out))

    # The padding columns (+inf) are held fixed: numerical differences through them are
    # meaningless; the analytic gradient there is checked to be 0 elsewhere.
    jax.test_util.check_grads(f, (x, w[:, :9], b), order=1, modes=["rev"])


# --------------------------------------------------------------------------------------------
# The single pass (blocks as wide as w) against the reference and the streaming schedule
# --------------------------------------------------------------------------------------------

SINGLE = [
    c
    for c in CASES
    if c[0] in ("kl_mean_weighted_T", "distill_mean_weighted", "ce_mean_normalizer")
]
SINGLE += [
    (
        "kl_sum",
        "kl",
        dict(FULL, temperature=1.4, reduction="sum"),
        dict(FULL_DATA, token_weights=True),
    ),
    ("distill_sum", "distill", dict(FULL, alpha=0.7, temperature=2.0, reduction="sum"), FULL_DATA),
    (
        "distill_h_sum",
        "distill_h",
        dict(chunk_size=BLOCKS, num_classes=V, alpha=0.4, temperature=2.0, reduction="sum"),
        FULL_DATA,
    ),
    (
        "jsd_h_sum",
        "jsd_h",
        dict(chunk_size=BLOCKS, num_classes=V, beta=0.5, temperature=1.5, reduction="sum"),
        FULL_DATA,
    ),
    (
        "jsd_h_reverse_mean",
        "jsd_h",
        dict(FULL, beta=1.0, temperature=1.2, reduction="mean"),
        dict(FULL_DATA, token_weights=True),
    ),
]


@pytest.mark.parametrize("case", SINGLE, ids=[c[0] for c in SINGLE])
def test_single_pass_matches_reference_and_streaming(case):
    _, name, opts, kw = case
    single = dict(opts, chunk_size=(8, V + PAD))
    n, columns = math.prod(BATCH), V + PAD
    # The plan takes the single pass here (and streams with BLOCKS).
    assert jxent._fused.plan.plans(n, D, columns, opts["reduction"], single["chunk_size"], 8)[1]
    assert not jxent._fused.plan.plans(n, D, columns, opts["reduction"], BLOCKS, 8)[1]
    arrays, data = make_data(name, BATCH, D, V, seed=14, **kw)
    cts = make_cts(name, opts, BATCH)
    out_1, grads_1, _ = check_against_reference(name, single, arrays, data, cts)
    out_s, grads_s, _ = check_against_reference(name, opts, arrays, data, cts)
    for a, b in zip(out_1 + tuple(grads_1), out_s + tuple(grads_s), strict=True):
        checks.assert_close(a, b)
    # schedule="streaming" streams the blocks that would have taken the single pass.
    streamed = dict(single, schedule="streaming")
    args = (n, D, columns, opts["reduction"], single["chunk_size"], 8)
    assert not jxent._fused.plan.plans(*args, schedule="streaming")[1]
    out_t, grads_t, _ = check_against_reference(name, streamed, arrays, data, cts)
    for a, b in zip(out_1 + tuple(grads_1), out_t + tuple(grads_t), strict=True):
        checks.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# All tokens ignored; jit and no jit
# --------------------------------------------------------------------------------------------

IGNORED = [
    ("log_probs", dict(return_entropy=True, temperature=0.5, num_classes=11)),
    ("entropy", dict(reduction="mean", num_classes=11)),
    ("kl", dict(reduction="mean", temperature=2.0, num_classes=11, chunk_size=(4, 13))),
    ("distill", dict(reduction="mean", alpha=0.5, num_classes=11, chunk_size=(4, 13))),
    ("ce", dict(reduction="mean", return_lse=True, num_classes=11)),
    ("distill_h", dict(reduction="mean", alpha=0.5, num_classes=11, chunk_size=(4, 13))),
    ("jsd_h", dict(reduction="mean", beta=0.5, num_classes=11, chunk_size=(4, 13))),
]


@pytest.mark.parametrize("case", IGNORED, ids=[c[0] for c in IGNORED])
def test_all_tokens_ignored(case, jit_mode):
    """``where`` all False (labels and teachers there out of range, padding NaN): every
    loss 0 (the mean of nothing is 0), gradients exactly 0, no NaN (the cross-entropy's
    lse is every token's, kept or not); the single pass (kl, distill) likewise. Eagerly
    and under jit (eagerly with the default blocks: an eager blocked loop is slow)."""
    name, opts = case
    eager = jit_mode is not jax.jit
    if eager:
        opts = {k: v for k, v in opts.items() if k != "chunk_size"}
    batch = (2, 3)
    arrays, data = make_data(
        name,
        batch,
        4,
        11,
        pad=2,
        pad_value="nan",
        token_weights=name in ("kl", "distill", "ce", "distill_h", "jsd_h"),
        seed=15,
    )
    data["where"] = np.zeros(batch, bool)
    data["labels"][0, 0] = -1
    data["labels"][1, 2] = 11
    if "indices" in data:
        data["indices"][0, 1, 0], data["log_probs"][0, 1, 0] = -1, -0.1
    cts = make_cts(name, opts, batch)
    out, grads, r = check_against_reference(name, opts, arrays, data, cts, jit=not eager)
    losses = out[:1] if name != "log_probs" else out
    for o in losses:
        assert np.all(np.asarray(o) == 0), o
    checks.assert_no_nan(*out, *grads)
    if name != "ce":  # ce's lse still has a gradient (the lse of every token)
        for g in grads:
            assert np.all(np.asarray(g) == 0)


# --------------------------------------------------------------------------------------------
# The teacher: -inf classes anywhere, bad classes, a constant
# --------------------------------------------------------------------------------------------


def test_teacher_minus_inf_classes_contribute_nothing():
    """Entries with log-probability -inf at index -1, at a padding column, far outside the
    vocabulary, duplicated, or on a real class add nothing (value or gradient); a token
    whose teacher is all -inf has loss 0 and no gradient. A class given twice with
    p > 0 counts twice (its terms add), as the reference has it."""
    batch, d, v, pad, k = (6,), 5, 13, 2, 4
    (x, w, b), data = make_data(
        "kl", batch, d, v, pad=pad, k=k, pad_value="+inf", dropped_teacher=False, seed=16
    )
    indices, log_probs = data["indices"], data["log_probs"]
    indices[1, 1] = indices[1, 0]  # a duplicate, both with p > 0
    assert np.isfinite(log_probs[1, :2]).all()
    junk_index = np.array([-1, v, v + pad, 2**31 - 1, int(indices[0, 0]), 0], np.int32)
    wide_i = np.concatenate([indices, junk_index[:, None], np.full((6, 1), -7, np.int32)], axis=1)
    wide_p = np.concatenate([log_probs, np.full((6, 2), -np.inf)], axis=1)
    wide_p[3] = -np.inf  # a token whose teacher is all -inf
    opts = dict(temperature=1.5, reduction="none", num_classes=v, chunk_size=(4, 5))
    cts = make_cts("kl", opts, batch)
    wide = dict(data, indices=wide_i, log_probs=wide_p)
    out, grads, r = check_against_reference("kl", opts, (x, w, b), wide, cts)
    assert float(out[0][3]) == 0.0
    narrow_p = log_probs.copy()
    narrow_p[3] = -np.inf
    out_n, grads_n, _ = check_against_reference(
        "kl", opts, (x, w, b), dict(data, log_probs=narrow_p), cts
    )
    for a, e in zip(out + tuple(grads), out_n + tuple(grads_n), strict=True):
        checks.assert_close(a, e)


def test_teacher_is_a_constant():
    """No gradient flows to the teacher's log-probabilities (nor to token_weights or the
    normalizer): they are constants."""
    (x, w, b), data = make_data("distill", (5,), 4, 9, token_weights=True, normalizer=7.0, seed=17)
    jd = to_jax(data, jnp.float64)

    def f(log_probs, tw, norm):
        kl = jxent.linear_softmax_kl_divergence(
            x, w, (jd["indices"], log_probs), token_weights=tw, normalizer=norm
        )
        ds = jxent.linear_distillation_loss(
            x,
            w,
            jd["labels"],
            (jd["indices"], log_probs),
            alpha=0.4,
            temperature=2.0,
            token_weights=tw,
        )
        ce = jxent.linear_softmax_cross_entropy(
            x, w, jd["labels"], token_weights=tw, normalizer=norm
        )
        return kl + ds + ce

    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(
        jd["log_probs"], jd["token_weights"], jd["normalizer"]
    )
    for g in grads:
        assert np.all(np.asarray(g) == 0), g
    # A teacher given as hidden states: no gradient to x_t, w_t or b_t.
    x_t, w_t, b_t = (jnp.asarray(a) for a in _hidden_teacher())

    def g(x_t, w_t, b_t):
        teacher = (x_t[0, :2, :4], w_t[:4, :9])
        kl = jxent.linear_softmax_kl_divergence(x[:2], w[:, :9], (*teacher, b_t[:9]))
        jsd = JSD(x[:2], w[:, :9], (*teacher, b_t[:9]), beta=0.4)
        return kl + jsd + DISTILL(x[:2], w[:, :9], jd["labels"][:2], teacher)

    for grad in jax.jit(jax.grad(g, argnums=(0, 1, 2)))(x_t, w_t, b_t):
        assert np.all(np.asarray(grad) == 0), grad


@pytest.mark.parametrize("name", ["kl", "distill"])
def test_teacher_mass_outside_the_vocabulary_is_nan(name):
    """A kept token whose teacher puts p > 0 on index -1, a padding column or an index
    past w's columns gets NaN (loss and gradient), as an out-of-range label does; the
    other tokens are unaffected, and a dropped token with such a teacher gives 0."""
    batch, v, pad = (7,), 9, 2
    (x, w, b), data = make_data(name, batch, 4, v, pad=pad, k=3, dropped_teacher=False, seed=18)
    data["indices"][0, 1] = -1
    data["indices"][1, 0] = v  # a padding column
    data["indices"][2, 2] = v + pad + 3
    data["where"] = np.ones(batch, bool)
    data["where"][2] = False
    opts = dict(reduction="none", num_classes=v, alpha=0.5, temperature=1.5)
    cts = make_cts(name, opts, batch)
    out, grads, r = check_against_reference(name, opts, (x, w, b), data, cts, padding_zero=False)
    loss = np.asarray(out[0])
    assert np.isnan(loss[:2]).all() and loss[2] == 0 and np.isfinite(loss[3:]).all()


@pytest.mark.parametrize("name", ["log_probs", "distill", "ce"])
def test_label_outside_the_classes_is_nan(name):
    """A kept token with a label -1, at a padding column or past the columns: NaN (value
    and gradient); a dropped one: 0."""
    batch, v, pad = (7,), 9, 2
    (x, w, b), data = make_data(name, batch, 4, v, pad=pad, k=3, seed=19)
    data["labels"][:4] = [-1, v, v + pad + 1, -1]
    data["where"] = np.array([1, 1, 1, 0, 1, 1, 1], bool)
    opts = dict(reduction="none", num_classes=v, alpha=0.5, return_entropy=True, return_lse=True)
    cts = make_cts(name, opts, batch)
    out, _, _ = check_against_reference(name, opts, (x, w, b), data, cts, padding_zero=False)
    loss = np.asarray(out[0])
    assert np.isnan(loss[:3]).all() and loss[3] == 0 and np.isfinite(loss[4:]).all()


@pytest.mark.parametrize("name", ["log_probs", "kl", "distill", "ce"])
def test_padding_gradient_is_zero_beside_a_nan_token(name):
    """Padding columns get exactly zero gradient, also when a kept token's loss (and so
    its gradient) is NaN: a bad label or teacher class is not a reason to write NaN
    into the padding of ``w`` and ``bias``."""
    batch, v, pad = (4,), 9, 2
    (x, w, b), data = make_data(name, batch, 4, v, pad=pad, k=3, dropped_teacher=False, seed=20)
    data["labels"][0] = -1
    if "indices" in data:
        data["indices"][0, 0] = -1
    opts = dict(reduction="sum", num_classes=v, alpha=0.5)
    fn = vjp_function(name, key(opts))
    jd = to_jax(data, jnp.float64)
    cts = tuple(jnp.asarray(c) for c in make_cts(name, opts, batch))
    out, (gx, gw, gb) = fn(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jd, cts)
    assert np.isnan(np.asarray(out[0])).any()
    assert np.all(np.asarray(gw)[:, v:] == 0), np.asarray(gw)[:, v:]
    assert np.all(np.asarray(gb)[v:] == 0), np.asarray(gb)[v:]


# --------------------------------------------------------------------------------------------
# Bad inputs: errors at trace time (eagerly and under jit), naming the argument
# --------------------------------------------------------------------------------------------

_EN, _ED, _EV, _EK = 6, 4, 10, 3
_rng = np.random.default_rng(21)
EX = jnp.asarray(_rng.normal(size=(2, 3, _ED)))
EW = jnp.asarray(_rng.normal(size=(_ED, _EV)))
EY = jnp.asarray(_rng.integers(0, _EV, (2, 3)), jnp.int32)
EI = jnp.asarray(_rng.integers(0, _EV, (2, 3, _EK)), jnp.int32)
ELP = jnp.asarray(np.log(_rng.dirichlet(np.ones(_EK), (2, 3))))
KL = jxent.linear_softmax_kl_divergence
DISTILL = jxent.linear_distillation_loss
LOGP = jxent.linear_log_probs
ENT = jxent.linear_entropy
XENT = jxent.linear_softmax_cross_entropy
JSD = jxent.linear_softmax_jensen_shannon_divergence

ERRORS = [
    # (id, function, args, kwargs, exception, words in the message)
    ("teacher_not_pair", KL, (EX, EW, EI), {}, TypeError, ["teacher", "(indices, log_probs)"]),
    ("teacher_triple", KL, (EX, EW, (EI, ELP, ELP)), {}, TypeError, ["teacher"]),
    (
        "indices_shape",
        KL,
        (EX, EW, (EI[0], ELP)),
        {},
        ValueError,
        ["teacher[0] (indices)", "x.shape[:-1] + (k,)"],
    ),
    (
        "indices_batch",
        KL,
        (EX, EW, (EI[:, :2], ELP[:, :2])),
        {},
        ValueError,
        ["teacher[0] (indices)"],
    ),
    (
        "log_probs_shape",
        KL,
        (EX, EW, (EI, ELP[..., :2])),
        {},
        ValueError,
        ["teacher[1] (log_probs)"],
    ),
    ("log_probs_integer", KL, (EX, EW, (EI, EI)), {}, TypeError, ["teacher[1] (log_probs)"]),
    ("k_zero", KL, (EX, EW, (EI[..., :0], ELP[..., :0])), {}, ValueError, ["k >= 1"]),
    (
        "teacher_x_t_shape",
        KL,
        (EX, EW, (EX[0], EW)),
        {},
        ValueError,
        ["teacher[0] (x_t)", "x.shape[:-1] + (D_t,)"],
    ),
    (
        "teacher_w_t_columns",
        DISTILL,
        (EX, EW, EY, (EX, EW[:, :-1])),
        {},
        ValueError,
        ["teacher[1] (w_t)", "(D_t, V)", str(_EV)],
    ),
    (
        "teacher_w_t_layout_vd",
        KL,
        (EX, EW.T, (EX, EW)),
        dict(w_layout="vd"),
        ValueError,
        ["teacher[1] (w_t)", "(V, D_t)"],
    ),
    ("teacher_bias_shape", KL, (EX, EW, (EX, EW, EW[0, :-1])), {}, ValueError, ["teacher[2]"]),
    (
        "teacher_accumulates_differently",
        KL,
        (EX, EW, (EX.astype(jnp.float32), EW.astype(jnp.float32))),
        {},
        TypeError,
        ["teacher", "float32", "float64"],
    ),
    (
        "jsd_hidden_beta_above_one",
        JSD,
        (EX, EW, (EX, EW)),
        dict(beta=1.5),
        ValueError,
        ["beta"],
    ),
    ("jsd_hidden_beta_negative", JSD, (EX, EW, (EX, EW)), dict(beta=-0.5), ValueError, ["beta"]),
    (
        "jsd_teacher_x_t_shape",
        JSD,
        (EX, EW, (EX[0], EW)),
        {},
        ValueError,
        ["teacher[0] (x_t)", "x.shape[:-1] + (D_t,)"],
    ),
    (
        "jsd_teacher_w_t_layout_vd",
        JSD,
        (EX, EW.T, (EX, EW)),
        dict(w_layout="vd"),
        ValueError,
        ["teacher[1] (w_t)", "(V, D_t)"],
    ),
    (
        "jsd_teacher_accumulates_differently",
        JSD,
        (EX, EW, (EX.astype(jnp.float32), EW.astype(jnp.float32))),
        {},
        TypeError,
        ["teacher", "float32", "float64"],
    ),
    (
        "jsd_hidden_temperature",
        JSD,
        (EX, EW, (EX, EW)),
        dict(temperature=0.0),
        ValueError,
        ["temperature"],
    ),
    (
        "kl_temperature_zero",
        KL,
        (EX, EW, (EI, ELP)),
        dict(temperature=0.0),
        ValueError,
        ["temperature"],
    ),
    (
        "kl_temperature_negative",
        KL,
        (EX, EW, (EI, ELP)),
        dict(temperature=-1.0),
        ValueError,
        ["temperature"],
    ),
    (
        "kl_temperature_nan",
        KL,
        (EX, EW, (EI, ELP)),
        dict(temperature=float("nan")),
        ValueError,
        ["temperature"],
    ),
    (
        "distill_temperature",
        DISTILL,
        (EX, EW, EY, (EI, ELP)),
        dict(temperature=0.0),
        ValueError,
        ["temperature"],
    ),
    (
        "log_probs_temperature",
        LOGP,
        (EX, EW, EY),
        dict(temperature=-0.5),
        ValueError,
        ["temperature"],
    ),
    ("entropy_temperature", ENT, (EX, EW), dict(temperature=0.0), ValueError, ["temperature"]),
    (
        "temperature_string",
        KL,
        (EX, EW, (EI, ELP)),
        dict(temperature="2"),
        TypeError,
        ["temperature"],
    ),
    ("alpha_negative", DISTILL, (EX, EW, EY, (EI, ELP)), dict(alpha=-0.1), ValueError, ["alpha"]),
    ("alpha_above_one", DISTILL, (EX, EW, EY, (EI, ELP)), dict(alpha=1.5), ValueError, ["alpha"]),
    (
        "alpha_array",
        DISTILL,
        (EX, EW, EY, (EI, ELP)),
        dict(alpha=jnp.ones(2)),
        TypeError,
        ["alpha"],
    ),
    (
        "kl_normalizer_sum",
        KL,
        (EX, EW, (EI, ELP)),
        dict(normalizer=3.0, reduction="sum"),
        ValueError,
        ["normalizer", "sum"],
    ),
    (
        "kl_normalizer_none",
        KL,
        (EX, EW, (EI, ELP)),
        dict(normalizer=3.0, reduction="none"),
        ValueError,
        ["normalizer"],
    ),
    (
        "kl_normalizer_vector",
        KL,
        (EX, EW, (EI, ELP)),
        dict(normalizer=jnp.ones(2)),
        ValueError,
        ["normalizer must be a scalar"],
    ),
    (
        "distill_normalizer_sum",
        DISTILL,
        (EX, EW, EY, (EI, ELP)),
        dict(normalizer=3.0, reduction="sum"),
        ValueError,
        ["normalizer"],
    ),
    (
        "xent_normalizer_sum",
        XENT,
        (EX, EW, EY),
        dict(normalizer=3.0, reduction="sum"),
        ValueError,
        ["normalizer", "sum"],
    ),
    (
        "xent_normalizer_vector",
        XENT,
        (EX, EW, EY),
        dict(normalizer=jnp.ones((1,))),
        ValueError,
        ["normalizer must be a scalar"],
    ),
    (
        "kl_token_weights_shape",
        KL,
        (EX, EW, (EI, ELP)),
        dict(token_weights=jnp.ones(6)),
        ValueError,
        ["token_weights"],
    ),
    (
        "kl_token_weights_int",
        KL,
        (EX, EW, (EI, ELP)),
        dict(token_weights=jnp.ones((2, 3), jnp.int32)),
        TypeError,
        ["token_weights"],
    ),
    (
        "xent_token_weights_shape",
        XENT,
        (EX, EW, EY),
        dict(token_weights=jnp.ones((2, 3, 1))),
        ValueError,
        ["token_weights"],
    ),
    ("xent_return_lse_not_bool", XENT, (EX, EW, EY), dict(return_lse=1), TypeError, ["return_lse"]),
    (
        "return_entropy_not_bool",
        LOGP,
        (EX, EW, EY),
        dict(return_entropy="yes"),
        TypeError,
        ["return_entropy"],
    ),
    ("log_probs_labels_none", LOGP, (EX, EW, None), {}, TypeError, ["labels"]),
    ("distill_labels_none", DISTILL, (EX, EW, None, (EI, ELP)), {}, TypeError, ["labels"]),
    ("log_probs_labels_float", LOGP, (EX, EW, EY.astype(jnp.float32)), {}, TypeError, ["labels"]),
    ("log_probs_w_transposed", LOGP, (EX, EW.T, EY), {}, ValueError, ["embedding.T"]),
    ("entropy_reduction", ENT, (EX, EW), dict(reduction="avg"), ValueError, ["reduction"]),
    ("kl_reduction", KL, (EX, EW, (EI, ELP)), dict(reduction="avg"), ValueError, ["reduction"]),
    (
        "kl_soft_cap",
        KL,
        (EX, EW, (EI, ELP)),
        dict(logit_soft_cap=0.0),
        ValueError,
        ["logit_soft_cap"],
    ),
    ("entropy_num_classes", ENT, (EX, EW), dict(num_classes=_EV + 1), ValueError, ["num_classes"]),
    (
        "kl_where_shape",
        KL,
        (EX, EW, (EI, ELP)),
        dict(where=jnp.ones((6,), bool)),
        ValueError,
        ["where"],
    ),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_inputs_raise_naming_the_argument(case):
    _, fn, args, kwargs, exc, words = case
    checks.assert_raises_naming(exc, fn, args, kwargs, words)


def test_traced_temperature_and_alpha_are_rejected():
    """Static hyperparameters: a traced value raises TypeError naming it."""
    with pytest.raises(TypeError, match="temperature"):
        jax.jit(lambda t: KL(EX, EW, (EI, ELP), temperature=t))(2.0)
    with pytest.raises(TypeError, match="alpha"):
        jax.jit(lambda a: DISTILL(EX, EW, EY, (EI, ELP), alpha=a))(0.5)


# --------------------------------------------------------------------------------------------
# The unfused composition with jxent's own logits losses (float64)
# --------------------------------------------------------------------------------------------


def _composition_inputs():
    rng = np.random.default_rng(22)
    batch, d, v = (2, 5), 6, 12
    x = jnp.asarray(rng.normal(size=batch + (d,)))
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 2)
    b = jnp.asarray(rng.normal(size=(v,)))
    y = jnp.asarray(rng.integers(0, v, batch), jnp.int32)
    teacher = jnp.asarray(2 * rng.normal(size=batch + (v,)))
    tw = jnp.asarray(rng.uniform(0.2, 2.0, batch))
    cw = jnp.asarray(rng.uniform(0.5, 2.0, v))
    ct = jnp.asarray(rng.uniform(0.5, 1.5, batch))
    return x, w, b, y, teacher, tw, cw, ct


def _hidden_teacher():
    """A teacher as hidden states ``[2, 5, 7]``, weight ``[7, 12]`` and bias (float64)."""
    rng = np.random.default_rng(23)
    x_t = jnp.asarray(rng.normal(size=(2, 5, 7)))
    return x_t, jnp.asarray(rng.normal(size=(7, 12)) * 0.8), jnp.asarray(rng.normal(size=(12,)))


def _top_all(teacher_logits, t):
    """The teacher's whole distribution as a top-k with k = V (sorted, as top_k gives)."""
    lp = jax.nn.log_softmax(teacher_logits / t)
    values, indices = jax.lax.top_k(lp, lp.shape[-1])
    return indices.astype(jnp.int32), values


def _capped(x, w, b, cap=None):
    z = x @ w + b[None, None, :]
    return z if cap is None else cap * jnp.tanh(z / cap)


T_C, CAP_C, ALPHA_C = 1.7, 4.0, 0.3


def _compositions():
    x, w, b, y, teacher, tw, cw, ct = _composition_inputs()
    xt, wt, bt = _hidden_teacher()
    top = _top_all(teacher, T_C)
    xent = jxent.softmax_cross_entropy_with_integer_labels
    return {
        # KL with the full teacher distribution: jxent.softmax_kl_divergence of the logits.
        "kl": (
            lambda x, w, b: KL(x, w, top, temperature=T_C, bias=b),
            lambda x, w, b: jxent.softmax_kl_divergence(
                _capped(x, w, b), teacher, temperature=T_C, reduction="mean"
            ),
        ),
        "kl_capped_weighted": (
            lambda x, w, b: KL(
                x, w, top, temperature=T_C, bias=b, logit_soft_cap=CAP_C, token_weights=tw
            ),
            lambda x, w, b: (
                jnp.sum(
                    tw
                    * jxent.softmax_kl_divergence(_capped(x, w, b, CAP_C), teacher, temperature=T_C)
                )
                / jnp.sum(tw)
            ),
        ),
        "entropy": (
            lambda x, w, b: ENT(x, w, temperature=T_C, bias=b, reduction="mean"),
            lambda x, w, b: jxent.entropy(_capped(x, w, b) / T_C, reduction="mean"),
        ),
        "log_probs": (
            lambda x, w, b: jnp.sum(
                ct * LOGP(x, w, y, temperature=T_C, bias=b, logit_soft_cap=CAP_C)
            ),
            lambda x, w, b: -jnp.sum(ct * xent(_capped(x, w, b, CAP_C) / T_C, y)),
        ),
        "log_probs_entropy": (
            lambda x, w, b: jnp.sum(
                ct * LOGP(x, w, y, temperature=T_C, bias=b, return_entropy=True)[1]
            ),
            lambda x, w, b: jnp.sum(ct * jxent.entropy(_capped(x, w, b) / T_C)),
        ),
        "distill": (
            lambda x, w, b: DISTILL(x, w, y, top, alpha=ALPHA_C, temperature=T_C, bias=b),
            lambda x, w, b: (
                ALPHA_C * xent(_capped(x, w, b), y, reduction="mean")
                + (1 - ALPHA_C)
                * jxent.softmax_kl_divergence(
                    _capped(x, w, b), teacher, temperature=T_C, reduction="mean"
                )
            ),
        ),
        # The teacher as hidden states: softmax_kl_divergence of both logits arrays, the
        # teacher's capped as the student's; w and w_t as [V, D] tables read in place.
        "kl_hidden_capped_vd": (
            lambda x, w, b: KL(
                x,
                w.T,
                (xt, wt.T, bt),
                temperature=T_C,
                bias=b,
                logit_soft_cap=CAP_C,
                w_layout="vd",
            ),
            lambda x, w, b: jxent.softmax_kl_divergence(
                _capped(x, w, b, CAP_C),
                _capped(xt, wt, bt, CAP_C),
                temperature=T_C,
                reduction="mean",
            ),
        ),
        "distill_hidden_weighted": (
            lambda x, w, b: DISTILL(
                x, w, y, (xt, wt), alpha=ALPHA_C, temperature=T_C, bias=b, token_weights=tw
            ),
            lambda x, w, b: (
                jnp.sum(
                    tw
                    * (
                        ALPHA_C * xent(_capped(x, w, b), y)
                        + (1 - ALPHA_C)
                        * jxent.softmax_kl_divergence(_capped(x, w, b), xt @ wt, temperature=T_C)
                    )
                )
                / jnp.sum(tw)
            ),
        ),
        # The Jensen-Shannon divergence from hidden states: jxent.softmax_jensen_shannon_
        # divergence of both logits arrays, at the ends (forward and reverse KL) and between.
        "jsd_hidden_capped_vd": (
            lambda x, w, b: JSD(
                x,
                w.T,
                (xt, wt.T, bt),
                beta=0.3,
                temperature=T_C,
                bias=b,
                logit_soft_cap=CAP_C,
                w_layout="vd",
            ),
            lambda x, w, b: jxent.softmax_jensen_shannon_divergence(
                _capped(x, w, b, CAP_C),
                _capped(xt, wt, bt, CAP_C),
                beta=0.3,
                temperature=T_C,
                reduction="mean",
            ),
        ),
        "jsd_hidden_forward_weighted": (
            lambda x, w, b: JSD(
                x, w, (xt, wt, bt), beta=0.0, temperature=T_C, bias=b, token_weights=tw
            ),
            lambda x, w, b: (
                jnp.sum(
                    tw
                    * jxent.softmax_jensen_shannon_divergence(
                        _capped(x, w, b), _capped(xt, wt, bt), beta=0.0, temperature=T_C
                    )
                )
                / jnp.sum(tw)
            ),
        ),
        "jsd_hidden_reverse_sum": (
            lambda x, w, b: JSD(x, w, (xt, wt), beta=1.0, temperature=T_C, bias=b, reduction="sum"),
            lambda x, w, b: jxent.softmax_jensen_shannon_divergence(
                _capped(x, w, b), xt @ wt, beta=1.0, temperature=T_C, reduction="sum"
            ),
        ),
        "xent_weights": (
            lambda x, w, b: XENT(x, w, y, bias=b, token_weights=tw, class_weights=cw),
            lambda x, w, b: (
                jnp.sum(tw * xent(_capped(x, w, b), y, class_weights=cw)) / jnp.sum(tw * cw[y])
            ),
        ),
        "xent_normalizer": (
            lambda x, w, b: XENT(x, w, y, bias=b, token_weights=tw, normalizer=jnp.float64(17.0)),
            lambda x, w, b: jnp.sum(tw * xent(_capped(x, w, b), y)) / 17.0,
        ),
        "xent_lse": (
            lambda x, w, b: (lambda out: out[0] + 0.3 * jnp.sum(ct * out[1]))(
                XENT(x, w, y, bias=b, logit_soft_cap=CAP_C, return_lse=True)
            ),
            lambda x, w, b: (
                xent(_capped(x, w, b, CAP_C), y, reduction="mean")
                + 0.3 * jnp.sum(ct * jax.nn.logsumexp(_capped(x, w, b, CAP_C), axis=-1))
            ),
        ),
    }


COMPOSITIONS = list(_compositions())


@pytest.mark.parametrize("which", COMPOSITIONS)
def test_equals_the_unfused_composition(which):
    fused, unfused = _compositions()[which]
    x, w, b = _composition_inputs()[:3]
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, w, b)
    with checks.standard_promotion():
        want = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1, 2)))(x, w, b)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        checks.assert_close(g, e)


# --------------------------------------------------------------------------------------------
# Structural memory: compiled temporary memory at a language model's output layer
# --------------------------------------------------------------------------------------------

# Gemma 2's output layer, bfloat16; a teacher top-k of 64. Compiled only, never run.
LM_N, LM_D, LM_V, LM_K = 8192, 2304, 256000, 64


def _lm_temp_mib(loss, *extra):
    specs = (
        jax.ShapeDtypeStruct((LM_N, LM_D), jnp.bfloat16),
        jax.ShapeDtypeStruct((LM_D, LM_V), jnp.bfloat16),
        *extra,
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*specs).compile().memory_analysis().temp_size_in_bytes / MiB


def test_language_model_shape_temp_memory():
    """value_and_grad (x, w) of the KL (top-64), the distillation loss and the log-probs
    with the entropy (summed with weights) each take at most 2x the fused cross-entropy's
    compiled temporary memory, and at most 1/20 of the [N, V] float32 logits; with the
    teacher as hidden states, the Jensen-Shannon divergence (two forward passes) at most
    1.1x the KL's (a second pass keeps only per-token sums)."""
    labels = jax.ShapeDtypeStruct((LM_N,), jnp.int32)
    indices = jax.ShapeDtypeStruct((LM_N, LM_K), jnp.int32)
    log_probs = jax.ShapeDtypeStruct((LM_N, LM_K), jnp.float32)
    weights = jax.ShapeDtypeStruct((LM_N,), jnp.float32)
    hidden = (
        jax.ShapeDtypeStruct((LM_N, LM_D), jnp.bfloat16),
        jax.ShapeDtypeStruct((LM_D, LM_V), jnp.bfloat16),
    )

    def log_probs_entropy(x, w, y, a, c):
        lp, h = LOGP(x, w, y, return_entropy=True)
        return jnp.sum(a * lp) + jnp.sum(c * h)

    temps = {
        "linear_softmax_cross_entropy": _lm_temp_mib(lambda x, w, y: XENT(x, w, y), labels),
        "linear_softmax_kl_divergence": _lm_temp_mib(
            lambda x, w, i, lp: KL(x, w, (i, lp), temperature=2.0), indices, log_probs
        ),
        "linear_distillation_loss": _lm_temp_mib(
            lambda x, w, y, i, lp: DISTILL(x, w, y, (i, lp), alpha=0.5, temperature=2.0),
            labels,
            indices,
            log_probs,
        ),
        "linear_log_probs(return_entropy)": _lm_temp_mib(
            log_probs_entropy, labels, weights, weights
        ),
        # The teacher as hidden states of the same shape (its logits never formed either).
        "linear_distillation_loss(teacher=(x_t, w_t))": _lm_temp_mib(
            lambda x, w, y, xt, wt: DISTILL(x, w, y, (xt, wt), alpha=0.5, temperature=2.0),
            labels,
            *hidden,
        ),
        "linear_softmax_kl_divergence(teacher=(x_t, w_t))": _lm_temp_mib(
            lambda x, w, xt, wt: KL(x, w, (xt, wt), temperature=2.0), *hidden
        ),
        "linear_softmax_jensen_shannon_divergence(teacher=(x_t, w_t))": _lm_temp_mib(
            lambda x, w, xt, wt: JSD(x, w, (xt, wt), beta=0.5, temperature=2.0), *hidden
        ),
    }
    logits_mib = LM_N * LM_V * 4 / MiB
    print(
        f"\ncompiled temp memory at N={LM_N} D={LM_D} V={LM_V} bfloat16 "
        f"(the float32 logits: {logits_mib:.0f} MiB):"
    )
    for name, mib in temps.items():
        print(f"  {name}: {mib:.1f} MiB")
    base = temps["linear_softmax_cross_entropy"]
    for name, mib in temps.items():
        assert mib <= 2 * base, (name, mib, base)
        assert mib <= logits_mib / 20, (name, mib, logits_mib)
    kl = temps["linear_softmax_kl_divergence(teacher=(x_t, w_t))"]
    jsd = temps["linear_softmax_jensen_shannon_divergence(teacher=(x_t, w_t))"]
    assert jsd <= 1.1 * kl, (jsd, kl)


# --------------------------------------------------------------------------------------------
# Property test (float64): small shapes, options drawn
# --------------------------------------------------------------------------------------------


@st.composite
def property_cases(draw):
    name = draw(st.sampled_from(NAMES))
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    d = draw(st.integers(1, 5))
    v = draw(st.integers(3, 40))
    pad = draw(st.integers(0, 3))
    k = draw(st.integers(1, 5))
    opts = {"temperature": draw(st.sampled_from([0.5, 1.0, 2.5]))}
    if pad:
        opts["num_classes"] = v
    if draw(st.booleans()):
        opts["soft_cap"] = draw(st.sampled_from([2.0, 30.0]))
    n = math.prod(batch)
    # Default blocks mostly (one block at these sizes: fast to compile); blocks that
    # divide nothing and the single pass are drawn too.
    chunk = draw(st.sampled_from(["default", "default", "blocks", "wide"]))
    if chunk == "blocks":
        opts["chunk_size"] = (draw(st.integers(1, n)), draw(st.integers(1, v + pad)))
    elif chunk == "wide":
        opts["chunk_size"] = (draw(st.integers(1, n)), v + pad)
    if name != "log_probs":
        reductions = ["none", "sum", "mean"]
        opts["reduction"] = draw(st.sampled_from(reductions))
    kw = dict(
        pad=pad,
        k=k,
        pad_value=draw(st.sampled_from(list(PAD_VALUES))),
        where=draw(st.booleans()),
        offset=draw(st.sampled_from([0.0, 10.0])),
        w_scale=draw(st.sampled_from([1.0, 4.0])),
        seed=draw(st.integers(0, 2**16)),
    )
    if name in ("kl", "distill", "ce"):
        kw["token_weights"] = draw(st.booleans())
        if opts["reduction"] == "mean" and draw(st.booleans()):
            kw["normalizer"] = draw(st.sampled_from([1.0, 13.5]))
    if name == "log_probs":
        opts["return_entropy"] = draw(st.booleans())
    if name == "distill":
        opts["alpha"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    if name == "ce":
        opts["return_lse"] = draw(st.booleans())
        kw["class_weights"] = draw(st.booleans())
        opts.pop("temperature")
    if name in ("kl", "distill"):
        kw["dropped_teacher"] = draw(st.booleans())
    if name == "jsd_h":
        opts["beta"] = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
        kw["token_weights"] = draw(st.booleans())
        # Uncapped, a class the teacher rules out makes the reverse KL infinite.
        if opts["beta"] < 1 or "soft_cap" in opts:
            kw["dropped_teacher"] = draw(st.booleans())
        else:
            kw["dropped_teacher"] = False
    return name, batch, d, v, opts, kw


@given(property_cases())
def test_property_float64_matches_reference(case):
    name, batch, d, v, opts, kw = case
    arrays, data = make_data(name, batch, d, v, **kw)
    cts = make_cts(name, opts, batch, seed=kw["seed"] + 1)
    check_against_reference(name, opts, arrays, data, cts)


def test_jensen_shannon_beta_one_is_refused():
    """The reverse KL end is infinite for a top-k teacher: refused at trace time, naming
    beta; beta outside [0, 1] too. A teacher given as hidden states takes beta = 1."""
    for beta, exc in ((1.0, ValueError), (1.5, ValueError), (-0.1, ValueError)):
        with pytest.raises(exc, match="beta"):
            jxent.linear_softmax_jensen_shannon_divergence(EX, EW, (EI, ELP), beta=beta)
    assert np.isfinite(float(JSD(EX, EW, (EX, EW), beta=1.0)))


def test_jensen_shannon_hidden_reverse_kl_with_a_ruled_out_class():
    """beta = 1 (the reverse KL) with a class the teacher rules out (an uncapped -inf
    bias_t): +inf for every kept token, as the logits function gives; a dropped token
    gives exactly 0, and with every token dropped the gradients are exactly 0 (no NaN
    from the infinite per-class terms times a zero coefficient), in both schedules."""
    (x, w, b), data = make_data("jsd_h", (6,), 4, 11, pad=2, pad_value="nan", seed=24)
    assert np.isneginf(data["b_t"][:11]).any()
    jd = to_jax(data, jnp.float64)
    teacher = (jd["x_t"], jd["w_t"], jd["b_t"])
    keep = np.array([1, 0, 1, 1, 0, 1], bool)
    kw = dict(beta=1.0, bias=jnp.asarray(b), num_classes=11, temperature=1.3)
    per_token = JSD(x, w, teacher, where=keep, reduction="none", chunk_size=(4, 5), **kw)
    student = x @ w[:, :11] + b[:11]  # NumPy
    teacher_logits = data["x_t"] @ data["w_t"][:, :11] + data["b_t"][:11]
    want = jxent.softmax_jensen_shannon_divergence(
        jnp.asarray(student), jnp.asarray(teacher_logits), beta=1.0, temperature=1.3
    )
    assert np.isposinf(np.asarray(want)).all()
    np.testing.assert_array_equal(np.asarray(per_token), np.where(keep, np.inf, 0.0))
    none = np.zeros(6, bool)
    for chunk, red in (((4, 5), "none"), ((4, 13), "sum")):  # streaming; the single pass

        def f(x, w, b, chunk=chunk, red=red):
            opts = dict(kw, bias=b, where=none, reduction=red, chunk_size=chunk)
            return jnp.sum(JSD(x, w, teacher, **opts))

        value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, b)
        assert float(value) == 0.0
        for g in grads:
            assert np.all(np.asarray(g) == 0), g


def test_jensen_shannon_dropped_entries_duplicating_a_class():
    """Entries with p = 0 may repeat a class of the top-k: they change nothing."""
    rng = np.random.default_rng(8)
    x, w = rng.normal(size=(4, 3)), rng.normal(size=(3, 11))
    idx = np.argsort(rng.random((4, 11)), -1)[:, :4]
    lp = np.log(rng.dirichlet(np.ones(5), 4)[:, :4])
    extra_idx = np.concatenate([idx, idx[:, :2]], -1)
    extra_lp = np.concatenate([lp, np.full((4, 2), -np.inf)], -1)
    f = jxent.linear_softmax_jensen_shannon_divergence
    want, want_g = jax.value_and_grad(lambda w: f(x, w, (idx, lp), beta=0.4))(w)
    got, got_g = jax.value_and_grad(lambda w: f(x, w, (extra_idx, extra_lp), beta=0.4))(w)
    checks.assert_close(got, want)
    checks.assert_close(got_g, want_g)
