"""Independent float64 NumPy reference for jxent's fused losses beyond cross-entropy:
``linear_log_probs`` (with the entropy), ``linear_entropy``,
``linear_softmax_kl_divergence`` (teacher's top-k), ``linear_distillation_loss``,
``linear_softmax_jensen_shannon_divergence``, and the new options of
``linear_softmax_cross_entropy`` (``token_weights``, ``normalizer``, ``return_lse``).

Written from the formulas, row by row, with NumPy only (never imports jxent). With
``u = c tanh((x @ w + b) / c)`` the (soft-capped) logits at temperature 1 over the first
``num_classes`` columns (the rest is padding: never read, zero gradient) and
``z = u / T``, ``q = softmax(z)``:

    log_probs:  log q_y = z_y - lse(z)                 d/du_k = ([k = y] - q_k) / T
    entropy:    H = -sum_k q_k log q_k                 d/du_k = -q_k (log q_k + H) / T
    KL (top-k): T^2 sum_k p_k (log p_k - log q_{i_k})  d/du_j = T (P q_j - sum_{k: i_k = j} p_k)
                with p_k = exp(log_probs_k), P = sum_k p_k; p_k = 0 adds nothing
    KL (teacher's hidden states x_t, w_t, b_t): the same sum over every class, with
                p = softmax(u_t / T), u_t the teacher's logits as u (same cap and
                padding; a -inf teacher logit gives p = 0)  d/du_j = T (q_j - p_j)
    CE:         w_y (lse(u) - u_y)                     d/du_k = w_y (softmax(u)_k - [k = y])
    distill:    alpha CE + (1 - alpha) KL
    JSD:        beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, the
                teacher's p sparse (top-k) or softmax(u_t / T) (hidden states); beta = 0
                the forward KL(p || q), beta = 1 (hidden states) the reverse KL(q || p);
                d/du from its partials in q through the softmax's Jacobian
    lse:        lse(u)                                 d/du_k = softmax(u)_k

then the gradients w.r.t. ``x``, ``w`` and ``bias`` by the chain rule through the soft
cap (``du/draw = 1 - tanh**2``) and the product: ``dx = du @ w.T``, ``dw = x.T @ du``,
``dbias = sum_n du``.

A token dropped by ``where`` gives 0 and zero gradient. A kept token with a label outside
``[0, num_classes)`` (where a label is used), or whose teacher puts ``p_k > 0`` on an
index outside ``[0, num_classes)``, gives NaN (value and gradient). Token weights
multiply each token's loss; ``"mean"`` divides by the sum over the kept tokens of the
token weight (times the label's class weight for the cross-entropy; 1 each without
weights), 0 if that is 0; or by ``normalizer`` when given.

Besides the values, :class:`Result` carries error scales (as ``tests/reference_linear.py``):
sums of the magnitudes of every rounded quantity behind each value and gradient, the
logits' own ``|x| @ |w| + |b|`` included, so that a float32/bfloat16 tolerance is
``checks.float_tolerance(dtype, terms)`` times the scale, derived from the data.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class Result:
    values: tuple  # each output: batch-shaped (per token) or a scalar (reduced)
    grad_x: np.ndarray
    grad_w: np.ndarray  # w's shape, padding columns 0
    grad_bias: np.ndarray  # [columns], padding 0
    value_scales: tuple
    grad_x_scale: np.ndarray
    grad_w_scale: np.ndarray
    grad_bias_scale: np.ndarray


# --------------------------------------------------------------------------------------------
# Rows: one token's values, d/du, and their error scales
# --------------------------------------------------------------------------------------------


class _Row:
    """Softmax statistics of one row of logits ``z`` with error magnitudes ``zmag``."""

    def __init__(self, z, zmag):
        top = float(np.max(z))
        self.lse = top + math.log(float(np.sum(np.exp(z - top))))
        self.log_q = z - self.lse
        self.q = np.exp(self.log_q)
        # An absolute error e * zmag_k in every logit moves lse by up to e * max(zmag).
        self.lse_mag = float(np.max(zmag)) + math.log(z.shape[0]) + 1.0
        # Relative error scale of q_k (an exp of z_k - lse).
        self.q_cond = 1.0 + zmag + self.lse_mag


def _nan_row(v):
    return math.nan, np.full(v, math.nan), math.nan, np.full(v, math.nan)


def _log_prob_row(u, umag, y, t):
    v = u.shape[0]
    if not 0 <= y < v:
        return _nan_row(v)
    zmag = umag / t
    r = _Row(u / t, zmag)
    onehot = np.zeros(v)
    onehot[y] = 1.0
    value = float(r.log_q[y])
    du = (onehot - r.q) / t
    return value, du, float(zmag[y] + r.lse_mag), (onehot + r.q * r.q_cond) / t


def _entropy_row(u, umag, t):
    zmag = umag / t
    r = _Row(u / t, zmag)
    q_log_q = np.where(r.q > 0, r.q * r.log_q, 0.0)
    h = float(-np.sum(q_log_q))
    du = -(q_log_q + r.q * h) / t
    h_scale = r.lse_mag + float(np.sum(r.q * (np.abs(r.log_q) + zmag + r.lse_mag)))
    du_scale = r.q * ((np.abs(r.log_q) + h + 1.0) * r.q_cond + h_scale) / t
    return h, du, h_scale, du_scale


def _kl_row(u, umag, index, log_p, t):
    v = u.shape[0]
    p = np.exp(log_p)
    given = p > 0
    if np.any(given & ((index < 0) | (index >= v))):
        return _nan_row(v)
    zmag = umag / t
    r = _Row(u / t, zmag)
    idx, pg, lpg = index[given], p[given], log_p[given]
    value = t * t * float(np.sum(pg * (lpg - r.log_q[idx])))
    at = np.zeros(v)
    np.add.at(at, idx, pg)
    big_p = float(np.sum(pg))
    du = t * (big_p * r.q - at)
    scale = t * t * float(np.sum(pg * (np.abs(lpg) + np.abs(r.log_q[idx]) + zmag[idx] + r.lse_mag)))
    return value, du, scale, t * (big_p * r.q * r.q_cond + at)


def _kl_full_row(u, umag, ut, utmag, t):
    """KL(softmax(ut / t) || softmax(u / t)) times t^2, over every class."""
    zmag = umag / t
    r, rt = _Row(u / t, zmag), _Row(ut / t, utmag / t)
    p = rt.q
    given = p > 0
    log_q, log_p = r.log_q[given], rt.log_q[given]
    value = t * t * float(np.sum(p[given] * (log_p - log_q)))
    du = t * (r.q - p)
    mags = np.abs(log_p) + np.abs(log_q) + zmag[given] + r.lse_mag + rt.q_cond[given]
    scale = t * t * float(np.sum(p[given] * mags))
    return value, du, scale, t * (r.q * r.q_cond + p * rt.q_cond)


def _teacher_logits(teacher, num_classes, soft_cap):
    """The teacher's logits ``[n, V]`` (as the student's: cap, padding columns dropped)
    and their error magnitudes (a -inf bias entry, a class the teacher rules out, adds
    no magnitude: its p is exactly 0)."""
    x_t, w_t, b_t = (None if a is None else np.asarray(a, np.float64) for a in teacher)
    v = w_t.shape[1] if num_classes is None else int(num_classes)
    b = np.zeros(v) if b_t is None else b_t[:v]
    xs = x_t.reshape(-1, x_t.shape[-1])
    raw = xs @ w_t[:, :v] + b
    mag = np.abs(xs) @ np.abs(w_t[:, :v]) + np.where(np.isfinite(b), np.abs(b), 0.0)
    return (raw if soft_cap is None else soft_cap * np.tanh(raw / soft_cap)), mag


def _jsd_row(u, umag, index, log_p, t, beta):
    """The generalised JSD of the teacher's sparse ``p`` (its classes distinct) and
    ``q = softmax(u / t)``, from the definition over every class: its partials in ``q``
    (``p`` held fixed), then the chain rule through the softmax's Jacobian."""
    v = u.shape[0]
    p = np.exp(log_p)
    given = p > 0
    if np.any(given & ((index < 0) | (index >= v))):
        return _nan_row(v)
    zmag = umag / t
    r = _Row(u / t, zmag)
    p_full = np.zeros(v)
    p_full[index[given]] = p[given]
    q, log_q = r.q, r.log_q
    pos = p_full > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pf = np.where(pos, np.log(np.where(pos, p_full, 1.0)), -np.inf)
        if beta == 0:
            value = float(np.sum(p_full[pos] * (log_pf[pos] - log_q[pos])))
            d_q = -p_full / q
        else:
            mix = beta * p_full + (1 - beta) * q
            log_m = np.log(mix)
            value = float(
                beta * np.sum(p_full[pos] * (log_pf[pos] - log_m[pos]))
                + (1 - beta) * np.sum(q * (log_q - log_m))
            )
            d_q = (1 - beta) * (log_q - log_m + 1 - (1 - beta) * q / mix) - beta * (
                1 - beta
            ) * p_full / mix
    d_q = np.where(q > 0, d_q, 0.0)
    du = (np.diag(q) - np.outer(q, q)) @ d_q / t
    mag = np.abs(log_q) + zmag + r.lse_mag
    scale = float(np.sum((p_full + q) * (np.abs(np.where(pos, log_pf, 0.0)) + mag))) + 1.0
    du_scale = q * r.q_cond * (np.abs(d_q) + float(np.sum(q * np.abs(d_q)))) / t + p_full / t
    return value, du, scale, du_scale


