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
        log_q = np.maximum(np.log1p(-p), -100.0)  # as PyTorch: log(1 - 1e-30) is not 0
    loss = -(t * log_p + (1 - t) * log_q)
    gx = (p - t) / np.maximum(p * (1 - p), grad_eps)
    gt = log_q - log_p
    return _finish(loss, gx, gt, where, reduction, cotangent)


def sigmoid_binary_cross_entropy_hessian(logits, labels, *, pos_weight=None, label_smoothing=0.0):
    """Element-wise second derivative in the logits, (pw t + 1 - t) sigma(x) sigma(-x) with the
    smoothed label t: a product and a sum of non-negative terms (condition number 1)."""
    x = np.asarray(logits, np.float64)
    a = label_smoothing
    t = np.asarray(labels, np.float64) * (1 - a) + 0.5 * a
    pw = np.ones(()) if pos_weight is None else np.asarray(pos_weight, np.float64)
    return (pw * t + (1 - t)) * expit(x) * expit(-x)


def sigmoid_binary_cross_entropy_grad_scale(
    logits, labels, *, pos_weight=None, label_smoothing=0.0
):
    """(1 - t) sigma(x) + pw t sigma(-x): the sum of the magnitudes of the two terms of the
    gradient, so that scale / |gradient| is its condition number (it cancels at x = logit(t))."""
    x = np.asarray(logits, np.float64)
    a = label_smoothing
    t = np.asarray(labels, np.float64) * (1 - a) + 0.5 * a
    pw = np.ones(()) if pos_weight is None else np.asarray(pos_weight, np.float64)
    return (1 - t) * expit(x) + pw * t * expit(-x)


def binary_cross_entropy_hessian(probs, labels, *, grad_eps=1e-12):
    """d/dp of PyTorch's backward (p - t) / max(p (1 - p), eps): t / p**2 + (1 - t) / (1 - p)**2
    where p (1 - p) > eps (the curvature of -t log p - (1 - t) log(1 - p)), 1 / eps where the
    floor holds."""
    p = np.asarray(probs, np.float64)
    t = np.asarray(labels, np.float64)
    clamped = p * (1 - p) <= grad_eps
    with np.errstate(divide="ignore", invalid="ignore"):
        curv = t / p**2 + (1 - t) / (1 - p) ** 2
    return np.where(clamped, 1 / grad_eps, curv)


@dataclasses.dataclass
class FocalParts:
    """Element-wise pieces of the focal loss in float64, the derivatives straight from the
    chain rule on l = alpha_t w ce, w = u**gamma, u = 1 - p_t (``u'`` below is d/dx)."""

    u: np.ndarray  # 1 - p_t = (1 - t) sigma(x) + t sigma(-x)
    ce: np.ndarray
    w: np.ndarray  # u ** gamma
    r: np.ndarray  # u' / u = (1 - 2t) sigma(x) sigma(-x) / u
    alpha_t: np.ndarray


def _focal_parts(x, t, alpha, gamma):
    s, sn = expit(x), expit(-x)
    ce = -(t * log_expit(x) + (1 - t) * log_expit(-x))
    u = (1 - t) * s + t * sn
    # sigma(x) sigma(-x) / u for hard labels is sigma(-x) (t = 0) or sigma(x) (t = 1): the
    # quotient itself is 0 / 0 where both underflow, even in float64 (|x| > 745).
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(t == 0, sn, np.where(t == 1, s, s * sn / u))
    at = np.ones_like(x) if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    return FocalParts(u, ce, u**gamma, (1 - 2 * t) * ratio, at)


