"""Distillation from a teacher's top-k log-probabilities, with a hard-label term, on the
engine.

With ``T`` the temperature, ``z`` the engine's logits divided by ``T`` (the student's
``q = softmax(z)``), ``m`` their row maximum, ``lse = m + log s``, and the teacher's
top-k classes ``K`` with probabilities ``p_k = exp(log p_k)`` (``P = sum_k p_k``):

    KL  = T^2 sum_k p_k (log p_k - log q_k)
        = T^2 [ sum_k p_k log p_k + sum_k p_k (m - z_k) + P log s ]
    CE  = lse(T z) - T z_y = T (m - z_y) + log S,    S = sum_j exp(T (z_j - m))
    loss = alpha CE + (1 - alpha) KL

``KL`` needs ``k`` picks (the student's logits at the teacher's classes); ``CE`` one
pick and one exp row sum at power ``T`` (the softmax at temperature 1). The gradient
with respect to ``z`` (the engine divides by ``T`` for the raw logits):

    d/dz_j = c_q q_j - c_K p_j [j in K] + c_CE (p1_j - [j = y])

with ``c_q = (1 - alpha) T^2 P``, ``c_K = (1 - alpha) T^2``, ``c_CE = alpha T`` (times the
cotangent), ``p1_j = exp(T log q_j + T log s - log S)`` (``T log s - log S`` is the
unscaled per-token number of the backward pass).

Internal API: :class:`Distillation` and :class:`JensenShannon` (the losses),
:class:`TopKRows` (their inputs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent._fused import engine


class TopKRows(NamedTuple):
    """Per-token inputs: ``index`` int32 ``[N, k]`` (the teacher's classes as columns on
    this device, -1 elsewhere), ``known`` bool ``[N, k]`` (the index is a real class),
    ``log_p`` ``[N, k]`` (the teacher's log-probabilities, accumulation dtype),
    ``labels``/``valid`` ``[N]`` for the hard-label term (None without it), ``keep``
    bool ``[N]`` and ``weights`` float ``[N]`` (None: all)."""

    index: jax.Array
    known: jax.Array
    log_p: jax.Array
    labels: jax.Array | None
    valid: jax.Array | None
    keep: jax.Array | None
    weights: jax.Array | None


class Distillation(NamedTuple):
    """``alpha`` CE + (1 - ``alpha``) KL at ``temperature`` (static numbers), from the
    teacher's top ``k`` classes."""

    temperature: float
    alpha: float
    k: int

    scatters = True  # the teacher's k values go into each block of dz (smaller panels)

    def row_sums(self, columns):
        if self.alpha == 0:
            return {}
        return {"ce": engine.RowSum("exp", power=self.temperature)}

    def pick_shapes(self, columns):
        return {"z_top": (self.k,), "z_label": ()} if self.alpha else {"z_top": (self.k,)}

    def picks(self, z, view: engine.View):
        out = {"z_top": engine.pick_columns(z, view, view.rows.index)}
        if self.alpha:
            out["z_label"] = engine.pick_columns(z, view, view.rows.labels)
        return out

    def finish(self, sums: engine.RowSums, rows: TopKRows, num_classes: int):
        t, a = self.temperature, self.alpha
        m = sums.row_max
        acc = m.dtype
        zero = jnp.zeros((), acc)
        p = jnp.exp(rows.log_p)
        given = p > 0
        # A class the teacher gives weight to must be one of the student's.
        bad = jnp.any(given & ~rows.known, axis=-1)
        terms = jnp.where(given, p * (rows.log_p + (m[:, None] - sums.picks["z_top"])), zero)
        big_p = jnp.sum(p, axis=-1)
        kl = (t * t) * (jnp.sum(terms, axis=-1) + big_p * sums.lse_rel)
        kl = jnp.where(bad, jnp.nan, kl)
        loss = (1 - a) * kl
        c_q, c_top = (1 - a) * (t * t) * big_p, jnp.full_like(m, (1 - a) * (t * t))
        log_s = jnp.zeros_like(m)
        c_ce = None
        if a:
            log_s = jnp.log(sums.sums["ce"])
            valid = rows.labels >= 0 if rows.valid is None else rows.valid
            ce = t * (m - sums.picks["z_label"]) + log_s
            loss = loss + a * jnp.where(valid, ce, jnp.nan)
            c_ce = jnp.where(valid, jnp.full_like(m, a * t), jnp.nan)
        # The loss is NaN there: so is its gradient (never a plausible training signal).
        c_q, c_top = (jnp.where(bad, jnp.nan, c) for c in (c_q, c_top))
        coefs = (c_q, c_top, c_ce)
        if rows.keep is not None:
            loss = jnp.where(rows.keep, loss, zero)
            coefs = jax.tree.map(lambda c: jnp.where(rows.keep, c, zero), coefs)
        loss, coefs = engine.weighted(rows.weights, loss, coefs)
        return loss, coefs, t * sums.lse_rel - log_s

    def dlogits(self, q, log_q, coefs, view: engine.View):
        c_q, c_top, c_ce = coefs
        rows = view.rows
        p_top = jnp.exp(rows.log_p)
        dz = c_q[:, None] * q
        dz = engine.add_at_columns(dz, view, rows.index, -c_top[:, None] * p_top)
        if c_ce is not None:
            p1 = jnp.exp(self.temperature * log_q + view.fixed[:, None])
            index = view.column_of(rows.labels)
            is_label = lax.broadcasted_iota(index.dtype, q.shape, 1) == index[:, None]
            dz = dz + c_ce[:, None] * (p1 - is_label.astype(q.dtype))
        return dz


class JensenShannon(NamedTuple):
    """The generalised JSD of the teacher's top-k ``p`` (0 off its classes ``K``: those
    with ``p > 0``, which must be distinct) and the student's ``q = softmax(z)``, with
    ``m = beta p + (1 - beta) q``, ``0 <= beta < 1`` (static):

        JSD = beta KL(p || m) + (1 - beta) KL(q || m)         (beta = 0: KL(p || q))
        KL(p || m) = sum_K p_k (log p_k - log m_k)
        KL(q || m) = sum_K q_k (log q_k - log m_k) - (1 - Q) log(1 - beta)

    with ``Q = sum_K q_k``: off ``K``, ``m_j = (1 - beta) q_j``. Only picks: the student's
    logits at ``K``. With ``g_j = dJSD/dq_j`` (``(1 - beta)(log q_j - log m_j)`` on ``K``,
    ``c0 = -(1 - beta) log(1 - beta)`` off it) and ``gbar = sum_j q_j g_j``:

        d/dz_j = (c0 - gbar) q_j + [j in K] q_j (g_j - c0)

    (``beta = 0``: ``P q_j - p_j [j in K]``). Coefficients: ``c0 - gbar`` and the ``k``
    per-class values, scattered into the block."""

    beta: float
    k: int

    scatters = True

    def row_sums(self, columns):
        return {}

    def pick_shapes(self, columns):
        return {"z_top": (self.k,)}

    def picks(self, z, view: engine.View):
        return {"z_top": engine.pick_columns(z, view, view.rows.index)}

    def finish(self, sums: engine.RowSums, rows: TopKRows, num_classes: int):
        b = self.beta
        m = sums.row_max
        zero = jnp.zeros((), m.dtype)
        log_p = rows.log_p
        p = jnp.exp(log_p)
        given = p > 0
        bad = jnp.any(given & ~rows.known, axis=-1)
        # An entry with p = 0 is a class off K (whatever its index, even one repeated):
        # its q stays in the off-K mass 1 - Q.
        in_k = given & rows.known
        log_q = (sums.picks["z_top"] - m[:, None]) - sums.lse_rel[:, None]
        q = jnp.where(in_k, jnp.exp(log_q), zero)
        log_q = jnp.where(in_k, log_q, zero)

        def xlog(a, log_a, log_b):  # a (log a - log b), 0 where a = 0
            ok = a > 0
            return jnp.where(ok, a * (log_a - jnp.where(ok, log_b, zero)), zero)

        if b == 0:
            loss = jnp.sum(xlog(p, log_p, log_q), -1)
            c_q = jnp.sum(p, -1)
            values = -p
        else:
            log_m = jnp.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
            log_m = jnp.where(in_k, log_m, zero)
            rest = 1 - jnp.sum(q, -1)  # the student's mass off the teacher's classes
            c0 = -(1 - b) * math.log1p(-b)
            kl_q = jnp.sum(xlog(q, log_q, log_m), -1) + rest * -math.log1p(-b)
            loss = b * jnp.sum(xlog(p, log_p, log_m), -1) + (1 - b) * kl_q
            g = jnp.where(q > 0, (1 - b) * (log_q - log_m), zero)
            gbar = c0 * rest + jnp.sum(q * g, -1)
            c_q = c0 - gbar
            values = jnp.where(in_k, q * (g - c0), zero)
        loss = jnp.where(bad, jnp.nan, jnp.maximum(loss, zero))
        coefs = (jnp.where(bad, jnp.nan, c_q), jnp.where(bad[:, None], jnp.nan, values))
        if rows.keep is not None:
            loss = jnp.where(rows.keep, loss, zero)
            coefs = (
                jnp.where(rows.keep, coefs[0], zero),
                jnp.where(rows.keep[:, None], coefs[1], zero),
            )
        if rows.weights is not None:
            loss = loss * rows.weights
            coefs = (coefs[0] * rows.weights, coefs[1] * rows.weights[:, None])
        return loss, coefs

    def dlogits(self, q, log_q, coefs, view: engine.View):
        c_q, values = coefs
        return engine.add_at_columns(c_q[:, None] * q, view, view.rows.index, values)