def _jsd_full_row(u, umag, ut, utmag, t, beta):
    """The generalised JSD of the teacher's whole ``p = softmax(ut / t)`` and ``q =
    softmax(u / t)`` (``beta = 0``: KL(p || q), ``beta = 1``: KL(q || p)), from the
    definition over every class: its partials in ``q`` (``p`` held fixed), then the chain
    rule through the softmax's Jacobian. A class with ``p = 0`` adds 0 to the ``p`` terms."""
    zmag = umag / t
    r, rt = _Row(u / t, zmag), _Row(ut / t, utmag / t)
    q, log_q, p, log_p = r.q, r.log_q, rt.q, rt.log_q
    pos = p > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if beta == 0:
            value = float(np.sum(p[pos] * (log_p[pos] - log_q[pos])))
            d_q = -p / q
        elif beta == 1:
            value = float(np.sum(q * (log_q - log_p)))
            d_q = log_q - log_p + 1
        else:
            mix = beta * p + (1 - beta) * q
            log_m = np.log(mix)
            value = float(
                beta * np.sum(p[pos] * (log_p[pos] - log_m[pos]))
                + (1 - beta) * np.sum(q * (log_q - log_m))
            )
            d_q = (1 - beta) * (log_q - log_m + 1 - (1 - beta) * q / mix) - beta * (
                1 - beta
            ) * p / mix
    d_q = np.where(q > 0, d_q, 0.0)
    du = (np.diag(q) - np.outer(q, q)) @ d_q / t
    # Both distributions' rounding feeds log m: the student's and the teacher's conditions.
    cond = r.q_cond + rt.q_cond
    mags = np.abs(log_q) + np.abs(np.where(pos, log_p, 0.0)) + cond
    scale = float(np.sum((p + q) * mags)) + 1.0
    du_scale = q * cond * (np.abs(d_q) + float(np.sum(q * np.abs(d_q)))) / t + p * cond / t
    return value, du, scale, du_scale


