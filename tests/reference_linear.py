"""Independent float64 NumPy reference for jxent's linear softmax cross-entropy.

Written from the formulas, row by row, with NumPy only (never imports jxent):
``logits = x @ w + bias``, optionally soft-capped to ``c * tanh(logits / c)``;
per included row with label ``y``, class weights ``w_k`` and smoothing ``a`` over
all ``V`` classes,

    c_k = (1 - a) w_y [k == y] + a w_k / V
    loss = sum_k c_k (lse - z_k) + z_loss * lse**2
    dloss/dz_k = (sum_k c_k + 2 z_loss lse) softmax(z)_k - c_k

A row is excluded (loss 0, gradient 0) when ``where`` is False or its label equals
``ignore_index``; an included row with a label outside ``[0, V)`` has a NaN loss and
NaN gradient. ``reduction="mean"`` divides by the sum of ``w_y`` over included rows
(their count without class weights), 0 if that is 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class Result:
    loss: np.ndarray  # batch shape for reduction="none", scalar otherwise
    grad_x: np.ndarray
    grad_w: np.ndarray
    grad_bias: np.ndarray


def _row(z, y, weights, a, z_loss):
    v = z.shape[0]
    if not 0 <= y < v:
        return math.nan, np.full(v, math.nan)
    top = np.max(z)
    lse = top + math.log(np.sum(np.exp(z - top)))
    c = a * weights / v
    c[y] += (1.0 - a) * weights[y]
    loss = float(np.sum(c * (lse - z)) + z_loss * lse * lse)
    p = np.exp(z - lse)
    return loss, (np.sum(c) + 2 * z_loss * lse) * p - c


def linear_softmax_cross_entropy(
    x,
    w,
    labels,
    *,
    bias=None,
    ignore_index=None,
    where=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_soft_cap=None,
    class_weights=None,
    reduction="mean",
    cotangent=None,
) -> Result:
    """Loss and the gradients of ``sum(cotangent * loss)`` w.r.t. x, w and bias.

    ``cotangent``: batch-shaped for ``reduction="none"`` (ones by default), a scalar
    otherwise (one by default).
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    batch = x.shape[:-1]
    d, v = w.shape
    xs = x.reshape(-1, d)
    ys = np.asarray(labels).reshape(-1).astype(np.int64)
    n = xs.shape[0]
    raw = xs @ w + (0.0 if bias is None else np.asarray(bias, np.float64))
    if logit_soft_cap is None:
        z, dcap = raw, np.ones_like(raw)
    else:
        t = np.tanh(raw / logit_soft_cap)
        z, dcap = logit_soft_cap * t, 1.0 - t * t
    weights = np.ones(v) if class_weights is None else np.asarray(class_weights, np.float64)
    included = np.ones(n, bool) if where is None else np.asarray(where).reshape(-1).copy()
    if ignore_index is not None:
        included &= ys != ignore_index

    per_row = np.zeros(n)
    dz = np.zeros((n, v))
    denominator = 0.0
    for r in range(n):
        if included[r]:
            per_row[r], dz[r] = _row(z[r], int(ys[r]), weights, label_smoothing, z_loss)
            y = int(ys[r])
            denominator += weights[y] if 0 <= y < v else math.nan

    if reduction == "none":
        g = np.ones(n) if cotangent is None else np.broadcast_to(cotangent, batch).reshape(-1)
        loss = per_row.reshape(batch)
    else:
        g0 = 1.0 if cotangent is None else float(cotangent)
        loss = np.sum(per_row)
        if reduction == "mean":
            if denominator == 0:
                loss, g0 = 0.0, 0.0
            else:
                loss, g0 = loss / denominator, g0 / denominator
        g = np.full(n, g0)
    grad_z = dz * dcap * g[:, None]
    grad_z[~included] = 0.0
    return Result(
        loss=np.asarray(loss),
        grad_x=(grad_z @ w.T).reshape(x.shape),
        grad_w=xs.T @ grad_z,
        grad_bias=grad_z.sum(axis=0),
    )
