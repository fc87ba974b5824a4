"""Independent float64 NumPy/SciPy reference for jxent's element-wise binary losses.

Written from the textbook and framework formulas (PyTorch's ``BCEWithLogitsLoss`` and
``BCELoss``, Lin et al.'s focal loss), evaluated directly in float64 with
``scipy.special.expit`` / ``log_expit``: no log-space tricks, no custom rules. Never
imports jxent.

Each function returns a :class:`Result`: the reduced loss and the analytic gradients of
``sum(cotangent * loss)`` with respect to the predictions and the labels (the
cotangent has the inputs' shape for ``reduction="none"`` and is a scalar otherwise).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import expit, log_expit

F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass
class Result:
    loss: np.ndarray  # element-wise for reduction="none", scalar otherwise
    elementwise: np.ndarray
    grad_x: np.ndarray
    grad_t: np.ndarray


def _mask(where, shape):
    return np.ones(shape, bool) if where is None else np.broadcast_to(np.asarray(where), shape)


def _finish(loss, gx, gt, where, reduction, cotangent):
    m = _mask(where, loss.shape)
    loss = np.where(m, loss, 0.0)
    if reduction == "none":
        cot = np.ones(loss.shape) if cotangent is None else np.asarray(cotangent, np.float64)
        out = loss
    else:
        cot = np.full(loss.shape, 1.0 if cotangent is None else float(cotangent))
        if reduction == "sum":
            out = loss.sum()
        else:
            n = m.sum()
            out = loss.sum() / n if n > 0 else 0.0
            cot = cot / n if n > 0 else cot * 0
    gx = np.where(m, gx * cot, 0.0)
    gt = np.where(m, gt * cot, 0.0)
    return Result(np.asarray(out, np.float64), loss, gx, gt)


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid_binary_cross_entropy(
    logits,
    labels,
    *,
    pos_weight=None,
    label_smoothing=0.0,
    where=None,
    reduction="none",
    cotangent=None,
):
    """PyTorch's BCEWithLogitsLoss with Keras' label smoothing; logits must be finite."""
    x = np.asarray(logits, np.float64)
    t0 = np.asarray(labels, np.float64)
    a = label_smoothing
    t = t0 * (1 - a) + 0.5 * a
    pw = np.ones(()) if pos_weight is None else np.asarray(pos_weight, np.float64)
    pw = np.broadcast_to(pw, x.shape)
    loss = -(pw * t * log_expit(x) + (1 - t) * log_expit(-x))
    gx = -pw * t * expit(-x) + (1 - t) * expit(x)
    gt = (1 - a) * (pw * softplus(-x) - softplus(x))
    return _finish(loss, gx, gt, where, reduction, cotangent)


def torch_bce_with_logits(logits, labels, pos_weight):
    """The formula in PyTorch's BCEWithLogitsLoss documentation, element-wise:
    l = -[p_c y log sigma(x) + (1 - y) log(1 - sigma(x))]."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    return -(pos_weight * y * np.log(expit(x)) + (1 - y) * np.log(1 - expit(x)))


def binary_cross_entropy(
    probs, labels, *, where=None, reduction="none", cotangent=None, grad_eps=1e-12
):
    """PyTorch's BCELoss: logs clamped at -100; its backward (p - t) / max(p (1 - p), 1e-12)
    (jxent raises the floor to 1 / 65504 for float16 inputs: ``grad_eps``)."""
    p = np.asarray(probs, np.float64)
    t = np.asarray(labels, np.float64)
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(p), -100.0)
        log_q = np.maximum(np.log(1 - p), -100.0)
    loss = -(t * log_p + (1 - t) * log_q)
    gx = (p - t) / np.maximum(p * (1 - p), grad_eps)
    gt = log_q - log_p
    return _finish(loss, gx, gt, where, reduction, cotangent)


def sigmoid_focal_loss(
    logits, labels, alpha=None, gamma=2.0, *, where=None, reduction="none", cotangent=None
):
    """Lin et al.'s focal loss with optax's soft-label generalisation, straight in float64:
    alpha_t (1 - p_t)^gamma BCE with 1 - p_t = (1 - t) sigma(x) + t sigma(-x)."""
    x = np.asarray(logits, np.float64)
    t = np.asarray(labels, np.float64)
    s, sn = expit(x), expit(-x)
    ce = -(t * log_expit(x) + (1 - t) * log_expit(-x))
    one_m_pt = (1 - t) * s + t * sn
    w = one_m_pt**gamma
    at = np.ones_like(x) if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    dat = 0.0 if alpha is None else 2 * alpha - 1
    loss = at * w * ce
    # derivatives of w = (1 - p_t)^gamma; gamma (1 - p_t)^(gamma - 1) is 0 when gamma = 0.
    dw_base = gamma * one_m_pt ** (gamma - 1) if gamma != 0 else np.zeros_like(x)
    # sigma(x) - t written as (1 - t) sigma(x) - t sigma(-x): no cancellation at saturation.
    gx = at * (dw_base * (1 - 2 * t) * s * sn * ce + w * ((1 - t) * s - t * sn))
    gt = dat * w * ce + at * (dw_base * (sn - s) * ce - w * x)
    return _finish(loss, gx, gt, where, reduction, cotangent)