def linear_softmax_jensen_shannon_divergence(
    x,
    w,
    teacher,
    *,
    beta=0.5,
    temperature=1.0,
    bias=None,
    where=None,
    token_weights=None,
    normalizer=None,
    logit_soft_cap=None,
    reduction="mean",
    num_classes=None,
    cotangent=None,
) -> Result:
    """``teacher``: ``(indices, log_probs)`` of its top-k, or ``(x_t, w_t, b_t)``."""
    lg = _logits(x, w, bias, num_classes, logit_soft_cap)
    keep = _keep(where, lg.n)
    tw = _token_weights(token_weights, lg.n)
    t = float(temperature)
    if len(teacher) == 3:
        ut, utmag = _teacher_logits(teacher, num_classes, logit_soft_cap)

        def row(r):
            return _jsd_full_row(lg.u[r], lg.umag[r], ut[r], utmag[r], t, beta)

        return _weighted_loss(lg, keep, tw, row, reduction, normalizer, cotangent)
    index = np.asarray(teacher[0]).astype(np.int64).reshape(lg.n, -1)
    log_p = np.asarray(teacher[1], np.float64).reshape(lg.n, -1)

    def row(r):
        return _jsd_row(lg.u[r], lg.umag[r], index[r], log_p[r], t, beta)

    return _weighted_loss(lg, keep, tw, row, reduction, normalizer, cotangent)


