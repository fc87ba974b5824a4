"""The fused-loss contract (jxent/_fused/engine.py): a loss written to it inherits the
engine's schedules, grouped blocks, padding columns, soft cap and vocabulary-parallel form.

``Entropy`` below is a second fused loss, the entropy of ``softmax(x @ w)`` per token, in
about thirty lines: one exp-gap row sum, no picks. It is checked against an independent
float64 NumPy reference (values and gradients) on one device, with every block layout,
with padding columns holding NaN and inf, with a soft cap, in float32 with x64 off, and
under ``shard_map`` with ``w`` split over 4 devices (a subprocess: this file run as a
script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import NamedTuple

import checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jxent._fused import contract, engine, plan


class Entropy(NamedTuple):
    """``H = lse - sum_k p_k z_k = log s + sum_k e^{z_k - m} (m - z_k) / s`` per token.

    ``dH/dz_k = -p_k (log p_k + H)``, linear in the coefficients ``(1, H)`` times the
    cotangent. ``rows``: the per-token mask of the tokens that count (or None)."""

    def row_sums(self, columns):
        return {"h": contract.RowSum("exp_gap")}

    def pick_shapes(self, columns):
        return {}

    def picks(self, z, view):
        return {}

    def finish(self, sums, keep, num_classes):
        h = sums.lse_rel + sums.sums["h"] / sums.sums["h/exp"]
        one = jnp.ones_like(h)
        if keep is not None:
            h, one = jnp.where(keep, h, 0), jnp.where(keep, one, 0)
        return h, (one, h)

    def dlogits(self, p, log_p, coefs, view):
        one, h = coefs
        return -(one[:, None] * (p * log_p)) - h[:, None] * p


def fused_entropy(x, w, *, chunk_size=None, soft_cap=None, num_classes=None, axis_name=None):
    """Per-token entropy of softmax(x @ w) through the engine (x [N, D], w [D, V])."""
    n, d = x.shape
    columns = w.shape[1]
    acc_bytes = 8 if x.dtype == jnp.float64 else 4
    plans, _ = plan.plans(n, d, columns, "none", chunk_size, acc_bytes, grouped=axis_name is None)
    real = None
    if num_classes is not None:
        first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * columns
        real = first + jnp.arange(columns) < num_classes
    spec = contract.Spec(Entropy(), plans, soft_cap, num_classes, axis_name)
    return engine.per_token_loss(spec, x, w, None, None, None, real)


def reference(x, w, cotangent, soft_cap=None):
    """float64 NumPy: entropy per token and the gradients of sum(cotangent * H)."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, cotangent))
    u = x @ w
    z = u if soft_cap is None else soft_cap * np.tanh(u / soft_cap)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    h = -(p * log_p).sum(axis=1)
    dz = g[:, None] * (-p * (log_p + h[:, None]))
    if soft_cap is not None:
        dz *= 1 - np.tanh(u / soft_cap) ** 2
    return h, dz @ w.T, x.T @ dz


def _inputs(n, d, v, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 2
    w = rng.normal(size=(d, v))
    g = rng.normal(size=(n,))
    return x.astype(dtype), w.astype(dtype), g.astype(dtype)


def _value_and_grads(fn, x, w, g):
    h, vjp = jax.vjp(fn, x, w)
    return (h, *vjp(g))


@pytest.mark.parametrize("chunk_size", [None, 16, (8, 48), (5, 7), (32, 200)])
@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_entropy_on_one_device(chunk_size, soft_cap):
    """Every block layout (groups, shorter last blocks, one block) and the soft cap."""
    x, w, g = _inputs(32, 6, 200)
    got = _value_and_grads(
        lambda x, w: fused_entropy(x, w, chunk_size=chunk_size, soft_cap=soft_cap),
        jnp.asarray(x),
        jnp.asarray(w),
        jnp.asarray(g),
    )
    for a, b in zip(got, reference(x, w, g, soft_cap), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-12)


def test_entropy_padding_columns_take_no_part():
    """Padding columns holding NaN and inf: the loss and gradients of the real columns,
    and exactly zero gradient on the padding."""
    x, w, g = _inputs(16, 5, 60)
    padded = np.concatenate([w, np.full((5, 4), np.nan)], axis=1)
    padded[0, -1] = np.inf
    got = _value_and_grads(
        lambda x, w: fused_entropy(x, w, chunk_size=(8, 24), num_classes=60),
        jnp.asarray(x),
        jnp.asarray(padded),
        jnp.asarray(g),
    )
    h, dx, dw = reference(x, w, g)
    np.testing.assert_allclose(np.asarray(got[0]), h, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(got[1]), dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got[2])[:, :60], dw, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(got[2])[:, 60:] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_entropy_in_low_precision(dtype):
    """float32 / bfloat16 inputs with x64 off: within an epsilon-derived bound of the
    float64 reference of the same (rounded) inputs."""
    x, w, g = _inputs(24, 8, 300, seed=3)
    with checks.x64_off():
        xs, ws = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
        h = fused_entropy(xs, ws, chunk_size=(8, 64))
        assert h.dtype == jnp.float32
        want, _, _ = reference(np.asarray(xs, np.float64), np.asarray(ws, np.float64), g)
        # Logits accumulate D products in float32; the sums run over V classes.
        tol = checks.float_tolerance(np.float32, 8 * 300, 10.0)
        np.testing.assert_allclose(np.asarray(h, np.float64), want, rtol=tol, atol=tol)


def test_entropy_vocabulary_parallel():
    """shard_map over 4 devices with w split over its columns (padded by 2): equal to one
    device, values and gradients (run in a subprocess with 4 CPU devices)."""
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
    assert set(errors) == {"loss", "dx", "dw"}
    for name, err in errors.items():
        assert err < 1e-10, (name, err)


def _parallel_main() -> None:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4
    x, w, g = _inputs(12, 5, 62, seed=5)  # 62 classes padded to 64 = 4 x 16 columns
    padded = np.concatenate([w, np.full((5, 2), np.nan)], axis=1)
    mesh = jax.make_mesh((4,), ("model",))

    def local(x, w_local):
        return fused_entropy(x, w_local, chunk_size=(4, 8), num_classes=62, axis_name="model")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "model")), out_specs=P())
    args = (
        jax.device_put(jnp.asarray(x), NamedSharding(mesh, P())),
        jax.device_put(jnp.asarray(padded), NamedSharding(mesh, P(None, "model"))),
    )
    h, vjp = jax.vjp(jax.jit(sharded), *args)
    dx, dw = vjp(jnp.asarray(g))
    want_h, want_dx, want_dw = reference(x, w, g)
    dw = np.asarray(dw)
    errors = {
        "loss": float(np.max(np.abs(np.asarray(h) - want_h))),
        "dx": float(np.max(np.abs(np.asarray(dx) - want_dx))),
        "dw": float(max(np.max(np.abs(dw[:, :62] - want_dw)), np.max(np.abs(dw[:, 62:])))),
    }
    print(json.dumps(errors))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _parallel_main()
