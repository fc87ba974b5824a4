"""Independent float64 NumPy reference for jxent's KL divergences, distillation loss,
entropy and poly loss.

Written row by row from the definitions (``0 log 0 = 0``; a class is in a row's softmax
when ``where`` keeps it and its logit is finite), in float64, with the analytic
gradients of ``sum(cotangent * loss)``. Never imports jxent.

Layout, as in the categorical family: ``axis`` (int, tuple, or None) names the class
axes, flattened in the given order; ``where`` either has the batch shape (masks rows)
or the inputs' number of dimensions (masks classes; a row with no kept class is
dropped). Dropped rows give 0 and do not count in ``"mean"``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def class_axes(ndim, axis):
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    return tuple(int(a) % ndim for a in axis)


def batch_axes(ndim, axis):
    c = class_axes(ndim, axis)
    return tuple(i for i in range(ndim) if i not in c)


def batch_shape(shape, axis):
    return tuple(shape[i] for i in batch_axes(len(shape), axis))


def to_rows(x, axis):
    x = np.asarray(x)
    perm = batch_axes(x.ndim, axis) + class_axes(x.ndim, axis)
    k = math.prod(x.shape[i] for i in class_axes(x.ndim, axis))
    return np.transpose(x, perm).reshape(-1, k)


def from_rows(rows, shape, axis):
    ndim = len(shape)
    perm = batch_axes(ndim, axis) + class_axes(ndim, axis)
    out = rows.reshape(tuple(shape[i] for i in perm))
    return np.transpose(out, np.argsort(perm))


def masks(shape, axis, where):
    """(row_mask [N], class_mask [N, K]) from a batch- or inputs-shaped ``where``."""
    n = math.prod(batch_shape(shape, axis))
    k = math.prod(shape[i] for i in class_axes(len(shape), axis))
    if where is None:
        return np.ones(n, bool), np.ones((n, k), bool)
    where = np.asarray(where)
    if where.ndim == len(shape):
        cm = to_rows(np.broadcast_to(where, shape), axis)
        return cm.any(axis=-1), cm
    return where.reshape(n), np.ones((n, k), bool)


@dataclasses.dataclass
class Result:
    loss: np.ndarray  # batch shape ("none") or scalar
    per_row: np.ndarray  # batch shape
    grads: tuple  # one per differentiated input, in the inputs' shape


def _run(row_fn, inputs, axis, where, reduction, cotangent):
    """Applies ``row_fn(*rows, class_mask) -> (loss, grads...)`` to every row and reduces."""
    shape = np.shape(inputs[0])
    rows = [to_rows(np.asarray(a, np.float64), axis) for a in inputs]
    row_mask, class_mask = masks(shape, axis, where)
    n = rows[0].shape[0]
    bshape = batch_shape(shape, axis)
    per_row = np.zeros(n)
    grads = [np.zeros_like(r) for r in rows]
    if reduction == "none":
        cot = np.ones(n) if cotangent is None else np.asarray(cotangent, np.float64).reshape(n)
    else:
        cot = np.full(n, 1.0 if cotangent is None else float(cotangent))
    count = row_mask.sum()
    if reduction == "mean":
        cot = cot / count if count > 0 else cot * 0
    for i in range(n):
        if not row_mask[i]:
            continue
        loss, *g = row_fn(*(r[i] for r in rows), class_mask[i])
        per_row[i] = loss
        for j, gj in enumerate(g):
            grads[j][i] = cot[i] * gj
    per_row_b = per_row.reshape(bshape)
    if reduction == "none":
        out = per_row_b
    elif reduction == "sum":
        out = per_row.sum()
    else:
        out = per_row.sum() / count if count > 0 else 0.0
    grads = tuple(from_rows(g, shape, axis) for g in grads)
    return Result(np.asarray(out, np.float64), per_row_b, grads)


def _softmax(z, m):
    """Softmax over the classes with m and a finite logit; (p, log p, has_class)."""
    on = m & np.isfinite(z)
    if not on.any():
        return np.zeros_like(z), np.full_like(z, -np.inf), False
    zmax = z[on].max()
    lse = zmax + np.log(np.sum(np.exp(z[on] - zmax)))
    log_p = np.where(on, z - lse, -np.inf)
    return np.where(on, np.exp(log_p), 0.0), log_p, True


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _kl_row(lp, t, m):
    t = np.where(m, t, 0.0)
    pos = t > 0
    if np.any(pos & (lp == -np.inf)):
        loss = np.inf
    else:
        loss = float(np.sum(t[pos] * (np.log(t[pos]) - lp[pos])))
    ok = pos & np.isfinite(lp)
    g_lp = -t
    g_t = np.zeros_like(t)
    g_t[ok] = np.log(t[ok]) + 1 - lp[ok]
    return loss, g_lp, g_t


def kl_divergence(lp, t, axis=-1, where=None, *, reduction="none", cotangent=None):
    return _run(_kl_row, (lp, t), axis, where, reduction, cotangent)


def _kl_log_row(lp, lt, m):
    t = np.where(m, np.exp(lt), 0.0)
    loss, g_lp, g_t = _kl_row(lp, t, m)
    return loss, g_lp, t * g_t  # d/d log t = t d/dt


def kl_divergence_with_log_targets(
    lp, lt, axis=-1, where=None, *, reduction="none", cotangent=None
):
    return _run(_kl_log_row, (lp, lt), axis, where, reduction, cotangent)


def _distill_row(temperature):
    def row(s, te, m):
        p, log_p, has_p = _softmax(te / temperature, m)
        q, log_q, _ = _softmax(s / temperature, m)
        if not has_p:
            return 0.0, np.zeros_like(s), np.zeros_like(te)
        pos = p > 0
        if np.any(pos & (q == 0)):
            kl = np.inf
        else:
            kl = float(np.sum(p[pos] * (log_p[pos] - log_q[pos])))
        g_s = temperature * (q - p)
        g_t = np.zeros_like(te)
        if np.isfinite(kl):
            g_t[pos] = temperature * p[pos] * (log_p[pos] - log_q[pos] - kl)
        return temperature**2 * kl, g_s, g_t

    return row


def softmax_kl_divergence(
    student, teacher, *, temperature=1.0, axis=-1, where=None, reduction="none", cotangent=None
):
    return _run(_distill_row(temperature), (student, teacher), axis, where, reduction, cotangent)


def _jsd_row(beta, temperature):
    """The generalised JSD of softmax(te / T) (p) and softmax(s / T) (q): its partial
    derivatives in p and q as independent vectors, from the definition, then the chain
    rule through each softmax's Jacobian (diag(q) - q q^T) / T."""

    def row(s, te, m):
        p, log_p, has_p = _softmax(te / temperature, m)
        q, log_q, has_q = _softmax(s / temperature, m)
        if not (has_p and has_q):
            return 0.0, np.zeros_like(s), np.zeros_like(te)
        pp, qp = p > 0, q > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            if beta == 0:  # KL(p || q)
                loss = float(np.sum(p[pp] * (log_p[pp] - log_q[pp])))
                d_p = np.where(pp, log_p - log_q + 1, 0.0)
                d_q = np.where(qp, -p / q, 0.0)
            elif beta == 1:  # KL(q || p)
                loss = float(np.sum(q[qp] * (log_q[qp] - log_p[qp])))
                d_q = np.where(qp, log_q - log_p + 1, 0.0)
                d_p = np.where(pp, -q / p, 0.0)
            else:
                mix = beta * p + (1 - beta) * q
                log_m = np.log(mix)
                loss = float(
                    beta * np.sum(p[pp] * (log_p[pp] - log_m[pp]))
                    + (1 - beta) * np.sum(q[qp] * (log_q[qp] - log_m[qp]))
                )
                ok = mix > 0
                d_p = np.where(
                    ok,
                    beta * (np.where(pp, log_p - log_m, 0.0) + 1 - np.where(ok, p / mix, 0) * beta)
                    - (1 - beta) * np.where(ok, q / mix, 0) * beta,
                    0.0,
                )
                d_q = np.where(
                    ok,
                    (1 - beta)
                    * (np.where(qp, log_q - log_m, 0.0) + 1 - np.where(ok, q / mix, 0) * (1 - beta))
                    - beta * np.where(ok, p / mix, 0) * (1 - beta),
                    0.0,
                )
        jac_q = (np.diag(q) - np.outer(q, q)) / temperature
        jac_p = (np.diag(p) - np.outer(p, p)) / temperature
        return loss, jac_q @ d_q, jac_p @ d_p

    return row