def _ce_row(u, umag, y, weight=1.0, t=1.0):
    """``weight * (lse(u) - u_y)`` at temperature 1 (``t``: the temperature the fused
    distillation loss reads its logits at, which conditions its softmax)."""
    v = u.shape[0]
    if not 0 <= y < v:
        return _nan_row(v)
    r = _Row(u, umag)
    lse_mag = float(np.max(umag)) + max(t, 1.0) * (math.log(v) + 1.0)
    onehot = np.zeros(v)
    onehot[y] = 1.0
    value = weight * float(r.lse - u[y])
    du = weight * (r.q - onehot)
    scale = abs(weight) * (umag[y] + lse_mag)
    return value, du, scale, abs(weight) * (r.q * (1.0 + umag + lse_mag) + onehot)


def _lse_row(u, umag):
    r = _Row(u, umag)
    return r.lse, r.q, r.lse_mag, r.q * r.q_cond


# --------------------------------------------------------------------------------------------
# Logits, reductions and the chain rule
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Logits:
    x_shape: tuple
    batch: tuple
    xs: np.ndarray  # [n, d]
    w: np.ndarray  # [d, v] (the classes only)
    columns: int
    u: np.ndarray  # [n, v]
    dcap: np.ndarray  # [n, v]
    umag: np.ndarray  # [n, v]

    @property
    def n(self):
        return self.xs.shape[0]


def _logits(x, w, bias, num_classes, soft_cap):
    x = np.asarray(x, np.float64)
    w_all = np.asarray(w, np.float64)
    d, columns = w_all.shape
    v = columns if num_classes is None else int(num_classes)
    wv = w_all[:, :v]
    b = np.zeros(v) if bias is None else np.asarray(bias, np.float64)[:v]
    xs = x.reshape(-1, d)
    raw = xs @ wv + b
    umag = np.abs(xs) @ np.abs(wv) + np.abs(b)
    if soft_cap is None:
        u, dcap = raw, np.ones_like(raw)
    else:
        th = np.tanh(raw / soft_cap)
        u, dcap = soft_cap * th, 1.0 - th * th
    return _Logits(x.shape, x.shape[:-1], xs, wv, columns, u, dcap, umag)


def _keep(where, n):
    return np.ones(n, bool) if where is None else np.asarray(where, bool).reshape(-1).copy()


def _rows(lg, keep, row_fn):
    """Per-token (values, du, scales, du_scales) of ``row_fn(r)``; 0 on dropped tokens."""
    n, v = lg.u.shape
    values, scales = np.zeros(n), np.zeros(n)
    du, du_scales = np.zeros((n, v)), np.zeros((n, v))
    for r in range(n):
        if keep[r]:
            values[r], du[r], scales[r], du_scales[r] = row_fn(r)
    return values, du, scales, du_scales


def _reduce(lg, values, scales, reduction, denominator, cotangent):
    """(value, scale, per-token cotangent [n]) of the reduced per-token ``values``."""
    n = lg.n
    if reduction == "none":
        g = np.ones(n) if cotangent is None else np.broadcast_to(cotangent, lg.batch).reshape(-1)
        return values.reshape(lg.batch), scales.reshape(lg.batch), np.asarray(g, np.float64)
    g0 = 1.0 if cotangent is None else float(cotangent)
    value, scale = float(np.sum(values)), float(np.sum(scales))
    if reduction == "mean":
        if denominator == 0:
            value, scale, g0 = 0.0, 0.0, 0.0
        else:
            value, scale, g0 = value / denominator, scale / abs(denominator), g0 / denominator
    return np.asarray(value), np.asarray(scale), np.full(n, g0)


def _gradients(lg, outputs, cotangents):
    """``Result`` for ``outputs``: a list of (value, scale, du [n, v], du_scale [n, v]), the
    gradients of ``sum_o sum(cotangents[o] * output_o)`` (``cotangents[o]`` per token)."""
    n, v = lg.u.shape
    grad_u, gu_scale = np.zeros((n, v)), np.zeros((n, v))
    for (_, _, du, du_scale), g in zip(outputs, cotangents, strict=True):
        # NaN rows stay NaN (0 * NaN): a token whose value is NaN has a NaN gradient.
        live = g != 0
        grad_u[live] += g[live, None] * du[live]
        gu_scale += np.abs(g)[:, None] * np.where(np.isnan(du_scale), 0.0, du_scale)
    grad_z = grad_u * lg.dcap

    def padded(a):
        return np.concatenate([a, np.zeros(a.shape[:-1] + (lg.columns - v,))], axis=-1)

    return Result(
        values=tuple(np.asarray(o[0]) for o in outputs),
        grad_x=(grad_z @ lg.w.T).reshape(lg.x_shape),
        grad_w=padded(lg.xs.T @ grad_z),
        grad_bias=padded(grad_z.sum(axis=0)),
        value_scales=tuple(np.asarray(o[1]) for o in outputs),
        grad_x_scale=(gu_scale @ np.abs(lg.w.T)).reshape(lg.x_shape),
        grad_w_scale=padded(np.abs(lg.xs.T) @ gu_scale),
        grad_bias_scale=padded(gu_scale.sum(axis=0)),
    )


