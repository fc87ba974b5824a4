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

With the teacher given as its own hidden states and weight (:class:`TeacherDistillation`,
the engine's second logits stream ``t``, at the same temperature and cap, with its
log-sum-exp ``lse_t = m_t + log s_t`` and ``p = softmax(t)``), the sum runs over the
whole vocabulary and needs one cross row sum ``X = sum_j exp(t_j - m_t) (t_j - z_j)``:

    KL  = T^2 [ X / s_t - lse_t + lse ],       d/dz_j = c_q (q_j - p_j)

``p_j`` recomputed in the backward pass from the teacher's block and the unscaled
per-token ``m_t``, ``log s_t``.

The generalised Jensen-Shannon divergence: from a top-k teacher (:class:`JensenShannon`)
with picks alone; from a teacher's logits stream (:class:`TeacherJensenShannon`), whose
mixture ``m = beta p + (1 - beta) q`` needs both normalised distributions at every class,
with a second forward pass (``contract.SecondPass``) once both log-sum-exps are known.

Internal API: :class:`Distillation`, :class:`TeacherDistillation`,
:class:`JensenShannon` and :class:`TeacherJensenShannon` (the losses),
:func:`jensen_shannon` (the JSD's loss for either teacher, any ``beta``),
:func:`distillation` (the distillation loss for either teacher), :class:`TopKRows`
(their inputs), :func:`from_teacher` (the whole fused loss of a checked call).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent._fused import contract, driver, explicit, options
from jxent._fused.options import TOKENS_SPEC, Call
from jxent._softmax import xlog_ratio
from jxent._split import check_split, check_unsplit


class TopKRows(NamedTuple):
    """Per-token inputs: ``index`` int32 ``[N, k]`` (the teacher's classes as columns on
    this device, -1 elsewhere), ``known`` bool ``[N, k]`` (the index is a real class),
    ``log_p`` ``[N, k]`` (the teacher's log-probabilities, accumulation dtype; these
    three None with a teacher given as hidden states),
    ``labels``/``valid`` ``[N]`` for the hard-label term (None without it), ``keep``
    bool ``[N]`` and ``weights`` float ``[N]`` (None: all)."""

    index: jax.Array | None
    known: jax.Array | None
    log_p: jax.Array | None
    labels: jax.Array | None
    valid: jax.Array | None
    keep: jax.Array | None
    weights: jax.Array | None


def _hard_label(temperature: float, alpha: float, sums: contract.RowSums, rows: TopKRows):
    """``alpha`` times the cross-entropy at temperature 1 of the engine's logits ``z``
    at ``T``: ``(alpha CE, its coefficient, log S)`` (``(0, None, 0)`` for ``alpha = 0``),
    NaN for a kept label that is not a class."""
    m = sums.row_max
    if not alpha:
        return jnp.zeros_like(m), None, jnp.zeros_like(m)
    log_s = jnp.log(sums.sums["ce"])
    valid = rows.labels >= 0 if rows.valid is None else rows.valid
    ce = temperature * (m - sums.picks["z_label"]) + log_s
    c_ce = jnp.where(valid, jnp.full_like(m, alpha * temperature), jnp.nan)
    return alpha * jnp.where(valid, ce, jnp.nan), c_ce, log_s


def _hard_label_dlogits(temperature, q, log_q, c_ce, shift, view: contract.View):
    """The hard-label term's ``dloss/dz``: ``c_ce (p1 - [j = y])``, ``p1`` the softmax
    at temperature 1, ``exp(T log q + shift)`` (``shift = T log s - log S``)."""
    p1 = jnp.exp(temperature * log_q + shift[:, None])
    index = view.column_of(view.rows.labels)
    is_label = lax.broadcasted_iota(index.dtype, q.shape, 1) == index[:, None]
    return c_ce[:, None] * (p1 - is_label.astype(q.dtype))


def _top_k_and_label(rows: TopKRows, alpha: float) -> jax.Array:
    """A top-k loss's target columns ``[N, k (+ 1)]``: the teacher's classes, and with
    the hard-label term the label where it is not one of them (each column once)."""
    if not alpha:
        return rows.index
    among = jnp.any(rows.index == rows.labels[:, None], axis=1)
    label = jnp.where(among, -1, rows.labels)
    return jnp.concatenate([rows.index, label[:, None].astype(rows.index.dtype)], axis=1)


def _dropped(rows: TopKRows, loss, coefs):
    """The loss and its coefficients 0 on dropped tokens, times the token weights."""
    if rows.keep is not None:
        zero = jnp.zeros((), loss.dtype)
        loss = jnp.where(rows.keep, loss, zero)
        keep = lambda c: rows.keep.reshape(rows.keep.shape + (1,) * (c.ndim - 1))  # noqa: E731
        coefs = jax.tree.map(lambda c: jnp.where(keep(c), c, zero), coefs)
    return contract.weighted(rows.weights, loss, coefs)


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
        return {"ce": contract.RowSum("exp", power=self.temperature)}

    def pick_shapes(self, columns):
        return {"z_top": (self.k,), "z_label": ()} if self.alpha else {"z_top": (self.k,)}

    def picks(self, z, view: contract.View):
        out = {"z_top": contract.pick_columns(z, view, view.rows.index)}
        if self.alpha:
            out["z_label"] = contract.pick_columns(z, view, view.rows.labels)
        return out

    def finish(self, sums: contract.RowSums, rows: TopKRows, num_classes: int):
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
        ce, c_ce, log_s = _hard_label(t, a, sums, rows)
        # The loss is NaN there: so is its gradient (never a plausible training signal).
        c_q, c_top = (jnp.where(bad, jnp.nan, c) for c in (c_q, c_top))
        loss, coefs = _dropped(rows, loss + ce, (c_q, c_top, c_ce))
        return loss, coefs, t * sums.lse_rel - log_s

    def targets(self, view: contract.View):
        return _top_k_and_label(view.rows, self.alpha)

    def dlogits(self, q, log_q, coefs, view: contract.View):
        c_q, c_top, c_ce = coefs
        rows = view.rows
        p_top = jnp.exp(rows.log_p)
        dz = c_q[:, None] * q
        dz = contract.add_at_columns(dz, view, rows.index, -c_top[:, None] * p_top)
        if c_ce is not None:
            dz = dz + _hard_label_dlogits(self.temperature, q, log_q, c_ce, view.fixed, view)
        return dz


class TeacherDistillation(NamedTuple):
    """``alpha`` CE + (1 - ``alpha``) KL at ``temperature`` (static numbers), the teacher's
    full distribution from its own logits stream (``contract.Inputs.teacher``)."""

    temperature: float
    alpha: float

    def row_sums(self, columns):
        sums = {"kl": contract.RowSum("cross")}
        if self.alpha:
            sums["ce"] = contract.RowSum("exp", power=self.temperature)
        return sums

    def pick_shapes(self, columns):
        return {"z_label": ()} if self.alpha else {}

    def picks(self, z, view: contract.View):
        if not self.alpha:
            return {}
        return {"z_label": contract.pick_columns(z, view, view.rows.labels)}

    def finish(self, sums: contract.RowSums, rows: TopKRows, num_classes: int):
        t, a = self.temperature, self.alpha
        m, mt = sums.row_max, sums.teacher_max
        s_t = jnp.exp(sums.teacher_lse_rel)
        # E_p[t - z] - lse_t + lse: the maxima's difference apart, each part is small.
        kl = sums.sums["kl"] / s_t + (m - mt) + (sums.lse_rel - sums.teacher_lse_rel)
        kl = (t * t) * jnp.maximum(kl, jnp.zeros((), m.dtype))
        ce, c_ce, log_s = _hard_label(t, a, sums, rows)
        loss, coefs = _dropped(rows, (1 - a) * kl + ce, (jnp.full_like(m, (1 - a) * t * t), c_ce))
        return loss, coefs, (t * sums.lse_rel - log_s, mt, sums.teacher_lse_rel)

    def targets(self, view: contract.View):
        return view.rows.labels if self.alpha else None

    def dlogits(self, q, log_q, coefs, view: contract.View):
        c_q, c_ce = coefs
        shift, mt, lse_t = view.fixed
        p = jnp.exp((view.teacher - mt[:, None]) - lse_t[:, None])
        dz = c_q[:, None] * (q - p)
        if c_ce is not None:
            dz = dz + _hard_label_dlogits(self.temperature, q, log_q, c_ce, shift, view)
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

    def picks(self, z, view: contract.View):
        return {"z_top": contract.pick_columns(z, view, view.rows.index)}

    def finish(self, sums: contract.RowSums, rows: TopKRows, num_classes: int):
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
        if b == 0:
            loss = jnp.sum(xlog_ratio(p, log_p, log_q), -1)
            c_q = jnp.sum(p, -1)
            values = -p
        else:
            log_m = jnp.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
            log_m = jnp.where(in_k, log_m, zero)
            rest = 1 - jnp.sum(q, -1)  # the student's mass off the teacher's classes
            c0 = -(1 - b) * math.log1p(-b)
            kl_q = jnp.sum(xlog_ratio(q, log_q, log_m), -1) + rest * -math.log1p(-b)
            loss = b * jnp.sum(xlog_ratio(p, log_p, log_m), -1) + (1 - b) * kl_q
            g = jnp.where(q > 0, (1 - b) * (log_q - log_m), zero)
            gbar = c0 * rest + jnp.sum(q * g, -1)
            c_q = c0 - gbar
            values = jnp.where(in_k, q * (g - c0), zero)
        loss = jnp.where(bad, jnp.nan, jnp.maximum(loss, zero))
        coefs = (jnp.where(bad, jnp.nan, c_q), jnp.where(bad[:, None], jnp.nan, values))
        return _dropped(rows, loss, coefs)

    def targets(self, view: contract.View):
        return view.rows.index

    def dlogits(self, q, log_q, coefs, view: contract.View):
        c_q, values = coefs
        return contract.add_at_columns(c_q[:, None] * q, view, view.rows.index, values)


class TeacherJensenShannon(NamedTuple):
    """The generalised JSD of the teacher's full ``p = softmax(t)`` (its logits stream,
    ``contract.Inputs.teacher``) and the student's ``q = softmax(z)``, ``0 < beta <= 1``
    (static; ``beta = 0`` is :func:`jensen_shannon`'s one-pass forward KL). With
    ``m = beta p + (1 - beta) q`` (``log m`` a ``logaddexp`` of ``log p`` and ``log q``;
    ``m = p`` at ``beta = 1``, where the divergence is the reverse ``KL(q || p)``):

        JSD = sum_j J_j,   J_j = beta p_j (log p_j - log m_j) + (1 - beta) q_j (log q_j - log m_j)
        S   = sum_j q_j (log q_j - log m_j)                         (KL(q || m))
        d/dz_j = c q_j [(log q_j - log m_j) - S],   c = 1 - beta (1 at beta = 1)

    (``dJSD/dq_j = c (log q_j - log m_j)``: the derivative of ``-sum m log m`` cancels the
    others' ``+1``; through the softmax, ``q_j (g_j - sum_k q_k g_k)``). Each ``J_j`` is
    ``>= 0`` (the log-sum inequality): the loss is a sum of non-negative terms. ``J`` and
    ``S`` are the second pass's row sums, with the first pass's ``lse`` and ``lse_t``
    fixed; the backward pass recomputes ``p`` and ``log m`` per block from the unscaled
    ``S``, ``m_t`` and ``log s_t``. A class the teacher rules out (``t = -inf``, so
    ``p = 0``) adds exactly 0 to the ``p`` terms; at ``beta = 1`` it makes the divergence
    ``+inf`` (the student's mass there has no teacher mass to be compared with)."""

    beta: float

    def row_sums(self, columns):
        return {}

    def pick_shapes(self, columns):
        return {}

    def picks(self, z, view: contract.View):
        return {}

    def _logs(self, log_q, view: contract.View):
        """``(log p, log m)`` of a block: the teacher's from its logits and the first
        pass's ``m_t``, ``log s_t`` (the last two of ``view.fixed``)."""
        mt, lse_t = view.fixed[-2:]
        log_p = (view.teacher - mt[:, None]) - lse_t[:, None]
        if self.beta == 1:
            return log_p, log_p
        b = self.beta
        return log_p, jnp.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))

    def second_pass(self, sums: contract.RowSums, rows: TopKRows):
        names = ("kl_q", "ruled_out") if self.beta == 1 else ("jsd", "kl_q")
        return contract.SecondPass(names, (sums.teacher_max, sums.teacher_lse_rel))

    def second_terms(self, q, log_q, view: contract.View):
        log_p, log_m = self._logs(log_q, view)
        kl_q = xlog_ratio(q, log_q, log_m)
        if self.beta == 1:
            # A class the teacher rules out (p = 0 < q: a +inf term) is counted, not
            # added: a compensated sum of +inf is NaN.
            out = jnp.isneginf(log_p) & (q > 0)
            kl_q = jnp.where(out, jnp.zeros((), q.dtype), kl_q)
            return {"kl_q": kl_q, "ruled_out": out.astype(q.dtype)}
        b = self.beta
        return {"jsd": b * xlog_ratio(jnp.exp(log_p), log_p, log_m) + (1 - b) * kl_q, "kl_q": kl_q}

    def finish(self, sums: contract.RowSums, rows: TopKRows, num_classes: int):
        kl_q = sums.second["kl_q"]
        if self.beta == 1:
            kl_q = jnp.where(sums.second["ruled_out"] > 0, jnp.inf, kl_q)
        loss = kl_q if self.beta == 1 else sums.second["jsd"]
        # A divergence is >= 0; rounding can leave a value a few ulps below 0.
        loss = jnp.maximum(loss, jnp.zeros((), loss.dtype))
        c = jnp.full_like(kl_q, 1.0 if self.beta == 1 else 1 - self.beta)
        loss, coefs = _dropped(rows, loss, (c,))
        return loss, coefs, (kl_q, sums.teacher_max, sums.teacher_lse_rel)

    def dlogits(self, q, log_q, coefs, view: contract.View):
        (c,) = coefs
        kl_q = view.fixed[0]
        _, log_m = self._logs(log_q, view)
        zero = jnp.zeros((), q.dtype)
        # 0 where q = 0 (a student's -inf logit, where log q - log m is not finite).
        g = jnp.where(q > 0, log_q - jnp.where(q > 0, log_m, zero), zero)
        dz = c[:, None] * (q * (g - kl_q[:, None]))
        if self.beta == 1:
            # kl_q and g are +inf where the teacher rules a class out (the loss is +inf,
            # its gradient NaN): a token whose coefficient is 0 (dropped) still gives 0.
            dz = jnp.where(c[:, None] != 0, dz, zero)
        return dz


