"""Independent float64 NumPy reference for jxent's linear softmax cross-entropy.

Written from the formulas, row by row, with NumPy only (never imports jxent):
``logits = x @ w + bias``, optionally soft-capped to ``c * tanh(logits / c)``;
per included row with label ``y``, class weights ``w_k`` and smoothing ``a`` over
all ``V`` classes,

    c_k = (1 - a) w_y [k == y] + a w_k / V
    lse = m + log sum_k exp(z_k - m),  m = max_k z_k
    loss = sum_k c_k (lse - z_k) + z_loss * lse**2
    dloss/dz_k = (sum_k c_k + 2 z_loss lse) softmax(z)_k - c_k

and the gradients w.r.t. ``x``, ``w`` and ``bias`` by the chain rule through the soft
cap (``dz/dlogits = 1 - tanh**2``) and the product: ``dx = dlogits @ w.T``,
``dw = x.T @ dlogits``, ``dbias = sum_n dlogits``.

A row is excluded (loss 0, gradient 0) when ``where`` is False or its label equals
``ignore_index``; an included row with a label outside ``[0, V)`` has a NaN loss and
NaN gradient. ``reduction="mean"`` divides by the sum of ``w_y`` over included rows
(their count without class weights), 0 if that is 0. ``num_classes``: only the first
``num_classes`` columns of ``w`` (``bias``, ``class_weights``) are classes; the rest
are padding, never read, with zero gradient.

Besides the values, :class:`Result` carries error scales for tests in float32 and
bfloat16: sums of the magnitudes of every rounded quantity that goes into the loss and
into each gradient. A computation whose roundings each have relative error ``eps``
errs by at most about ``eps * log2(terms)`` times that scale (blocked and pairwise
sums; ``tests/checks.py: float_tolerance``), so a tolerance is derived from the data
and the dtype, not a constant tuned until green.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class Result:
    loss: np.ndarray  # batch shape for reduction="none", scalar otherwise
    grad_x: np.ndarray
    grad_w: np.ndarray  # w's shape, padding columns 0
    grad_bias: np.ndarray  # [columns], padding 0
    # Error scales (same shapes as the values above): the sum of |every term| that the
    # value is computed from, the logits' own rounding included.
    loss_scale: np.ndarray
    grad_x_scale: np.ndarray
    grad_w_scale: np.ndarray
    grad_bias_scale: np.ndarray
    # dloss/dz of sum(cotangent * loss) [tokens, classes] (0 on tokens that do not count).
    grad_z: np.ndarray | None = None


def _row(z, zmag, y, weights, a, z_loss):
    """Loss, dloss/dz and their magnitude scales for one row of logits ``z``."""
    v = z.shape[0]
    if not 0 <= y < v:
        nan = np.full(v, math.nan)
        return math.nan, nan, math.nan, nan
    top = np.max(z)
    lse = top + math.log(np.sum(np.exp(z - top)))
    c = a * weights / v
    c[y] += (1.0 - a) * weights[y]
    loss = float(np.sum(c * (lse - z)) + z_loss * lse * lse)
    p = np.exp(z - lse)
    scale = np.sum(c) + 2 * z_loss * lse
    # An absolute error e in every logit moves lse by up to e and each z_k - lse by 2e:
    # the magnitudes of the logits (zmag, from |x| @ |w| + |b|) condition both.
    lse_mag = float(np.max(zmag)) + math.log(v) + 1.0
    loss_scale = float(np.sum(c * (lse_mag + zmag)) + z_loss * (lse_mag + abs(lse)) ** 2)
    grad_scale = abs(scale) * p * (1.0 + zmag + lse_mag) + c + 2 * z_loss * lse_mag * p
    return loss, scale * p - c, loss_scale, grad_scale


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
    num_classes=None,
    cotangent=None,
) -> Result:
    """Loss and the gradients of ``sum(cotangent * loss)`` w.r.t. x, w and bias.

    ``cotangent``: batch-shaped for ``reduction="none"`` (ones by default), a scalar
    otherwise (one by default). ``num_classes``: the classes among ``w``'s columns
    (default all); the padding columns after them are never read (any values).
    """
    x = np.asarray(x, np.float64)
    w_all = np.asarray(w, np.float64)
    batch = x.shape[:-1]
    d, columns = w_all.shape
    v = columns if num_classes is None else int(num_classes)
    w = w_all[:, :v]
    b = np.zeros(v) if bias is None else np.asarray(bias, np.float64)[:v]
    xs = x.reshape(-1, d)
    ys = np.asarray(labels).reshape(-1).astype(np.int64)
    n = xs.shape[0]
    raw = xs @ w + b
    zmag = np.abs(xs) @ np.abs(w) + np.abs(b)
    if logit_soft_cap is None:
        z, dcap = raw, np.ones_like(raw)
    else:
        t = np.tanh(raw / logit_soft_cap)
        z, dcap = logit_soft_cap * t, 1.0 - t * t
    weights = np.ones(v) if class_weights is None else np.asarray(class_weights, np.float64)[:v]
    included = np.ones(n, bool) if where is None else np.asarray(where).reshape(-1).copy()
    if ignore_index is not None:
        included &= ys != ignore_index

    per_row, row_scale = np.zeros(n), np.zeros(n)
    dz, dz_scale = np.zeros((n, v)), np.zeros((n, v))
    denominator = 0.0
    for r in range(n):
        if included[r]:
            y = int(ys[r])
            per_row[r], dz[r], row_scale[r], dz_scale[r] = _row(
                z[r], zmag[r], y, weights, label_smoothing, z_loss
            )
            denominator += weights[y] if 0 <= y < v else math.nan

    if reduction == "none":
        g = np.ones(n) if cotangent is None else np.broadcast_to(cotangent, batch).reshape(-1)
        loss, loss_scale = per_row.reshape(batch), row_scale.reshape(batch)
    else:
        g0 = 1.0 if cotangent is None else float(cotangent)
        loss, loss_scale = np.sum(per_row), np.sum(row_scale)
        if reduction == "mean":
            if denominator == 0:
                loss, loss_scale, g0 = 0.0, 0.0, 0.0
            else:
                loss, loss_scale, g0 = (
                    loss / denominator,
                    loss_scale / denominator,
                    g0 / denominator,
                )
        g = np.full(n, g0)
    grad_z = dz * dcap * g[:, None]
    grad_z[~included] = 0.0
    gz_scale = dz_scale * np.abs(g)[:, None]
    gz_scale[~included] = 0.0

    def padded(a):
        return np.concatenate([a, np.zeros(a.shape[:-1] + (columns - v,))], axis=-1)

    return Result(
        loss=np.asarray(loss),
        grad_x=(grad_z @ w.T).reshape(x.shape),
        grad_w=padded(xs.T @ grad_z),
        grad_bias=padded(grad_z.sum(axis=0)),
        loss_scale=np.asarray(loss_scale),
        grad_x_scale=(gz_scale @ np.abs(w.T)).reshape(x.shape),
        grad_w_scale=padded(np.abs(xs.T) @ gz_scale),
        grad_bias_scale=padded(gz_scale.sum(axis=0)),
        grad_z=grad_z,
    )


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
