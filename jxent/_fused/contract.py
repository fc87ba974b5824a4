"""The contract of a fused loss: what a loss of ``z = x @ w (+ bias)`` tells the
engine, and what the engine hands it.

A fused loss is a per-token function of the logits row ``z`` that needs, besides a few
values it reads at given columns, only the row's log-sum-exp and sums of the form
``sum_k c_k (m - z_k)``. The engine produces the logits one ``[token_block,
vocab_block]`` block at a time, in float32 (float64 for float64 inputs), keeps those
per-token numbers with an online log-sum-exp, and runs the backward pass block by
block from the loss's ``dloss/dlogits``. Every fused loss inherits the schedules, the
soft cap, the padding columns, the grouped blocks under GSPMD, the vocabulary-parallel
form under ``shard_map`` and the memory bound (a float32 ``dx`` plus a few panels).

The contract (:class:`FusedLoss`; ``jxent._fused.xent`` is the worked example). Per
token the engine keeps the running maximum ``m`` and ``s = sum_k exp(z_k - m)``; a
loss adds

* **row sums** (:meth:`FusedLoss.row_sums`), each with column weights ``c`` (``None``:
  all 1) and one of three kinds, all sums of non-negative terms that the engine
  re-centres exactly when the maximum moves from ``m`` to ``m' = m + d``:

  =============  =========================================  =========================
  kind           per token                                  when the maximum moves
  =============  =========================================  =========================
  ``"gap"``      ``G = sum_k c_k (m - z_k)``                ``G + d sum_k c_k``
  ``"exp"``      ``E = sum_k c_k exp(z_k - m)``             ``E exp(-d)``
  ``"exp_gap"``  ``H = sum_k c_k exp(z_k - m) (m - z_k)``   ``(H + d E) exp(-d)``
  =============  =========================================  =========================

  (label smoothing is a gap sum; the entropy ``log s + H / s`` needs an exp-gap sum,
  whose ``E`` the engine keeps beside it). The engine also keeps each gap sum's total
  weight ``sum_k c_k``.
* **a teacher's logits** (``Inputs.teacher``: ``x_t [N, D_t]`` and ``w_t`` over the
  same columns, a constant): a second logits stream ``t`` made block by block beside
  ``z`` (same soft cap and temperature), whose own online log-sum-exp (``m_t``,
  ``s_t``) the engine keeps, and one more kind of row sum, ``"cross"``:
  ``X = sum_k c_k exp(t_k - m_t) (t_k - z_k)``, re-centred as ``X exp(-d_t)`` when
  ``m_t`` moves by ``d_t`` (the full-vocabulary KL is ``X / s_t + lse(z) - lse(t)``).
  The loss sees the teacher's block as ``View.teacher``.
* **picks** (:meth:`FusedLoss.picks`): per-token values read from a block, 0 where
  the block does not hold them (a label's logit, its class weight); summed over the
  blocks (and the shards).
* **a second pass** (optional, :meth:`FusedLoss.second_pass`), for sums whose terms
  need the row's final softmax at every class (the Jensen-Shannon mixture ``beta p +
  (1 - beta) q`` of a teacher's stream and the student's): declared from the first
  pass's final numbers, it makes every block again and sums the loss's terms
  (:meth:`FusedLoss.second_terms`) plainly, nothing moving any more.

It then turns the final per-token numbers into the loss and the coefficients of its
gradient (:meth:`FusedLoss.finish`), and gives the block of ``dloss/dlogits`` from the
softmax block ``p``, its logarithm and those coefficients (:meth:`FusedLoss.dlogits`),
which must be linear in the coefficients (the engine multiplies each by the token's
cotangent).


**Padding columns** (``Spec.num_classes`` below ``w``'s columns, marked by
``real_columns``): their logits are *selected* to a large finite negative number
before anything reads them, whatever ``w`` and ``bias`` hold there (``inf``, ``NaN``);
``exp`` of it is 0, and the soft cap's derivative and ``dx``'s weights are selected to
0 there. A loss gives them zero weight in its gap sums; the engine sets its second
pass's terms there to 0. (One block's logits: ``jxent._fused.logits``.)

Internal API: :class:`View`, :class:`RowSum`, :class:`RowSums`, :class:`SecondPass`,
:class:`FusedLoss`, :class:`Spec`, :class:`Inputs`, :func:`pick_columns`,
:func:`add_at_columns`, :func:`weighted`, :func:`row_scale`, :func:`accumulation`,
:func:`vocab_axis`, :func:`num_columns`, :func:`class_count`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jxent._fused import logits as L
from jxent._fused.logits import compute_dtype
from jxent._fused.plan import Plan
from jxent._validation import accumulation_dtype


class View(NamedTuple):
    """What a loss sees of one block besides its logits."""

    rows: Any  # the loss's per-token inputs, this token block's entries ([n] each)
    columns: Any  # the loss's per-column inputs, this vocabulary block's entries ([vb] each)
    start: Any  # the block's first column within each group (int or traced int32)
    width: int  # columns per group in the block
    groups: int  # vocabulary groups (see jxent._fused.blocks)
    group_length: int  # columns per group of the whole vocabulary (on this device)
    # The loss's unscaled per-token numbers: from finish (backward), or from second_pass
    # (the second forward pass's terms).
    fixed: Any = None
    teacher: Any = None  # the teacher's logits block [n, vb] (with Inputs.teacher), or None

    def column_of(self, index: jax.Array) -> jax.Array:
        """Each column index's position in the block: in ``[0, groups * width)`` where the
        block holds it, outside that range elsewhere (negative indices included)."""
        if self.groups == 1:
            return index - self.start
        group, offset = index // self.group_length, index % self.group_length - self.start
        here = (index >= 0) & (offset >= 0) & (offset < self.width)
        return jnp.where(here, group * self.width + offset, -1)


class RowSum(NamedTuple):
    """One row sum of a fused loss (see the module docstring for the kinds)."""

    kind: str  # "gap", "exp", "exp_gap" or (with a teacher) "cross"
    weights: jax.Array | None = None  # this block's column weights [vb]; None: all 1
    # "exp" and "exp_gap" of r z instead of z (static; r > 0): the softmax at another
    # temperature, e.g. r = 1/T, with terms exp(r (z - m)) and r (m - z).
    power: float = 1.0


class RowSums(NamedTuple):
    """The per-token numbers of the whole vocabulary (all devices), for ``finish``."""

    row_max: jax.Array  # m: the largest logit of the row
    lse_rel: jax.Array  # log sum_k exp(z_k - m) >= 0; lse = m + lse_rel
    sums: dict  # name -> the row sum, relative to m
    totals: dict  # name of a gap sum -> sum_k c_k (a scalar)
    picks: dict  # name -> the value read from the column that holds it
    teacher_max: Any = None  # m_t: the largest of the teacher's logits (with a teacher)
    teacher_lse_rel: Any = None  # log sum_k exp(t_k - m_t)
    second: Any = None  # name -> the second pass's row sum (a loss with a second pass)


class SecondPass(NamedTuple):
    """A loss's second forward pass (see :meth:`FusedLoss.second_pass`)."""

    names: tuple[str, ...]  # the row sums it takes (second_terms' keys)
    fixed: Any  # pytree of [n] numbers its terms read (View.fixed), from the first pass