def jensen_shannon(beta: float, k: int | None):
    """The JSD's loss: from a teacher's top ``k`` (:class:`JensenShannon`), or (``k``
    None) from its logits stream, ``0 <= beta <= 1``: at ``beta = 0`` the forward
    ``KL(p || q)``, which one pass gives (:class:`TeacherDistillation` at ``T = 1``: its
    ``T`` only scales the KL by ``T^2`` and weights the hard label, while the engine's
    temperature makes the logits), else :class:`TeacherJensenShannon`."""
    if k is not None:
        return JensenShannon(beta, k)
    if beta == 0:
        return TeacherDistillation(1.0, 0.0)
    return TeacherJensenShannon(beta)


def distillation(temperature: float, alpha: float, k: int | None):
    """The distillation loss: from a top-``k`` teacher (:class:`Distillation`), or (``k``
    None) from its logits stream (:class:`TeacherDistillation`)."""
    if k is None:
        return TeacherDistillation(temperature, alpha)
    return Distillation(temperature, alpha, k)


def from_teacher(call: Call, teacher, make_loss) -> jax.Array:
    """A loss against a ``teacher`` (its top-k ``(indices, log_probs)``, or its hidden
    states and weight ``(x_t, w_t[, bias_t])``, checked here) of a checked call, under
    its reduction: ``make_loss(k, temperature)`` (``k`` None for hidden states) on one
    device or every shard. The call's labels (if any) are the hard-label term's."""
    opts, batch_shape = call.options, call.batch_shape
    hidden = options.is_hidden_teacher(teacher)
    if hidden:
        teacher = options.hidden_teacher(teacher, batch_shape, call.w, opts.w_layout, call.acc)
    else:
        teacher = options.top_k_teacher(teacher, batch_shape)
    if explicit.sharded(call):
        body = lambda c, t: from_teacher(c, t, make_loss)  # noqa: E731
        kind = explicit.TOKENS if opts.reduction == "none" else explicit.SCALAR
        return explicit.run(body, call, teacher, kind)
    n = math.prod(batch_shape)
    split = opts.split
    temperature = 1.0 if opts.temperature is None else opts.temperature
    here = valid = None
    if call.labels is not None:
        here, valid = driver.class_columns(call, call.labels.reshape(n))
    keep = None if call.row_mask is None else call.row_mask.reshape(n)
    rows = TopKRows(None, None, None, here, valid, keep, driver.flat(call.token_weights))
    stream = None
    if hidden:
        x_t, w_t, b_t = teacher
        if split is not None:
            check_unsplit("teacher[0] (x_t)", x_t, split, TOKENS_SPEC)
            check_split("teacher[1] (local_w_t)", w_t, split)
            if b_t is not None:
                check_split("teacher[2] (local_bias_t)", b_t, split)
        stream = lax.stop_gradient((x_t.reshape(n, x_t.shape[-1]), w_t, b_t))
        loss = make_loss(None, temperature)
    else:
        indices, log_probs = teacher
        if split is not None:
            check_unsplit("teacher[0] (indices)", indices, split, TOKENS_SPEC)
            check_unsplit("teacher[1] (log_probs)", log_probs, split, TOKENS_SPEC)
        k = indices.shape[-1]
        index, known = driver.class_columns(call, indices.reshape(n, k), known=True)
        log_p = lax.stop_gradient(log_probs.reshape(n, k).astype(call.acc))
        rows = rows._replace(index=index, known=known, log_p=log_p)
        loss = make_loss(k, temperature)
    result, summed = driver.run(loss, call, rows, teacher=stream)
    weight = driver.weighted_denominator(call, call.row_mask)
    return driver.reduce(call, result, summed, weight)