def softmax_jensen_shannon_divergence(
    student,
    teacher,
    *,
    beta=0.5,
    temperature=1.0,
    axis=-1,
    where=None,
    reduction="none",
    cotangent=None,
):
    row = _jsd_row(beta, temperature)
    return _run(row, (student, teacher), axis, where, reduction, cotangent)


def _entropy_row(z, m):
    p, log_p, has = _softmax(z, m)
    if not has:
        return 0.0, np.zeros_like(z)
    pos = p > 0
    h = float(-np.sum(p[pos] * log_p[pos]))
    g = np.zeros_like(z)
    g[pos] = -p[pos] * (log_p[pos] + h)
    return h, g


def entropy(logits, axis=-1, where=None, *, reduction="none", cotangent=None):
    return _run(_entropy_row, (logits,), axis, where, reduction, cotangent)


def _poly_row(epsilon):
    def row(z, t, m):
        p, log_p, has = _softmax(z, m)
        if not has:
            return 0.0, np.zeros_like(z), np.zeros_like(t)
        c = np.where(m, t, 0.0)
        finite = m & np.isfinite(z)
        pos = c > 0
        ce = np.inf if np.any(pos & ~finite) else float(-np.sum(c[pos] * log_p[pos]))
        pt = float(np.sum(c * p))
        loss = ce + epsilon * (c.sum() - pt)
        g_z = c.sum() * p - c + epsilon * p * (pt - c)
        g_t = np.where(finite, -np.where(finite, log_p, 0.0), 0.0) + np.where(
            m, epsilon * (1 - p), 0.0
        )
        return loss, g_z, g_t

    return row


def poly_loss_cross_entropy(
    logits, labels, epsilon=2.0, axis=-1, where=None, *, reduction="none", cotangent=None
):
    return _run(_poly_row(epsilon), (logits, labels), axis, where, reduction, cotangent)
