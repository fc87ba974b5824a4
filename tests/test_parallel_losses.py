"""jxent.parallel's fused log-probabilities, distillation and Jensen-Shannon losses (the
teacher's top-k or its hidden states; issue 14): inside ``shard_map`` on a 2 x 2
("data", "model") mesh, with the vocabulary of 62 classes padded to 64 columns (the
padding holding NaN and inf), they equal the one-device functions, values and gradients
with respect to ``x``, ``w`` and ``bias``, in float64. Run in a subprocess with 4 CPU
devices."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jxent

V, PADDED, N, D, K = 62, 64, 12, 5, 4


def test_parallel_forms_equal_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 42, errors
    for name, err in errors.items():
        # float64 throughout; the shards' sums are regrouped, nothing else differs.
        assert err < 1e-10, (name, err)


def _inputs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, D))
    w = rng.normal(size=(D, V))
    b = rng.normal(size=(V,))
    labels = rng.integers(0, V, size=(N,))
    teacher_logits = rng.normal(size=(N, V)) * 2
    teacher_logits[0, :3] = -np.inf  # classes the teacher rules out
    top = jax.lax.top_k(jax.nn.log_softmax(jnp.asarray(teacher_logits) / 2.0), K)
    where = np.arange(N) % 5 != 1
    weights = rng.uniform(0.5, 2.0, size=(N,))
    return x, w, b, labels, (np.asarray(top[1]), np.asarray(top[0])), where, weights


def _main() -> None:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4
    x, w, b, labels, (idx, logp), where, weights = _inputs()
    w_pad = np.concatenate([w, np.full((D, PADDED - V), np.nan)], axis=1)
    w_pad[0, -1] = np.inf
    b_pad = np.concatenate([b, np.full((PADDED - V,), np.nan)])
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(auto, auto))
    put = lambda a, *spec: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P(*spec)))  # noqa: E731
    tok, col = P("data"), P(None, "model")
    errors = {}

    def compare(name, sharded_fn, in_specs, args, one_fn, one_args):
        sharded = jax.jit(jax.shard_map(sharded_fn, mesh=mesh, in_specs=in_specs, out_specs=P()))
        got, grads = jax.value_and_grad(sharded, argnums=(0, 1, 2))(*args)
        want, want_grads = jax.value_and_grad(one_fn, argnums=(0, 1, 2))(*one_args)
        errors[name] = float(abs(got - want))
        gx, gw, gb = (np.asarray(g) for g in grads)
        gw = gw.T if gw.shape == (PADDED, D) else gw  # w given as [V, D] (w_layout="vd")
        errors[name + " dx"] = float(np.max(np.abs(gx - want_grads[0])))
        pad_grads = max(np.max(np.abs(gw[:, V:])), np.max(np.abs(gb[V:])))
        errors[name + " dw, dbias"] = float(
            max(
                np.max(np.abs(gw[:, :V] - want_grads[1])),
                np.max(np.abs(gb[:V] - want_grads[2])),
                pad_grads,
            )
        )

    # Log-probabilities and entropy, summed with different weights (both cotangents).
    def lp_sharded(x, w, b, y, m):
        lp, h = jxent.parallel.linear_log_probs(
            x,
            w,
            y,
            axis_name="model",
            temperature=0.7,
            return_entropy=True,
            bias=b,
            where=m,
            num_classes=V,
            chunk_size=(4, 8),
            logit_soft_cap=4.0,
        )
        return jax.lax.psum(jnp.sum(lp) + 0.3 * jnp.sum(h), "data")

    def lp_one(x, w, b):
        lp, h = jxent.linear_log_probs(
            x,
            w,
            labels,
            temperature=0.7,
            return_entropy=True,
            bias=b,
            where=where,
            logit_soft_cap=4.0,
        )
        return jnp.sum(lp) + 0.3 * jnp.sum(h)

    args = (
        put(x, "data"),
        put(w_pad, *col),
        put(b_pad, "model"),
        put(labels, "data"),
        put(where, "data"),
    )
    compare("log_probs", lp_sharded, (tok, col, P("model"), tok, tok), args, lp_one, (x, w, b))

    def kd_one_for(x, w, b, alpha, norm):
        if alpha:
            return jxent.linear_distillation_loss(
                x,
                w,
                labels,
                (idx, logp),
                alpha=alpha,
                temperature=2.0,
                bias=b,
                where=where,
                token_weights=weights,
                normalizer=norm,
            )
        return jxent.linear_softmax_kl_divergence(
            x, w, (idx, logp), temperature=2.0, bias=b, where=where, token_weights=weights
        )

    for alpha in (0.0, 0.3):
        # alpha 0.3: the mean over a given count (the global token count of a micro-batch)
        norm = 10.0 if alpha else None

        def kd_sharded(x, w, b, y, i, lp, m, tw, alpha=alpha, norm=norm):
            return jxent.parallel.linear_distillation_loss(
                x,
                w,
                y if alpha else None,
                (i, lp),
                axis_name="model",
                alpha=alpha,
                temperature=2.0,
                bias=b,
                where=m,
                token_weights=tw,
                normalizer=norm,
                num_classes=V,
                chunk_size=(4, 8),
                batch_axis_name="data",
            )

        def kd_one(x, w, b, alpha=alpha, norm=norm):
            return kd_one_for(x, w, b, alpha=alpha, norm=norm)

        args = (
            put(x, "data"),
            put(w_pad, *col),
            put(b_pad, "model"),
            put(labels, "data"),
            put(idx, "data"),
            put(logp, "data"),
            put(where, "data"),
            put(weights, "data"),
        )
        specs = (tok, col, P("model"), tok, tok, tok, tok, tok)
        compare(f"distillation alpha={alpha}", kd_sharded, specs, args, kd_one, (x, w, b))

    # The entropy alone, weighted, its sum over the whole batch divided by a given count
    # (normalizer); w as [V, D] rows.
    def ent_sharded(x, w, b, m, tw):
        return jxent.parallel.linear_entropy(
            x,
            w,
            axis_name="model",
            w_layout="vd",
            temperature=1.3,
            bias=b,
            where=m,
            token_weights=tw,
            normalizer=7.0,
            num_classes=V,
            chunk_size=(4, 8),
            batch_axis_name="data",
        )

    def ent_one(x, w, b):
        return jxent.linear_entropy(
            x, w, temperature=1.3, bias=b, where=where, token_weights=weights, normalizer=7.0
        )

    rows_spec = P("model", None)
    args = (put(x, "data"), put(w_pad.T, *rows_spec), put(b_pad, "model"), put(where, "data"),
            put(weights, "data"))  # fmt: skip

    compare("entropy (vd)", ent_sharded, (tok, rows_spec, P("model"), tok, tok), args, ent_one,
            (x, w, b))  # fmt: skip

    # The Jensen-Shannon divergence from the teacher's top-k.
    def jsd_sharded(x, w, b, i, lp, m, tw):
        return jxent.parallel.linear_softmax_jensen_shannon_divergence(
            x,
            w,
            (i, lp),
            axis_name="model",
            beta=0.4,
            temperature=1.5,
            bias=b,
            where=m,
            token_weights=tw,
            normalizer=9.0,
            num_classes=V,
            chunk_size=(4, 8),
            batch_axis_name="data",
        )

    def jsd_one(x, w, b):
        return jxent.linear_softmax_jensen_shannon_divergence(
            x,
            w,
            (idx, logp),
            beta=0.4,
            temperature=1.5,
            bias=b,
            where=where,
            token_weights=weights,
            normalizer=9.0,
        )

    args = (
        put(x, "data"),
        put(w_pad, *col),
        put(b_pad, "model"),
        put(idx, "data"),
        put(logp, "data"),
        put(where, "data"),
        put(weights, "data"),
    )
    compare("jensen-shannon", jsd_sharded, (tok, col, P("model"), tok, tok, tok, tok), args,
            jsd_one, (x, w, b))  # fmt: skip

    # The teacher as hidden states: its weight split (and padded, NaN/inf) as the student's.
    rng = np.random.default_rng(4)
    x_t, w_t, b_t = rng.normal(size=(N, D + 2)), rng.normal(size=(D + 2, V)), rng.normal(size=(V,))
    w_t_pad = np.concatenate([w_t, np.full((D + 2, PADDED - V), np.inf)], axis=1)
    b_t_pad = np.concatenate([b_t, np.full((PADDED - V,), np.nan)])

    def hidden_sharded(x, w, b, y, xt, wt, bt, m):
        return jxent.parallel.linear_distillation_loss(
            x,
            w,
            y,
            (xt, wt, bt),
            axis_name="model",
            alpha=0.3,
            temperature=2.0,
            bias=b,
            where=m,
            num_classes=V,
            chunk_size=(4, 8),
            logit_soft_cap=5.0,
            batch_axis_name="data",
            w_layout="vd",
        )

    def hidden_one(x, w, b):
        return jxent.linear_distillation_loss(
            x,
            w,
            labels,
            (x_t, w_t, b_t),
            alpha=0.3,
            temperature=2.0,
            bias=b,
            where=where,
            logit_soft_cap=5.0,
        )

    # Both weights as [V, D] tables (w_layout="vd"), their rows split.
    args = (
        put(x, "data"),
        put(w_pad.T, *rows_spec),
        put(b_pad, "model"),
        put(labels, "data"),
        put(x_t, "data"),
        put(w_t_pad.T, *rows_spec),
        put(b_t_pad, "model"),
        put(where, "data"),
    )
    specs = (tok, rows_spec, P("model"), tok, tok, rows_spec, P("model"), tok)
    compare("distillation, hidden teacher (vd)", hidden_sharded, specs, args, hidden_one, (x, w, b))

    # The Jensen-Shannon divergence from hidden states: the second pass's sums combine
    # across the shards. Uncapped with classes the teacher rules out (p = 0 there), and
    # the reverse-KL end with a cap and both weights as [V, D] tables.
    b_t_out = b_t.copy()
    b_t_out[[0, 17, 40]] = -np.inf
    b_t_out_pad = np.concatenate([b_t_out, np.full((PADDED - V,), np.nan)])
    for beta, cap, layout in ((0.6, None, "dv"), (1.0, 3.0, "vd")):
        bias_t = b_t_out if cap is None else b_t

        def jsd_h_sharded(x, w, b, xt, wt, bt, m, tw, beta=beta, cap=cap, layout=layout):
            return jxent.parallel.linear_softmax_jensen_shannon_divergence(
                x,
                w,
                (xt, wt, bt),
                axis_name="model",
                beta=beta,
                temperature=1.5,
                bias=b,
                where=m,
                token_weights=tw,
                num_classes=V,
                chunk_size=(4, 8),
                logit_soft_cap=cap,
                batch_axis_name="data",
                w_layout=layout,
            )

        def jsd_h_one(x, w, b, beta=beta, cap=cap, bias_t=bias_t):
            return jxent.linear_softmax_jensen_shannon_divergence(
                x,
                w,
                (x_t, w_t, bias_t),
                beta=beta,
                temperature=1.5,
                bias=b,
                where=where,
                token_weights=weights,
                logit_soft_cap=cap,
            )

        vd = layout == "vd"
        w_spec = rows_spec if vd else col
        args = (
            put(x, "data"),
            put(w_pad.T if vd else w_pad, *w_spec),
            put(b_pad, "model"),
            put(x_t, "data"),
            put(w_t_pad.T if vd else w_t_pad, *w_spec),
            put(b_t_out_pad if cap is None else b_t_pad, "model"),
            put(where, "data"),
            put(weights, "data"),
        )
        specs = (tok, w_spec, P("model"), tok, w_spec, P("model"), tok, tok)
        name = f"jensen-shannon, hidden teacher, beta={beta} ({layout})"
        compare(name, jsd_h_sharded, specs, args, jsd_h_one, (x, w, b))
    # Every fused loss of arrays typed with Explicit mesh axes (issue 23): the one-device
    # function runs under shard_map over the arrays' mesh, the vocabulary split as w's
    # columns are (padded, NaN / inf there) or not split at all (w whole on every device).
    explicit = jax.sharding.AxisType.Explicit
    emesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(explicit, explicit))
    eput = lambda a, *spec: jax.device_put(jnp.asarray(a), NamedSharding(emesh, P(*spec)))  # noqa: E731

    def compare_explicit(name, fn, args, one_fn):
        got, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(*args)
        want, want_grads = jax.value_and_grad(one_fn, argnums=(0, 1, 2))(x, w, b)
        errors[name] = float(abs(got - want))
        gx, gw, gb = (np.asarray(g) for g in grads)
        gw = gw.T if gw.shape[0] != D else gw  # w given as [V, D] (w_layout="vd")
        errors[name + " dx"] = float(np.max(np.abs(gx - want_grads[0])))
        pad = max(np.max(np.abs(gw[:, V:]), initial=0), np.max(np.abs(gb[V:]), initial=0))
        errors[name + " dw, dbias"] = float(
            max(
                np.max(np.abs(gw[:, :V] - want_grads[1])),
                np.max(np.abs(gb[:V] - want_grads[2])),
                pad,
            )
        )

    e_labels, e_where, e_weights = eput(labels, "data"), eput(where, "data"), eput(weights, "data")
    e_top = (eput(idx, "data", None), eput(logp, "data", None))
    e_teacher = (eput(x_t, "data", None), eput(w_t_pad, None, "model"), eput(b_t_pad, "model"))

    def explicit_lp(x, w, b, y, m):
        lp, h = jxent.linear_log_probs(
            x, w, y, temperature=0.7, return_entropy=True, bias=b, where=m, num_classes=V,
            chunk_size=(4, 8), logit_soft_cap=4.0,
        )  # fmt: skip
        return jnp.sum(lp) + 0.3 * jnp.sum(h)

    split = (eput(x, "data", None), eput(w_pad, None, "model"), eput(b_pad, "model"))
    compare_explicit("explicit log_probs", explicit_lp, (*split, e_labels, e_where), lp_one)

    def explicit_entropy(x, w, b, m, tw):
        return jxent.linear_entropy(
            x, w, w_layout="vd", temperature=1.3, bias=b, where=m, token_weights=tw,
            normalizer=7.0, num_classes=V, chunk_size=(4, 8),
        )  # fmt: skip

    args = (eput(x, "data", None), eput(w_pad.T, "model", None), eput(b_pad, "model"))
    compare_explicit(
        "explicit entropy (vd)", explicit_entropy, (*args, e_where, e_weights), ent_one
    )

    def explicit_kd(x, w, b, y, top, m, tw, num_classes=V):
        return jxent.linear_distillation_loss(
            x, w, y, top, alpha=0.3, temperature=2.0, bias=b, where=m, token_weights=tw,
            normalizer=10.0, num_classes=num_classes, chunk_size=(4, 8),
        )  # fmt: skip

    kd_one_03 = functools.partial(kd_one_for, alpha=0.3, norm=10.0)
    rest = (e_labels, e_top, e_where, e_weights)
    compare_explicit("explicit distillation", explicit_kd, (*split, *rest), kd_one_03)
    # The vocabulary not split: each device's tokens against the whole (unpadded) w.
    whole = (eput(x, "data", None), eput(w, None, None), eput(b, None))
    compare_explicit(
        "explicit distillation (w whole)",
        functools.partial(explicit_kd, num_classes=None),
        (*whole, *rest),
        kd_one_03,
    )

    def explicit_jsd(x, w, b, teacher, m, tw):
        return jxent.linear_softmax_jensen_shannon_divergence(
            x, w, teacher, beta=0.6, temperature=1.5, bias=b, where=m, token_weights=tw,
            num_classes=V, chunk_size=(4, 8),
        )  # fmt: skip

    def jsd_one_06(x, w, b):
        return jxent.linear_softmax_jensen_shannon_divergence(
            x, w, (x_t, w_t, b_t), beta=0.6, temperature=1.5, bias=b, where=where,
            token_weights=weights,
        )  # fmt: skip

    compare_explicit(
        "explicit jensen-shannon, hidden teacher",
        explicit_jsd,
        (*split, e_teacher, e_where, e_weights),
        jsd_one_06,
    )

    # Entropy alone is the contract's own test (tests/test_fused_contract.py); here the
    # three losses' values also match the unfused float64 composition.
    z = x @ w + b
    lq = jax.nn.log_softmax(z / 2.0)
    kl = 4.0 * np.sum(
        np.where(
            np.isfinite(logp),
            np.exp(logp) * (logp - np.take_along_axis(np.asarray(lq), idx, -1)),
            0,
        ),
        -1,
    )
    want = np.sum(np.where(where, weights * kl, 0)) / np.sum(np.where(where, weights, 0))
    got = jxent.linear_softmax_kl_divergence(
        x, w, (idx, logp), temperature=2.0, bias=b, where=where, token_weights=weights
    )
    errors["kl vs unfused"] = float(abs(got - want))
    ce = -np.take_along_axis(np.asarray(jax.nn.log_softmax(z)), labels[:, None], -1)[:, 0]
    mixed = 0.3 * ce + 0.7 * kl
    want = np.sum(np.where(where, weights * mixed, 0)) / np.sum(np.where(where, weights, 0))
    got = jxent.linear_distillation_loss(
        x,
        w,
        labels,
        (idx, logp),
        alpha=0.3,
        temperature=2.0,
        bias=b,
        where=where,
        token_weights=weights,
    )
    errors["distillation vs unfused"] = float(abs(got - want))
    lp = np.take_along_axis(
        np.asarray(jax.nn.log_softmax(np.tanh(z / 4.0) * 4.0 / 0.7)), labels[:, None], -1
    )[:, 0]
    got = jxent.linear_log_probs(x, w, labels, temperature=0.7, bias=b, logit_soft_cap=4.0)
    errors["log_probs vs unfused"] = float(np.max(np.abs(np.asarray(got) - lp)))
    print(json.dumps(errors))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _main()
