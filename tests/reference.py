"""Independent float64 NumPy reference for jxent's categorical cross-entropy.

Written straight from the formulas in the semantics contract, using numpy only. Everything is
computed row by row in float64 for clarity. Never imports jxent.

Both loss functions return a :class:`Result` holding the (reduced) loss, the per-row losses and
the analytic gradients of ``sum(cotangent * loss)`` with respect to the logits (and, for the dense
function, the targets). For ``reduction="none"`` the cotangent is a batch-shaped array (ones by
default); for ``"sum"`` and ``"mean"`` it is a scalar (one by default).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

REDUCTIONS = ("none", "sum", "mean")


@dataclasses.dataclass
class Result:
    loss: np.ndarray  # batch shape for reduction="none", scalar otherwise
    per_row: np.ndarray  # batch shape, before reduction
    grad_logits: np.ndarray  # logits shape
    grad_labels: np.ndarray | None  # logits shape (dense only)
    included: np.ndarray  # bool, batch shape
    denominator: float  # D of the "mean" reduction


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------


def class_axes(ndim: int, axis) -> tuple[int, ...]:
    """Canonical class axes, in the order given (None means every axis)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    out = []
    for a in axis:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} out of range for ndim {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate axes in {axis}")
    return tuple(out)


def batch_axes(ndim: int, axis) -> tuple[int, ...]:
    axes = class_axes(ndim, axis)
    return tuple(i for i in range(ndim) if i not in axes)


def batch_shape(shape, axis) -> tuple[int, ...]:
    return tuple(shape[i] for i in batch_axes(len(shape), axis))


def class_shape(shape, axis) -> tuple[int, ...]:
    """Shape of the class slice, in the order of ``axis`` (the flattening order)."""
    return tuple(shape[i] for i in class_axes(len(shape), axis))


def num_classes(shape, axis) -> int:
    return math.prod(class_shape(shape, axis))


def to_rows(x: np.ndarray, axis) -> np.ndarray:
    """[*batch, *class] in axis order, flattened to [N, K] (C order over the class slice)."""
    x = np.asarray(x)
    perm = batch_axes(x.ndim, axis) + class_axes(x.ndim, axis)
    n = math.prod(batch_shape(x.shape, axis))
    k = num_classes(x.shape, axis)
    return np.transpose(x, perm).reshape(n, k)


def from_rows(rows: np.ndarray, shape, axis) -> np.ndarray:
    """Inverse of :func:`to_rows`."""
    ndim = len(shape)
    perm = batch_axes(ndim, axis) + class_axes(ndim, axis)
    permuted_shape = tuple(shape[p] for p in perm)
    return np.transpose(np.asarray(rows).reshape(permuted_shape), np.argsort(perm))


def label_positions(shape, axis, labels) -> tuple[np.ndarray, ...]:
    """Index tuple (into the logits) of the logit each in-range integer label picks."""
    k = num_classes(shape, axis)
    rows = np.zeros((math.prod(batch_shape(shape, axis)), k), dtype=bool)
    flat = np.asarray(labels).reshape(-1)
    for r, y in enumerate(flat):
        if 0 <= y < k:
            rows[r, y] = True
    return np.nonzero(from_rows(rows, shape, axis))


def split_where(where, shape, axis):
    """Returns (row_where [N], class_where [N, K]) from a batch- or class-shaped ``where``."""
    n = math.prod(batch_shape(shape, axis))
    k = num_classes(shape, axis)
    if where is None:
        return np.ones(n, dtype=bool), np.ones((n, k), dtype=bool)
    where = np.asarray(where, dtype=bool)
    if where.ndim == len(shape):
        cw = to_rows(np.broadcast_to(where, shape), axis)
        # A class-shaped where also excludes the rows that it masks entirely.
        return cw.any(axis=-1), cw
    if where.shape == batch_shape(shape, axis):
        return where.reshape(n), np.ones((n, k), dtype=bool)
    raise ValueError(f"where of shape {where.shape} is neither batch- nor class-shaped")


def soft_cap(x: np.ndarray, cap):
    """Returns (z, dz/dx)."""
    x = np.asarray(x, dtype=np.float64)
    if cap is None:
        return x.copy(), np.ones_like(x)
    # -inf logits stay -inf (a masked class stays masked under the cap); their
    # derivative is 0, as tanh' is at -inf.
    t = np.tanh(x / cap)
    return np.where(np.isneginf(x), -np.inf, cap * t), 1.0 - t * t


def logsumexp(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    mx = np.max(v)
    return float(mx + np.log(np.sum(np.exp(v - mx))))


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------


def _row_core(z: np.ndarray, m: np.ndarray, c: np.ndarray, z_loss: float):
    """loss = sum_{c_k != 0} c_k (lse - z_k) + z_loss lse^2 and its gradient w.r.t. z."""
    lse = logsumexp(z[m])
    loss = 0.0
    for k in range(z.shape[0]):
        if c[k] != 0.0:
            loss += c[k] * (lse - z[k])  # +inf when z_k = -inf
    loss += z_loss * lse**2
    p = np.zeros_like(z)
    p[m] = np.exp(z[m] - lse)
    dz = (np.sum(c) + 2.0 * z_loss * lse) * p - c
    return float(loss), dz, lse


def _dense_row(z, t, cw, a, z_loss):
    """Returns (loss, dloss/dz, dloss/dt) for one included dense row."""
    k = z.shape[0]
    m = cw & (z > -np.inf)
    if not m.any():
        return 0.0, np.zeros(k), np.zeros(k)
    k_eff = np.sum(m)
    c = (1.0 - a) * t * cw + a * m / k_eff
    loss, dz, lse = _row_core(z, m, c, z_loss)
    dt = np.zeros(k)
    finite = cw & np.isfinite(z)
    dt[finite] = (1.0 - a) * (lse - z[finite])
    return loss, dz, dt


def _sparse_row(z, y, cw, w, a, z_loss):
    """Returns (loss, dloss/dz) for one included integer-label row."""
    k = z.shape[0]
    if not 0 <= y < k:
        return math.nan, np.full(k, math.nan)
    m = cw & (z > -np.inf)
    if not m.any():
        return 0.0, np.zeros(k)
    k_eff = np.sum(m)
    c = a * m * w / k_eff
    c[y] += (1.0 - a) * w[y]
    loss, dz, _ = _row_core(z, m, c, z_loss)
    return loss, dz


# --------------------------------------------------------------------------------------------
# Reduction
# --------------------------------------------------------------------------------------------


def _reduce(per_row, denominator, reduction, cotangent, bshape):
    """Returns (loss, per-row weight of the gradient)."""
    if reduction == "none":
        g = np.ones(bshape) if cotangent is None else np.broadcast_to(cotangent, bshape)
        return per_row.reshape(bshape), np.asarray(g, dtype=np.float64).reshape(-1)
    g = 1.0 if cotangent is None else float(cotangent)
    n = per_row.size
    if reduction == "sum":
        return np.asarray(np.sum(per_row)), np.full(n, g)
    if reduction == "mean":
        if denominator == 0:
            return np.asarray(0.0), np.zeros(n)
        return np.asarray(np.sum(per_row) / denominator), np.full(n, g / denominator)
    raise ValueError(f"unknown reduction {reduction!r}")


# --------------------------------------------------------------------------------------------
# Public reference functions
# --------------------------------------------------------------------------------------------


def softmax_cross_entropy(
    logits,
    labels,
    axis=-1,
    where=None,
    *,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="none",
    cotangent=None,
) -> Result:
    x = np.asarray(logits, dtype=np.float64)
    t_full = np.asarray(labels, dtype=np.float64)
    assert t_full.shape == x.shape
    bshape = batch_shape(x.shape, axis)
    z_rows, dzdx_rows = (to_rows(v, axis) for v in soft_cap(x, None))
    t_rows = to_rows(t_full, axis)
    row_where, cw_rows = split_where(where, x.shape, axis)
    n, k = z_rows.shape

    per_row = np.zeros(n)
    dz = np.zeros((n, k))
    dt = np.zeros((n, k))
    included = row_where.copy()
    for r in range(n):
        if included[r]:
            per_row[r], dz[r], dt[r] = _dense_row(
                z_rows[r], t_rows[r], cw_rows[r], label_smoothing, z_loss
            )
    denominator = float(np.sum(included))
    loss, g = _reduce(per_row, denominator, reduction, cotangent, bshape)
    grad_logits = from_rows(dz * dzdx_rows * g[:, None], x.shape, axis)
    grad_labels = from_rows(dt * g[:, None], x.shape, axis)
    return Result(
        loss=loss,
        per_row=per_row.reshape(bshape),
        grad_logits=grad_logits,
        grad_labels=grad_labels,
        included=included.reshape(bshape),
        denominator=denominator,
    )


def softmax_cross_entropy_with_integer_labels(
    logits,
    labels,
    axis=-1,
    where=None,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    class_weights=None,
    logit_soft_cap=None,
    reduction="none",
    cotangent=None,
) -> Result:
    x = np.asarray(logits, dtype=np.float64)
    y_full = np.asarray(labels)
    bshape = batch_shape(x.shape, axis)
    assert y_full.shape == bshape, (y_full.shape, bshape)
    k = num_classes(x.shape, axis)
    w = np.ones(k) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    assert w.shape == (k,)
    z_full, dzdx_full = soft_cap(x, logit_soft_cap)
    z_rows, dzdx_rows = to_rows(z_full, axis), to_rows(dzdx_full, axis)
    y_rows = y_full.reshape(-1).astype(np.int64)
    row_where, cw_rows = split_where(where, x.shape, axis)
    n = z_rows.shape[0]

    included = row_where.copy()
    if ignore_index is not None:
        included &= y_rows != ignore_index
    per_row = np.zeros(n)
    dz = np.zeros((n, k))
    denominator = 0.0
    for r in range(n):
        if not included[r]:
            continue
        y = int(y_rows[r])
        per_row[r], dz[r] = _sparse_row(z_rows[r], y, cw_rows[r], w, label_smoothing, z_loss)
        denominator += w[y] if 0 <= y < k else math.nan
    loss, g = _reduce(per_row, denominator, reduction, cotangent, bshape)
    grad_logits = from_rows(dz * dzdx_rows * g[:, None], x.shape, axis)
    return Result(
        loss=loss,
        per_row=per_row.reshape(bshape),
        grad_logits=grad_logits,
        grad_labels=None,
        included=included.reshape(bshape),
        denominator=denominator,
    )


def smooth_labels(labels, alpha, *, axis=-1, where=None) -> np.ndarray:
    """optax.losses.smooth_labels: (1 - alpha) * labels + alpha / num_categories."""
    labels = np.asarray(labels, dtype=np.float64)
    if where is None:
        num = num_classes(labels.shape, axis)
    else:
        ax = class_axes(labels.ndim, axis)
        num = np.sum(np.broadcast_to(np.asarray(where, bool), labels.shape), axis=ax, keepdims=True)
    return (1.0 - alpha) * labels + alpha / num


# --------------------------------------------------------------------------------------------
# PyTorch's torch.nn.functional.cross_entropy (class-index targets), written from its docs and
# its ATen implementation (cross_entropy_loss_label_smoothing) - independent of the above.
# --------------------------------------------------------------------------------------------


def torch_cross_entropy(
    input2d, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """input2d: [N, C] logits, target: [N] class indices."""
    x = np.asarray(input2d, dtype=np.float64)
    target = np.asarray(target)
    n, c = x.shape
    weight = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    mx = x.max(axis=1, keepdims=True)
    log_probs = x - (mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True)))
    keep = target != ignore_index

    # nll_loss: l_n = -w_{y_n} x_{n, y_n} * 1{y_n != ignore_index}
    nll = np.zeros(n)
    w_y = np.zeros(n)
    for i in range(n):
        if keep[i]:
            w_y[i] = weight[target[i]]
            nll[i] = -w_y[i] * log_probs[i, target[i]]
    # smooth_loss: -sum_c w_c log p_{n,c}, zero on ignored rows
    smooth = -(log_probs * weight[None, :]).sum(axis=1)
    smooth[~keep] = 0.0

    if reduction == "none":
        nll_red, smooth_red = nll, smooth
    elif reduction == "sum":
        nll_red, smooth_red = nll.sum(), smooth.sum()
    elif reduction == "mean":
        nll_red = nll.sum() / w_y.sum()
        smooth_red = smooth.sum() / w_y.sum()
    else:
        raise ValueError(reduction)
    return (1.0 - label_smoothing) * nll_red + smooth_red * (label_smoothing / c)