class FusedLoss(Protocol):
    """A fused loss: a hashable object (its options are static) with five methods, and
    four optional ones: ``targets`` and ``softmax_form`` (for gradient filtering),
    ``second_pass`` and ``second_terms`` (a second forward pass)."""

    def row_sums(self, columns) -> dict[str, RowSum]:
        """The row sums to keep, given this block's per-column inputs ``columns``."""

    def pick_shapes(self, columns) -> dict[str, tuple[int, ...]]:
        """The picks, each a per-token value (shape ``()``) or values (e.g. ``(k,)``) in
        the accumulation dtype: name -> per-token shape."""

    def picks(self, z: jax.Array, view: View) -> dict[str, jax.Array]:
        """Per-token values read from the block's logits ``z [n, vb]`` (0 where absent)."""

    def finish(self, sums: RowSums, rows, num_classes: int) -> tuple:
        """``(loss, coefficients)`` or ``(loss, coefficients, fixed)``. ``loss``: the
        per-token loss ``[n]``, or a tuple of per-token outputs (then ``coefficients`` is
        a tuple of as many pytrees, the ``i``-th scaled by the ``i``-th cotangent); the
        coefficients are ``[n]`` arrays in which ``dloss/dz`` is linear. ``fixed``: a
        pytree of ``[n]`` numbers the backward pass needs unscaled (``View.fixed``)."""

    def dlogits(self, p: jax.Array, log_p: jax.Array, coefs, view: View) -> jax.Array:
        """``dloss/dz`` of a block from its softmax ``p [n, vb]``, ``log_p`` (finite where
        ``p`` underflows) and ``coefs`` (this token block's, times each cotangent)."""

    def targets(self, view: View) -> jax.Array | None:
        """Optional (absent: None). The token's target columns, ``[n]`` or ``[n, k]``
        vocabulary indices on this device (-1 or any column the block does not hold:
        none), each at most once per token: where ``dloss/dz`` holds the loss's own terms
        (a label's ``-1``), which gradient filtering (:mod:`jxent._fused.filtering`)
        never drops."""

    def softmax_form(self):
        """Optional (absent: None). For a loss whose ``dloss/dz`` is a multiple of the
        softmax off its targets, ``dloss/dz_nk = a_n p_nk - sum_j b_nj [k = target_nj]``
        (the plain cross-entropy: ``a = scale``, ``b = label_coef``), a function of the
        (scaled) coefficients giving ``(a [n], b [n, k])``; None for any other (label
        smoothing, a teacher's logits). Gradient filtering then decides a block from the
        forward pass's numbers, before making its logits again (:mod:`.filtering`)."""

    def second_pass(self, sums: RowSums, rows) -> SecondPass | None:
        """Optional (absent: None). The second pass that the first pass's final numbers
        ``sums`` (``second`` still None) call for: the engine then makes every block again
        and sums :meth:`second_terms` over the whole vocabulary (all devices) into
        ``RowSums.second`` for ``finish``."""

    def second_terms(self, p: jax.Array, log_p: jax.Array, view: View) -> dict:
        """The elementwise terms ``[n, vb]`` of the second pass's row sums (name -> terms),
        from the block's final softmax ``p``, ``log_p`` (as in ``dlogits``), the teacher's
        block and ``View.fixed`` (``SecondPass.fixed``). Plain sums: nothing moves (the
        engine sets the padding columns' terms to 0)."""