def _token_weights(token_weights, n):
    if token_weights is None:
        return np.ones(n)
    return np.asarray(token_weights, np.float64).reshape(-1)


def _weighted_loss(lg, keep, tw, row, reduction, normalizer, cotangent, denominator_terms=None):
    """A loss with token weights and a reduction, from per-token ``row(r)``."""
    values, du, scales, du_scales = _rows(lg, keep, row)
    values, scales = values * tw, scales * np.abs(tw)
    if reduction == "mean" and normalizer is not None:
        denominator = float(normalizer)
    elif reduction == "mean":
        terms = tw if denominator_terms is None else tw * denominator_terms
        denominator = float(np.sum(np.where(keep, terms, 0.0)))
    else:
        denominator = None
    value, scale, g = _reduce(lg, values, scales, reduction, denominator, cotangent)
    return _gradients(lg, [(value, scale, du, du_scales)], [g * tw])


# --------------------------------------------------------------------------------------------
# The functions
# --------------------------------------------------------------------------------------------


def linear_log_probs(
    x,
    w,
    labels,
    *,
    temperature=1.0,
    return_entropy=False,
    bias=None,
    where=None,
    logit_soft_cap=None,
    num_classes=None,
    cotangents=None,
) -> Result:
    """``values = (log_probs,)`` or ``(log_probs, entropy)`` per token; gradients of
    ``sum(ct_0 * log_probs) (+ sum(ct_1 * entropy))`` (``cotangents``: one batch-shaped
    array per output, ones by default)."""
    lg = _logits(x, w, bias, num_classes, logit_soft_cap)
    keep = _keep(where, lg.n)
    ys = np.asarray(labels).reshape(-1).astype(np.int64)
    t = float(temperature)
    outputs = [_rows(lg, keep, lambda r: _log_prob_row(lg.u[r], lg.umag[r], int(ys[r]), t))]
    if return_entropy:
        outputs.append(_rows(lg, keep, lambda r: _entropy_row(lg.u[r], lg.umag[r], t)))
    if cotangents is None:
        cotangents = [np.ones(lg.batch)] * len(outputs)
    gs = [np.broadcast_to(np.asarray(c, np.float64), lg.batch).reshape(-1) for c in cotangents]
    shaped = [
        (values.reshape(lg.batch), scales.reshape(lg.batch), du, du_scales)
        for values, du, scales, du_scales in outputs
    ]
    return _gradients(lg, shaped, gs)


def linear_entropy(
    x,
    w,
    *,
    temperature=1.0,
    bias=None,
    where=None,
    token_weights=None,
    normalizer=None,
    logit_soft_cap=None,
    reduction="none",
    num_classes=None,
    cotangent=None,
) -> Result:
    lg = _logits(x, w, bias, num_classes, logit_soft_cap)
    keep = _keep(where, lg.n)
    t = float(temperature)
    return _weighted_loss(
        lg,
        keep,
        _token_weights(token_weights, lg.n),
        lambda r: _entropy_row(lg.u[r], lg.umag[r], t),
        reduction,
        normalizer,
        cotangent,
    )