def sigmoid_focal_loss(
    logits, labels, alpha=None, gamma=2.0, *, where=None, reduction="none", cotangent=None
):
    """Lin et al.'s focal loss with optax's soft-label generalisation, straight in float64:
    alpha_t (1 - p_t)^gamma BCE with 1 - p_t = (1 - t) sigma(x) + t sigma(-x)."""
    x = np.asarray(logits, np.float64)
    t = np.asarray(labels, np.float64)
    x, t = np.broadcast_arrays(x, t)
    f = _focal_parts(x, t, alpha, gamma)
    s, sn = expit(x), expit(-x)
    dat = 0.0 if alpha is None else 2 * alpha - 1
    loss = f.alpha_t * f.w * f.ce
    # dl/dx = alpha_t w (gamma r ce + ce'), ce' = sigma(x) - t written as
    # (1 - t) sigma(x) - t sigma(-x): no cancellation at saturation.
    gx = f.alpha_t * f.w * (gamma * f.r * f.ce + (1 - t) * s - t * sn)
    # dl/dt = (2 alpha - 1) w ce + alpha_t (gamma w (sigma(-x) - sigma(x)) ce / u - w x);
    # ce / u -> 1 where both underflow (hard labels agreeing with a saturated logit).
    with np.errstate(divide="ignore", invalid="ignore"):
        ce_u = np.where(f.u > 0, f.ce / f.u, 1.0)
    gt = dat * f.w * f.ce + f.alpha_t * (gamma * f.w * (sn - s) * ce_u - f.w * x)
    return _finish(loss, gx, gt, where, reduction, cotangent)


@dataclasses.dataclass
class FocalDerivatives:
    hess_x: np.ndarray  # d2l/dx2
    grad_alpha: np.ndarray  # dl/d alpha (alpha given)
    grad_gamma: np.ndarray  # dl/d gamma
    # Sums of the magnitudes of the terms of the value, gradient and second derivative,
    # times 1 + gamma (1 + |log u|) + |x| [gamma != 0], the condition number of
    # w = exp(gamma log u) and of r = exp(-softplus(x) - softplus(-x) - log u) in float
    # arithmetic (log u and the softpluses carry absolute errors eps |.|).
    value_scale: np.ndarray
    grad_x_scale: np.ndarray
    hess_x_scale: np.ndarray


def sigmoid_focal_loss_derivatives(logits, labels, alpha=None, gamma=2.0):
    """Element-wise second derivative in the logits and derivatives in alpha and gamma:
    l'' = alpha_t w (gamma ((gamma - 1) r**2 + r (sigma(-x) - sigma(x))) ce
          + 2 gamma r ce' + sigma(x) sigma(-x)),
    from w' = gamma w r, r' = r (sigma(-x) - sigma(x)) - r**2, ce'' = sigma(x) sigma(-x)."""
    x = np.asarray(logits, np.float64)
    t = np.asarray(labels, np.float64)
    x, t = np.broadcast_arrays(x, t)
    f = _focal_parts(x, t, alpha, gamma)
    s, sn = expit(x), expit(-x)
    dce = (1 - t) * s - t * sn
    terms = [
        gamma * (gamma - 1) * f.r**2 * f.ce,
        gamma * f.r * (sn - s) * f.ce,
        2 * gamma * f.r * dce,
        s * sn,
    ]
    hess = f.alpha_t * f.w * sum(terms)
    with np.errstate(divide="ignore"):
        log_u = np.log(f.u)
    # u = 0 only where w ce underflows as well: every term there is 0.
    log_u = np.where(f.u > 0, log_u, 0.0)
    kappa = 1 + gamma * (1 + np.abs(log_u)) + (np.abs(x) if gamma else 0)
    mag = f.alpha_t * f.w * kappa
    return FocalDerivatives(
        hess_x=hess,
        grad_alpha=(2 * t - 1) * f.w * f.ce,
        grad_gamma=f.alpha_t * f.w * log_u * f.ce,
        value_scale=mag * f.ce,
        grad_x_scale=mag * (np.abs(gamma * f.r * f.ce) + (1 - t) * s + t * sn),
        hess_x_scale=mag * sum(np.abs(term) for term in terms),
    )