class Spec(NamedTuple):
    """The static choices of one call (hashable)."""

    loss: FusedLoss
    plans: tuple[tuple[str, Plan], ...]  # per platform (see jxent._fused.plan.plans)
    soft_cap: float | None = None
    # The number of real classes when w has padding columns after them (None: every
    # column is a class; on a shard of axis_name, the whole vocabulary's count).
    num_classes: int | None = None
    # The mesh axis (or axes) the vocabulary is split over, inside shard_map; None: one
    # device's whole vocabulary.
    axis_name: Any = None
    # z = soft_cap(x @ w + bias) / temperature: the engine's logits, p = softmax(z); the
    # backward pass multiplies dloss/dz by 1 / temperature. None: 1.
    temperature: float | None = None
    # w's layout: "dv" ([D, V], a Dense kernel) or "vd" ([V, D], a tied embedding table,
    # read in place: blocks are its rows, and dw is written in that layout).
    w_layout: str = "dv"
    # Which implementation of the schedules runs the call (a name of
    # jxent._fused.engine.IMPLEMENTATIONS; "xla": the blocked loops of this package).
    implementation: str = "xla"
    # Gradient filtering's eps (jxent._fused.filtering), or None: every block's products.
    filter_eps: float | None = None


class Inputs(NamedTuple):
    """The flattened operands: x [N, D], w [D, V], bias [V], and the loss's inputs."""

    x: jax.Array
    w: jax.Array
    bias: jax.Array | None
    rows: Any  # pytree of [N] arrays
    columns: Any  # pytree of [V] arrays
    real_columns: jax.Array | None = None  # bool [V]: False on padding columns
    # (x_t [N, D_t], w_t in w's layout over the same columns, bias_t [V] or None): a
    # teacher's logits stream (a constant), or None.
    teacher: Any = None


def pick_columns(z: jax.Array, view: View, index: jax.Array) -> jax.Array:
    """``z`` read at the columns ``index`` (``[n]`` or ``[n, k]``, vocabulary indices on
    this device; -1 or any index the block does not hold reads 0): a gather of one
    element per index (no ``[n, vb]`` compare-select)."""
    col = view.column_of(index)
    here = (col >= 0) & (col < z.shape[-1])
    safe = jnp.clip(col, 0, z.shape[-1] - 1)
    flat = safe[:, None] if safe.ndim == 1 else safe
    picked = jnp.take_along_axis(z, flat, axis=-1)
    picked = picked[:, 0] if safe.ndim == 1 else picked
    return jnp.where(here, picked, jnp.zeros((), z.dtype))


def add_at_columns(dz: jax.Array, view: View, index: jax.Array, values: jax.Array) -> jax.Array:
    """``dz [n, vb]`` plus ``values [n, k]`` at the columns ``index [n, k]`` (repeated
    indices add up; those the block does not hold are dropped): a scatter of ``n * k``
    elements, not ``k`` compare-selects over the block."""
    col = view.column_of(index)
    width = dz.shape[-1]
    # Out-of-range indices are dropped; a negative one would wrap, so it is moved out.
    col = jnp.where((col >= 0) & (col < width), col, width)
    rows = lax.broadcasted_iota(col.dtype, col.shape, 0)
    return dz.at[rows, col].add(values.astype(dz.dtype), mode="drop")


def weighted(weights: jax.Array | None, loss: jax.Array, coefs):
    """A per-token loss and its gradient coefficients times per-token ``weights``
    (None: unchanged): the loss is linear in its coefficients (``[n]`` or ``[n, ...]``)."""
    if weights is None:
        return loss, coefs
    return loss * weights, jax.tree.map(lambda c: c * row_scale(weights, c), coefs)


def row_scale(g: jax.Array, c: jax.Array) -> jax.Array:
    """The per-token cotangent ``g [n]`` shaped to scale a coefficient ``c [n, ...]``."""
    return g.reshape(g.shape + (1,) * (c.ndim - 1))


def accumulation(inp: Inputs):
    return accumulation_dtype(compute_dtype(inp.x, inp.w, inp.bias))


def vocab_axis(spec: Spec) -> int:
    return L.vocab_axis(spec.w_layout)


def num_columns(spec: Spec, inp: Inputs) -> int:
    return inp.w.shape[vocab_axis(spec)]


def class_count(spec: Spec, inp: Inputs) -> int:
    return num_columns(spec, inp) if spec.num_classes is None else spec.num_classes