def linear_distillation_loss(
    x,
    w,
    labels,
    teacher,
    *,
    alpha=0.5,
    temperature=1.0,
    bias=None,
    where=None,
    token_weights=None,
    normalizer=None,
    logit_soft_cap=None,
    reduction="mean",
    num_classes=None,
    cotangent=None,
) -> Result:
    """``alpha CE(u, y) + (1 - alpha) T^2 KL`` (a term with a zero factor is left out);
    ``labels=None`` with ``alpha=0`` is the KL alone. ``teacher``: ``(indices,
    log_probs)`` of its top-k, or ``(x_t, w_t, b_t)``, its hidden states and weight."""
    lg = _logits(x, w, bias, num_classes, logit_soft_cap)
    keep = _keep(where, lg.n)
    tw = _token_weights(token_weights, lg.n)
    t, a = float(temperature), float(alpha)
    ys = None if labels is None else np.asarray(labels).reshape(-1).astype(np.int64)
    if len(teacher) == 3:
        ut, utmag = _teacher_logits(teacher, num_classes, logit_soft_cap)

        def kl_row(r):
            return _kl_full_row(lg.u[r], lg.umag[r], ut[r], utmag[r], t)

    else:
        index = np.asarray(teacher[0]).astype(np.int64).reshape(lg.n, -1)
        log_p = np.asarray(teacher[1], np.float64).reshape(lg.n, -1)

        def kl_row(r):
            return _kl_row(lg.u[r], lg.umag[r], index[r], log_p[r], t)

    def row(r):
        terms = []
        if a != 1:
            terms.append((1 - a, kl_row(r)))
        if a != 0:
            terms.append((a, _ce_row(lg.u[r], lg.umag[r], int(ys[r]), 1.0, t)))
        value = sum(c * term[0] for c, term in terms)
        du = sum(c * term[1] for c, term in terms)
        scale = sum(c * term[2] for c, term in terms)
        du_scale = sum(c * term[3] for c, term in terms)
        return value, du, scale, du_scale

    return _weighted_loss(lg, keep, tw, row, reduction, normalizer, cotangent)


def linear_softmax_kl_divergence(x, w, teacher, *, temperature=1.0, **kw) -> Result:
    return linear_distillation_loss(x, w, None, teacher, alpha=0.0, temperature=temperature, **kw)


def linear_softmax_cross_entropy(
    x,
    w,
    labels,
    *,
    bias=None,
    where=None,
    class_weights=None,
    token_weights=None,
    normalizer=None,
    logit_soft_cap=None,
    reduction="mean",
    num_classes=None,
    return_lse=False,
    cotangent=None,
    lse_cotangent=None,
) -> Result:
    """``values = (loss,)`` or ``(loss, lse)`` (``lse`` of every token, kept or not); the
    gradients of ``ct * loss (+ sum(lse_ct * lse))``."""
    lg = _logits(x, w, bias, num_classes, logit_soft_cap)
    keep = _keep(where, lg.n)
    tw = _token_weights(token_weights, lg.n)
    v = lg.u.shape[1]
    ys = np.asarray(labels).reshape(-1).astype(np.int64)
    cw = np.ones(v) if class_weights is None else np.asarray(class_weights, np.float64)[:v]
    w_y = np.array([cw[y] if 0 <= y < v else math.nan for y in ys])
    loss = _weighted_loss(
        lg,
        keep,
        tw,
        lambda r: _ce_row(lg.u[r], lg.umag[r], int(ys[r]), float(w_y[r])),
        reduction,
        normalizer,
        cotangent,
        denominator_terms=None if class_weights is None else w_y,
    )
    if not return_lse:
        return loss
    values, du, scales, du_scales = _rows(
        lg, np.ones(lg.n, bool), lambda r: _lse_row(lg.u[r], lg.umag[r])
    )
    g = (
        np.ones(lg.n)
        if lse_cotangent is None
        else np.broadcast_to(lse_cotangent, lg.batch).reshape(-1)
    )
    lse = _gradients(lg, [(values.reshape(lg.batch), scales.reshape(lg.batch), du, du_scales)], [g])
    return Result(
        values=loss.values + lse.values,
        grad_x=loss.grad_x + lse.grad_x,
        grad_w=loss.grad_w + lse.grad_w,
        grad_bias=loss.grad_bias + lse.grad_bias,
        value_scales=loss.value_scales + lse.value_scales,
        grad_x_scale=loss.grad_x_scale + lse.grad_x_scale,
        grad_w_scale=loss.grad_w_scale + lse.grad_w_scale,
        grad_bias_scale=loss.grad_bias_scale + lse.grad_bias_scale,
    )


# --------------------------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------------------------


def assert_within(actual, expected, bound, what=""):
    """``|actual - expected| <= bound`` elementwise, NaN where (and only where) expected is."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    nan = np.isnan(e)
    assert np.array_equal(np.isnan(a), nan), (what, "NaN pattern", a, e)
    err = np.abs(a - e)[~nan]
    allowed = np.asarray(np.broadcast_to(bound, e.shape), np.float64)[~nan]
    worst = float(np.max(err / np.maximum(allowed, 1e-300), initial=0.0))
    assert np.all(err <= allowed), f"{what}: error up to {worst:.3g} x the bound"
