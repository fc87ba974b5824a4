"""The integer-label softmax cross-entropy on the blocked engine (the worked example).

Per token, with ``a`` = label smoothing over the ``V`` real classes, ``w`` = class
weights, ``z`` = the (soft-capped) logits, ``m`` = the row maximum:

    loss = C (lse - m) + (1 - a) w_y (m - z_y) + (a / V) sum_k w_k (m - z_k) + z_loss lse^2

with ``C = (1 - a) w_y + (a / V) sum_k w_k``: every term a sum of non-negative numbers
(no cancellation, as in the logits core, whose :func:`jxent._softmax.finish_rows` turns
them into the loss). For the engine that is one gap sum (the smoothing term, weighted
by the class weights) and two picks (the label's logit and its class weight); the
gradient ``dloss/dz_k = (C + 2 z_loss lse) p_k - (1 - a) w_y [k = y] - (a / V) w_k``.

Internal API: :class:`CrossEntropy` (the loss), :class:`XentRows` (its per-token
inputs), :func:`column_weights`, :func:`cross_entropy` (the whole fused loss of a
checked call, on one device or a vocabulary split).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent._fused import contract, driver, explicit
from jxent._fused.options import Call
from jxent._layout import XentConfig, and_masks
from jxent._reduction import mean_weight
from jxent._softmax import finish_rows, take_classes
from jxent._split import masked
from jxent._split import mean_weight as split_mean_weight


class XentRows(NamedTuple):
    """Per-token inputs of the fused cross-entropy, all ``[N]``."""

    # int32: the label's column in this device's w, or -1 (out of range, or on another
    # shard of the vocabulary).
    labels: jax.Array
    # bool: the label is one of the real classes (None: labels >= 0, on one device).
    valid: jax.Array | None
    keep: jax.Array | None  # bool: the token counts (None: every token)
    # float (accumulation dtype): each token's weight (token_weights), or None: all 1.
    weights: jax.Array | None = None


class CrossEntropy(NamedTuple):
    """The fused loss: ``label_smoothing`` and ``z_loss`` of ``config`` (the soft cap is the
    engine's). Its per-column input is the class weights ``[V]`` (in the accumulation
    dtype, 0 on padding columns) or None. ``with_lse``: a second output, each token's
    log-sum-exp (``d lse / dz = p``)."""

    config: XentConfig
    with_lse: bool = False

    def row_sums(self, class_weights):
        if self.config.label_smoothing == 0:
            return {}
        return {"smooth": contract.RowSum("gap", class_weights)}

    def pick_shapes(self, class_weights):
        return {"z_label": ()} if class_weights is None else {"z_label": (), "w_label": ()}

    def picks(self, z, view: contract.View):
        out = {"z_label": contract.pick_columns(z, view, view.rows.labels)}
        if view.columns is not None:
            # The label's class weight: a gather from the block's [vb] weights.
            col = view.column_of(view.rows.labels)
            here = (col >= 0) & (col < z.shape[-1])
            w_label = take_classes(view.columns, jnp.clip(col, 0, z.shape[-1] - 1))
            out["w_label"] = jnp.where(here, w_label, jnp.zeros((), z.dtype))
        return out

    def finish(self, sums: contract.RowSums, rows: XentRows, num_classes: int):
        cfg = self.config
        acc = sums.row_max.dtype
        zero = jnp.zeros((), acc)
        a = cfg.label_smoothing
        valid = rows.labels >= 0 if rows.valid is None else rows.valid
        w_label = sums.picks.get("w_label", jnp.ones(valid.shape, acc))
        # An out-of-range label has no logit: its loss is NaN, never a plausible number.
        label_coef = (1 - a) * jnp.where(valid, w_label, jnp.nan)
        dist = jnp.where(label_coef != 0, label_coef * (sums.row_max - sums.picks["z_label"]), zero)
        smoothing = None
        if a > 0:
            # Every logit is finite (padding columns hold a large negative number and have
            # zero weight), so all num_classes classes count.
            half_gap = 0.5 * sums.sums["smooth"]
            smoothing = (jnp.asarray(num_classes, acc), sums.totals["smooth"], half_gap)
        loss, _, scale, label_coef, smooth_coef = finish_rows(
            cfg,
            sums.row_max,
            sums.lse_rel,
            jnp.ones(valid.shape, jnp.bool_),
            label_coef,
            dist,
            label_coef,
            smoothing,
            rows.keep,
        )
        loss, coefs = contract.weighted(rows.weights, loss, (scale, label_coef, smooth_coef))
        if not self.with_lse:
            return loss, coefs
        lse = sums.row_max + sums.lse_rel
        return (loss, lse), (coefs, jnp.ones_like(lse))

    def targets(self, view: contract.View):
        return view.rows.labels

    def softmax_form(self):
        if self.config.label_smoothing > 0:
            return None  # dloss/dz holds (a / V) w_k at every column

        def form(coefs):
            if self.with_lse:
                coefs, lse_coef = coefs
                coefs = (coefs[0] + lse_coef, *coefs[1:])
            scale, label_coef, _ = coefs
            return scale, label_coef[:, None]

        return form

    def dlogits(self, p, log_p, coefs, view: contract.View):
        if self.with_lse:
            coefs, lse_coef = coefs
            coefs = (coefs[0] + lse_coef, *coefs[1:])
        scale, label_coef, smooth = coefs
        dz = scale[:, None] * p
        if smooth is not None:
            w_cols = jnp.ones((1, p.shape[-1]), p.dtype) if view.columns is None else view.columns
            dz = dz - smooth[:, None] * w_cols.reshape(1, -1)
        # A compare-select inside the elementwise pass that builds the block anyway.
        index = view.column_of(view.rows.labels)
        is_label = lax.broadcasted_iota(index.dtype, p.shape, 1) == index[:, None]
        return dz - jnp.where(is_label, label_coef[:, None], jnp.zeros((), p.dtype))


def column_weights(class_weights, real_columns, smoothing: bool, acc):
    """The per-column input of :class:`CrossEntropy`: class weights in ``acc`` with the
    padding's (any values) selected to 0; without class weights, the padding indicator
    when label smoothing must skip it, else None."""
    if class_weights is not None:
        cw = class_weights.astype(acc)
        return cw if real_columns is None else jnp.where(real_columns, cw, jnp.zeros((), acc))
    if real_columns is not None and smoothing:
        return real_columns.astype(acc)
    return None


def cross_entropy(call: Call, config: XentConfig, ignore_index, return_lse: bool):
    """The fused cross-entropy of a checked call (one device or a vocabulary split;
    ``config``'s soft cap is the call's). With ``return_lse``: the loss and each token's
    log-sum-exp (of the batch shape)."""
    if explicit.sharded(call):
        body = lambda c, _: cross_entropy(c, config, ignore_index, return_lse)  # noqa: E731
        kind = explicit.TOKENS if call.options.reduction == "none" else explicit.SCALAR
        return explicit.run(body, call, None, (kind, explicit.TOKENS) if return_lse else kind)
    opts, batch_shape = call.options, call.batch_shape
    n = math.prod(batch_shape)
    if ignore_index is not None:
        call = call._replace(row_mask=and_masks(call.row_mask, call.labels != ignore_index))
    real = driver.real_columns(call)
    class_weights = call.class_weights
    if opts.split is not None and class_weights is not None:
        # The padding's weights (any values) never take part, the mean's included.
        class_weights = masked(class_weights, real, 0)
    cw = column_weights(class_weights, real, config.label_smoothing > 0, call.acc)
    here, valid = driver.class_columns(call, call.labels.reshape(n))
    keep = None if call.row_mask is None else call.row_mask.reshape(n)
    rows = XentRows(here, valid, keep, driver.flat(call.token_weights))
    loss = CrossEntropy(config._replace(soft_cap=None, class_axes=None), return_lse)
    result, summed = driver.run(loss, call, rows, cw, per_token=return_lse)
    lse = None
    if return_lse:
        result, lse = result
    weight = _mean_weight(call, class_weights)
    loss = driver.reduce(call, result, summed, driver.weighted_denominator(call, weight))
    return loss if lse is None else (loss, lse.reshape(batch_shape))


def _mean_weight(call: Call, class_weights):
    """Each token's weight in the ``"mean"``'s denominator: its label's class weight
    (read on the shard that holds it, when split) on kept tokens, or the token mask."""
    opts = call.options
    if opts.split is not None:
        return split_mean_weight(
            opts.split, call.labels, call.row_mask, class_weights, opts.reduction, call.acc
        )
    last = opts.num_classes - 1
    take = lambda table, y: take_classes(table, jnp.clip(y, 0, last))  # noqa: E731
    return mean_weight(call.row_mask, class_weights, call.labels, opts.reduction, call.acc, take)
