"""Per-token log-probabilities of given tokens and the softmax's entropy, on the engine.

With ``z`` the engine's logits (soft-capped, divided by the temperature), ``m`` the row
maximum, ``s = sum_k exp(z_k - m)`` and ``y`` the token's label:

    log p_y = (z_y - m) - log s
    H       = log s + sum_k exp(z_k - m) (m - z_k) / s

``log p_y`` needs one pick (the label's logit); ``H`` one exp-gap row sum, every term
non-negative. Their gradients, linear in the coefficients ``(c_y, c_H)`` (each output's
cotangent on the tokens that count):

    d/dz_k = c_y ([k = y] - p_k) - c_H p_k (log p_k + H)

with ``H`` itself an unscaled per-token number of the backward pass (``View.fixed``).

Internal API: :class:`LogProbs` (the loss), :class:`LabelRows` (its per-token inputs),
:func:`log_probs` and :func:`entropy` (the whole fused losses of a checked call).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent._fused import contract, driver, explicit
from jxent._fused.options import Call


class LabelRows(NamedTuple):
    """Per-token inputs, all ``[N]``: ``labels`` (int32 column on this device, or -1),
    ``valid`` (bool: the label is a real class; None: ``labels >= 0``), ``keep`` (bool:
    the token counts; None: all)."""

    labels: jax.Array | None
    valid: jax.Array | None
    keep: jax.Array | None


class LogProbs(NamedTuple):
    """Outputs, in this order: ``log p_y`` if ``label``, ``H`` if ``entropy`` (at least
    one). A token that does not count gets 0 for both; a counted token whose label is
    not a class gets a NaN log-probability."""

    label: bool
    entropy: bool

    def row_sums(self, columns):
        return {"h": contract.RowSum("exp_gap")} if self.entropy else {}

    def pick_shapes(self, columns):
        return {"z_label": ()} if self.label else {}

    def picks(self, z, view: contract.View):
        if not self.label:
            return {}
        return {"z_label": contract.pick_columns(z, view, view.rows.labels)}

    def finish(self, sums: contract.RowSums, rows: LabelRows, num_classes: int):
        acc = sums.row_max.dtype
        zero = jnp.zeros((), acc)
        keep = jnp.ones(sums.row_max.shape, jnp.bool_) if rows.keep is None else rows.keep
        one = jnp.where(keep, jnp.ones((), acc), zero)
        outputs, coefs = [], []
        h = jnp.zeros_like(sums.row_max)
        if self.label:
            valid = rows.labels >= 0 if rows.valid is None else rows.valid
            log_p = (sums.picks["z_label"] - sums.row_max) - sums.lse_rel
            log_p = jnp.where(valid, log_p, jnp.nan)
            outputs.append(jnp.where(keep, log_p, zero))
            # NaN for a counted token without a class: its gradient is NaN too.
            coefs.append(jnp.where(valid, one, jnp.where(keep, jnp.nan, zero)))
        if self.entropy:
            h = sums.lse_rel + sums.sums["h"] / sums.sums["h/exp"]
            outputs.append(jnp.where(keep, h, zero))
            coefs.append(one)
        return tuple(outputs), tuple(coefs), h

    def targets(self, view: contract.View):
        return view.rows.labels if self.label else None

    def softmax_form(self):
        if self.entropy or not self.label:
            return None  # the entropy's dloss/dz is p (log p + H), not a multiple of p

        def form(coefs):
            (c,) = coefs
            return -c, -c[:, None]  # dz = c [k = y] - c p

        return form

    def dlogits(self, p, log_p, coefs, view: contract.View):
        dz = jnp.zeros_like(p)
        coefs = list(coefs)
        if self.label:
            c = coefs.pop(0)
            index = view.column_of(view.rows.labels)
            is_label = lax.broadcasted_iota(index.dtype, p.shape, 1) == index[:, None]
            dz = jnp.where(is_label, c[:, None], jnp.zeros((), p.dtype)) - c[:, None] * p
        if self.entropy:
            c = coefs.pop(0)
            dz = dz - c[:, None] * (p * (log_p + view.fixed[:, None]))
        return dz


def log_probs(call: Call, entropy: bool) -> tuple[jax.Array, ...]:
    """The checked call's per-token outputs (batch-shaped): ``log p_y`` of its labels (if
    any), then ``H`` (with ``entropy``)."""
    if explicit.sharded(call):
        body = lambda c, _: log_probs(c, entropy)  # noqa: E731
        outputs = (explicit.TOKENS,) * ((call.labels is not None) + entropy)
        return explicit.run(body, call, None, outputs)
    n = math.prod(call.batch_shape)
    here = valid = None
    if call.labels is not None:
        here, valid = driver.class_columns(call, call.labels.reshape(n))
    keep = None if call.row_mask is None else call.row_mask.reshape(n)
    loss = LogProbs(label=call.labels is not None, entropy=entropy)
    outputs, _ = driver.run(loss, call, LabelRows(here, valid, keep), per_token=True)
    return tuple(o.reshape(call.batch_shape) for o in outputs)


def entropy(call: Call) -> jax.Array:
    """The entropy of the checked call under its reduction: each token's weighted by its
    token weight (its gradient too), the mean over the kept tokens' weights."""
    if explicit.sharded(call):
        kind = explicit.TOKENS if call.options.reduction == "none" else explicit.SCALAR
        return explicit.run(lambda c, _: entropy(c), call, None, kind)
    (h,) = log_probs(call, entropy=True)
    if call.token_weights is not None:
        # Each token's entropy is its own output: weighting it scales its gradient too.
        h = h * call.token_weights.reshape(h.shape)
    weight = driver.weighted_denominator(call, call.row_mask)
    return driver.reduce(call, h, False, weight)
