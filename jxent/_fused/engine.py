"""The blocked engine: any fused loss of ``z = x @ w (+ bias)`` without the logits array.

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

Two schedules, under a ``jax.custom_vjp``:

* **Streaming** (vocabulary blocks narrower than the vocabulary; Cut Cross-Entropy's
  schedule). The forward pass keeps the per-token numbers and saves only them. The
  backward pass recomputes each block's logits, forms its ``dloss/dlogits``, adds
  ``dz @ w_blk.T`` to a float32 ``dx`` and, once all token blocks of a vocabulary
  block are done, writes that block's ``dw`` columns in place. Four matrix products
  of the size of ``x @ w`` in all (five with a second pass).
* **Single pass** (a block spans the whole vocabulary, and the loss is summed over
  tokens; Liger Kernel's schedule). Each token block's logits give its softmax at
  once, so the forward pass under ``jax.vjp`` computes the gradients of the summed
  loss too, accumulating ``dw`` in a float32 ``[D, V]`` buffer; the backward pass
  only scales them. Three matrix products (a second pass reads the same block). A
  call that is not differentiated runs the forward loop alone.

**Vocabulary-parallel** (``Spec.axis_name``, inside ``shard_map`` with ``w`` split
over its columns): each shard runs the streaming forward pass on its columns, then one
``pmax`` of ``m`` and one ``psum`` of the re-centred per-token numbers (and of the gap
totals) give every shard the whole vocabulary's (a second pass's sums: one more
``psum``); the backward pass is each shard's own,
with ``dx`` summed over the shards (``_rules.sum_to_type``).

**Padding columns** (``Spec.num_classes`` below ``w``'s columns, marked by
``real_columns``): their logits are *selected* to a large finite negative number
before anything reads them, whatever ``w`` and ``bias`` hold there (``inf``, ``NaN``);
``exp`` of it is 0, and the soft cap's derivative and ``dx``'s weights are selected to
0 there. A loss gives them zero weight in its gap sums; the engine sets its second
pass's terms there to 0. (One block's logits: ``jxent._fused.logits``.)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jxent import _backend
from jxent._fused import blocks as B
from jxent._fused import logits as L
from jxent._fused.logits import compute_dtype
from jxent._fused.plan import Plan
from jxent._rules import sum_to_type
from jxent._softmax import row_sums
from jxent._validation import accumulation_dtype

# --------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------


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
    two optional ones (``second_pass``, ``second_terms``) for a second forward pass."""

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
    return loss * weights, jax.tree.map(lambda c: c * _row_scale(weights, c), coefs)


def _acc(inp: Inputs):
    return accumulation_dtype(compute_dtype(inp.x, inp.w, inp.bias))


def _vocab_axis(spec: Spec) -> int:
    return L.vocab_axis(spec.w_layout)


def _columns(spec: Spec, inp: Inputs) -> int:
    return inp.w.shape[_vocab_axis(spec)]


def _num_classes(spec: Spec, inp: Inputs) -> int:
    return _columns(spec, inp) if spec.num_classes is None else spec.num_classes


# --------------------------------------------------------------------------------------------
# Forward: online per-token statistics
# --------------------------------------------------------------------------------------------


class _Running(NamedTuple):
    """Per-token running statistics over the vocabulary blocks seen so far, all [N]."""

    m: jax.Array  # running maximum of z
    s: jax.Array  # sum_k exp(z_k - m)
    sums: dict  # name -> the loss's row sum relative to m (and "name/exp" partners)
    picks: dict  # name -> picked value (0 until its block is seen)
    mt: jax.Array | None = None  # with a teacher: the running maximum of its logits t
    st: jax.Array | None = None  # sum_k exp(t_k - mt)


#: The name of the teacher's sum of exponentials among a block's row sums.
_TEACHER_EXP = "/teacher"


def _partner(name: str) -> str:
    """The name of the "exp" sum the engine keeps beside the "exp_gap" sum ``name``."""
    return name + "/exp"


def _sum_names(declared: dict[str, RowSum]) -> list[str]:
    names = []
    for name, spec in declared.items():
        names += [name, _partner(name)] if spec.kind == "exp_gap" else [name]
    return names


def _init_running(loss: FusedLoss, n: int, acc, columns, teacher: bool = False) -> _Running:
    zeros = jnp.zeros((n,), acc)
    lowest = jnp.full((n,), -jnp.inf, acc)
    return _Running(
        lowest,
        zeros,
        {k: zeros for k in _sum_names(loss.row_sums(columns))},
        {k: jnp.zeros((n, *shape), acc) for k, shape in loss.pick_shapes(columns).items()},
        lowest if teacher else None,
        zeros if teacher else None,
    )


def _rescale(m_old: jax.Array, m_new: jax.Array) -> jax.Array:
    """``exp(m_old - m_new)``, 0 where nothing was seen (``m_old = -inf``, even when
    ``m_new`` is ``-inf`` too: a teacher row masked so far)."""
    seen = m_old > -jnp.inf
    return jnp.where(seen, jnp.exp(jnp.where(seen, m_old - m_new, 0)), 0)


def _total(c: jax.Array | None, width: int, acc) -> jax.Array:
    """``sum_k c_k`` over a block of ``width`` columns."""
    return jnp.asarray(width, acc) if c is None else jnp.sum(c.astype(acc))


def _gap_totals(declared: dict[str, RowSum], width: int, acc) -> dict:
    return {k: _total(s.weights, width, acc) for k, s in declared.items() if s.kind == "gap"}


def _block_terms(declared: dict[str, RowSum], z, m_blk, t=None, mt_blk=None) -> dict:
    """The elementwise terms of a block's row sums, relative to the block's maximum (and,
    with a teacher's block ``t``, the teacher's exponentials relative to its maximum)."""
    gap = m_blk[:, None] - z
    e = jnp.exp(-gap)
    terms = {"": e}
    if t is not None:
        # A row of the teacher masked to -inf has no finite maximum: its terms are 0.
        e_t = jnp.exp(t - jnp.where(mt_blk > -jnp.inf, mt_blk, 0)[:, None])
        terms[_TEACHER_EXP] = e_t
    for name, spec in declared.items():
        c = None if spec.weights is None else spec.weights[None, :]
        weighted = (lambda a: a) if c is None else (lambda a, c=c: a * c)
        r = spec.power
        e_r = e if r == 1 else jnp.exp(-r * gap)
        if spec.kind == "gap":
            terms[name] = weighted(gap)
        elif spec.kind == "exp":
            terms[name] = weighted(e_r)
        elif spec.kind == "exp_gap":
            terms[name] = weighted(e_r * (gap if r == 1 else r * gap))
            terms[_partner(name)] = weighted(e_r)
        elif spec.kind == "cross" and t is not None:
            # 0 * inf never forms: a class the teacher masks (t = -inf) adds 0, one the
            # student masks where the teacher does not adds +inf (the divergence is).
            zero = jnp.zeros((), z.dtype)
            terms[name] = weighted(jnp.where(e_t > 0, e_t * (t - z), zero))
        else:
            raise ValueError(f"unknown kind of row sum {spec.kind!r} for {name!r}")
    return terms


def _recentred(
    declared: dict[str, RowSum], sums: dict, m_old, m_new, totals: dict, teacher_scale=None
) -> dict:
    """Row sums relative to ``m_old`` made relative to ``m_new >= m_old``, exactly (only
    non-negative terms are added). Where ``m_old`` is ``-inf`` nothing was seen (every
    sum is 0) and 0 is kept, without forming ``inf * 0``. A cross sum is relative to the
    teacher's maximum: ``teacher_scale`` is ``exp`` of its move."""
    seen = m_old > -jnp.inf
    d = jnp.where(seen, m_new - m_old, jnp.zeros((), m_new.dtype))
    out = {}
    for name, spec in declared.items():
        r = spec.power
        scale = jnp.exp(r * (m_old - m_new))
        if spec.kind == "gap":
            out[name] = sums[name] + d * totals[name]
        elif spec.kind == "exp":
            out[name] = sums[name] * scale
        elif spec.kind == "cross":
            out[name] = sums[name] * teacher_scale
        else:
            e = sums[_partner(name)]
            out[name] = (sums[name] + (d if r == 1 else r * d) * e) * scale
            out[_partner(name)] = e * scale
    return out


def _merge(loss: FusedLoss, run: _Running, z, view: View, seen: dict) -> _Running:
    """Folds one logits block ``z [n, vb]`` into ``run``; ``seen``: each gap sum's total
    weight of the blocks already folded."""
    acc = z.dtype
    m_blk = _backend.reduce_rows(jnp.max, lambda z: z, (z,))
    declared = loss.row_sums(view.columns)
    t = view.teacher
    mt_blk = mt = old_t = new_t = st = None
    if t is not None:
        mt_blk = _backend.reduce_rows(jnp.max, lambda t: t, (t,))
    if not declared and t is None:
        # One reduction: in pieces for blocks wider than XLA:CPU's fast row length.
        s_blk = _backend.reduce_rows(jnp.sum, lambda z, m: jnp.exp(z - m), (z,), (m_blk,))
        sums_blk = {}
    else:
        # Every sum in one variadic reduction: the block is read once.
        sums_blk = row_sums(_block_terms(declared, z, m_blk, t, mt_blk))
        s_blk = sums_blk.pop("")
    if t is not None:
        mt = jnp.maximum(run.mt, mt_blk)
        old_t, new_t = _rescale(run.mt, mt), _rescale(mt_blk, mt)
        st = run.st * old_t + sums_blk.pop(_TEACHER_EXP) * new_t
    m = jnp.maximum(run.m, m_blk)
    s = run.s * jnp.exp(run.m - m) + s_blk * jnp.exp(m_blk - m)
    old = _recentred(declared, run.sums, run.m, m, seen, old_t)
    totals = _gap_totals(declared, z.shape[-1], acc)
    new = _recentred(declared, sums_blk, m_blk, m, totals, new_t)
    sums = {k: old[k] + new[k] for k in old}
    picks = {k: run.picks[k] + v for k, v in loss.picks(z, view).items()}
    return _Running(m, s, sums, picks, mt, st)


def _view(inp_rows, columns, start, width, groups, group_length, teacher=None) -> View:
    return View(inp_rows, columns, start, width, groups, group_length, teacher=teacher)


def _sweep(spec: Spec, plan: Plan, inp: Inputs, state, fold, seen: dict, const=None):
    """``state`` (a pytree of per-token ``[N, ...]`` numbers) folded over every block of the
    logits, vocabulary blocks outer: ``fold(sub, z, view, seen, real_blk, const_blk)``
    gives a token block's numbers from its previous ones ``sub``, the block's logits
    ``z`` and view (with the teacher's block), each gap sum's total weight ``seen`` over
    the vocabulary blocks already folded, the block's padding mask and the token block's
    share of ``const`` (per-token constants). Returns ``(state, seen)`` after the last."""
    loss = spec.loss
    n, v, ax = inp.x.shape[0], _columns(spec, inp), _vocab_axis(spec)
    tg, vg = plan.token_groups, plan.vocab_groups
    acc = _acc(inp)
    x, rows = B.group(inp.x, 0, tg), jax.tree.map(lambda a: B.group(a, 0, tg), inp.rows)
    w = B.group(inp.w, ax, vg)
    bias, real = (B.group(a, 0, vg) for a in (inp.bias, inp.real_columns))
    columns = jax.tree.map(lambda a: B.group(a, 0, vg), inp.columns)
    teacher = L.grouped_teacher(spec, plan, inp.teacher)
    const = jax.tree.map(lambda f: B.group(f, 0, tg), const)

    def vocab_step(v0, vb, carry):
        state, seen = carry
        w_blk = B.block(w, v0, vb, ax, vg)
        b_blk, c_blk = (B.block(a, v0, vb, 0, vg) for a in (bias, real))
        cols = jax.tree.map(lambda a: B.block(a, v0, vb, 0, vg), columns)
        t_cols = L.teacher_columns(spec, teacher, v0, vb, vg)

        def token_step(r0, nb, state):
            z, _ = L.block_logits(spec, plan, B.block(x, r0, nb, 0, tg), w_blk, b_blk, c_blk)
            t = L.teacher_logits(spec, plan, t_cols, r0, nb, tg, c_blk)
            sub, const_blk, rows_blk = (
                jax.tree.map(lambda f: B.block(f, r0, nb, 0, tg), a) for a in (state, const, rows)
            )
            view = _view(rows_blk, cols, v0, vb, vg, v // vg, t)
            sub = fold(sub, z, view, seen, c_blk, const_blk)
            return jax.tree.map(lambda a, f: B.put_block(a, f, r0, 0, tg), state, sub)

        state = B.for_blocks(n // tg, plan.token_block // tg, token_step, state)
        if seen:
            blk_totals = _gap_totals(loss.row_sums(cols), vg * vb, acc)
            seen = {k: seen[k] + blk_totals[k] for k in seen}
        return state, seen

    state = jax.tree.map(lambda f: B.group(f, 0, tg), state)
    state, seen = B.for_blocks(v // vg, plan.vocab_block // vg, vocab_step, (state, seen))
    return jax.tree.map(lambda f: B.ungroup(f, 0, tg), state), seen


def _statistics(spec: Spec, plan: Plan, inp: Inputs):
    """Per-token running statistics over every vocabulary block (streaming), and each
    gap's total weight."""
    loss, acc = spec.loss, _acc(inp)
    run = _init_running(loss, inp.x.shape[0], acc, inp.columns, inp.teacher is not None)
    seen = {k: jnp.zeros((), acc) for k in _gap_totals(loss.row_sums(inp.columns), 1, acc)}

    def fold(sub, z, view, seen, real_blk, const_blk):
        return _merge(loss, sub, z, view, seen)

    return _sweep(spec, plan, inp, run, fold, seen)


def _combine(spec: Spec, inp: Inputs, run: _Running, totals: dict):
    """The whole vocabulary's per-token numbers from every shard's (``spec.axis_name``).

    Every shard holds at least one real class, so every local maximum is finite."""
    if spec.axis_name is None:
        return run, totals
    m = lax.pmax(run.m, spec.axis_name)
    mt = t_scale = None
    if run.mt is not None:
        mt = lax.pmax(run.mt, spec.axis_name)
        t_scale = _rescale(run.mt, mt)
    declared = spec.loss.row_sums(inp.columns)
    sums = _recentred(declared, run.sums, run.m, m, totals, t_scale)
    st = None if run.st is None else run.st * t_scale
    s, sums, picks, totals, st = lax.psum(
        (run.s * jnp.exp(run.m - m), sums, run.picks, totals, st), spec.axis_name
    )
    return _Running(m, s, sums, picks, mt, st), totals


class Coefficients(NamedTuple):
    """Per-token coefficients of the backward pass: the softmax's row statistics (as
    ``lse = row_max + lse_rel``, so that ``exp((z - row_max) - lse_rel)`` is accurate for
    logits of any magnitude) and the loss's own, which scale with the cotangent."""

    row_max: jax.Array
    lse_rel: jax.Array
    loss: Any
    fixed: Any = None  # the loss's unscaled numbers (View.fixed)


def _final(run: _Running, totals: dict) -> RowSums:
    """The first pass's per-token numbers for ``finish`` (or a second pass)."""
    lse_rel = jnp.log(run.s)  # lse - m >= 0
    lse_t = None if run.st is None else jnp.log(run.st)
    return RowSums(run.m, lse_rel, run.sums, totals, run.picks, run.mt, lse_t)


def _finish(spec: Spec, inp: Inputs, sums: RowSums, rows):
    loss, coefs, *fixed = spec.loss.finish(sums, rows, _num_classes(spec, inp))
    return loss, Coefficients(sums.row_max, sums.lse_rel, coefs, fixed[0] if fixed else None)


# --------------------------------------------------------------------------------------------
# A second forward pass, with the first pass's statistics final
# --------------------------------------------------------------------------------------------


def _second_stats(loss: FusedLoss, sums: RowSums, rows):
    """``(stats, names)`` of the loss's second pass: the softmax's final statistics with
    ``SecondPass.fixed`` as ``fixed``, and the row sums' names; ``(None, ())`` without."""
    second = getattr(loss, "second_pass", lambda sums, rows: None)(sums, rows)
    if second is None:
        return None, ()
    return Coefficients(sums.row_max, sums.lse_rel, None, second.fixed), second.names


def _log_softmax(z, stats: Coefficients):
    """``log softmax(z)`` of a block from the row's final statistics (numerical rule 1)."""
    return (z - stats.row_max[:, None]) - stats.lse_rel[:, None]


def _second_sums(loss: FusedLoss, z, view: View, stats: Coefficients, real_blk) -> dict:
    """One block's share of the second pass's row sums (``[n]`` each)."""
    log_p = _log_softmax(z, stats)
    terms = loss.second_terms(jnp.exp(log_p), log_p, view._replace(fixed=stats.fixed))
    if real_blk is not None:
        zero = jnp.zeros((), z.dtype)
        terms = {k: jnp.where(real_blk[None, :], a, zero) for k, a in terms.items()}
    return row_sums(terms)


def _second_pass(spec: Spec, plan: Plan, inp: Inputs, sums: RowSums) -> RowSums:
    """``sums`` with the second pass's row sums (every block made again, streaming; summed
    over the shards of ``spec.axis_name``), or as they are for a loss without one."""
    stats, names = _second_stats(spec.loss, sums, inp.rows)
    if stats is None:
        return sums

    def fold(sub, z, view, seen, real_blk, stats_blk):
        add = _second_sums(spec.loss, z, view, stats_blk, real_blk)
        return {k: sub[k] + add[k] for k in sub}

    zeros = {k: jnp.zeros_like(sums.lse_rel) for k in names}
    second, _ = _sweep(spec, plan, inp, zeros, fold, {}, stats)
    if spec.axis_name is not None:
        second = lax.psum(second, spec.axis_name)
    return sums._replace(second=second)


def _forward(spec: Spec, plan: Plan, inp: Inputs):
    """Per-token losses [N] and gradient coefficients, streaming over the blocks."""
    run, totals = _statistics(spec, plan, inp)
    sums = _second_pass(spec, plan, inp, _final(*_combine(spec, inp, run, totals)))
    return _finish(spec, inp, sums, inp.rows)


# --------------------------------------------------------------------------------------------
# Gradients: one block's dloss/dlogits and its products
# --------------------------------------------------------------------------------------------


def _dlogits(spec: Spec, z, dcap, coefs: Coefficients, view: View, real_blk=None):
    log_p = _log_softmax(z, coefs)
    dz = spec.loss.dlogits(jnp.exp(log_p), log_p, coefs.loss, view._replace(fixed=coefs.fixed))
    dz = dz if dcap is None else dz * dcap
    if real_blk is not None:
        # A NaN token's coefficients (a label that is not a class) times p = 0 would make
        # the padding's gradient NaN: it is exactly 0 whatever the token.
        dz = jnp.where(real_blk[None, :], dz, jnp.zeros((), dz.dtype))
    return dz


def _row_scale(g: jax.Array, c: jax.Array) -> jax.Array:
    """The per-token cotangent ``g [n]`` shaped to scale a coefficient ``c [n, ...]``."""
    return g.reshape(g.shape + (1,) * (c.ndim - 1))


def _scaled(coefs: Coefficients, g) -> Coefficients:
    """Coefficients times each row's cotangent ``g`` (a tuple of them for a loss with
    several outputs, each scaling its own coefficients; a symbolic zero drops them)."""
    if not isinstance(g, tuple):
        return coefs._replace(loss=jax.tree.map(lambda c: c * _row_scale(g, c), coefs.loss))
    acc = coefs.lse_rel.dtype

    def times(part, gi):
        if isinstance(gi, SymbolicZero):
            return jax.tree.map(jnp.zeros_like, part)
        return jax.tree.map(lambda c: c * _row_scale(gi.astype(acc), c), part)

    scaled = tuple(times(part, gi) for part, gi in zip(coefs.loss, g, strict=True))
    return coefs._replace(loss=scaled)


class _Wanted(NamedTuple):
    """Which gradients to compute (static)."""

    x: bool
    w: bool
    bias: bool


def _block_grads(plan: Plan, inp: Inputs, dz, xt_blk, w_blk, wanted: _Wanted, ax: int):
    """``(dz @ w_blk.T, xt_blk @ dz)`` (those wanted), accumulated in ``dz``'s dtype; with
    ``w`` as ``[V, D]`` (``ax = 0``): ``(dz @ w_blk, dz.T @ x_blk)``, ``xt_blk`` then
    being the block of ``x`` itself.

    ``dz`` is rounded to the inputs' dtype for the products, as the unfused
    computation's gradient of bfloat16 logits would be.
    """
    cdt = compute_dtype(inp.x, inp.w, inp.bias)
    acc = dz.dtype
    dzc = dz.astype(cdt)
    dx = dw = None
    if wanted.x:
        dims = (((1,), (ax,)), ((), ()))
        dx = lax.dot_general(
            dzc, w_blk.astype(cdt), dims, precision=plan.precision, preferred_element_type=acc
        )
    if wanted.w and ax == 1:
        dw = jnp.matmul(
            xt_blk.astype(cdt), dzc, precision=plan.precision, preferred_element_type=acc
        )
    elif wanted.w:
        dims = (((0,), (0,)), ((), ()))
        dw = lax.dot_general(
            dzc, xt_blk.astype(cdt), dims, precision=plan.precision, preferred_element_type=acc
        )
    return dx, dw


def _add_products(
    plan: Plan, inp: Inputs, x, rows_blk, dz, w_blk, wanted: _Wanted, grads, write_dx, ax
):
    """``grads = (dx, dw, db)`` plus one block's products: ``dz @ w_blk.T`` written into
    ``dx``'s rows of the token block ``rows_blk = (start, length, groups)`` with
    ``write_dx`` (added, or put when the block's rows are final), ``x_blk.T @ dz`` added to
    ``dw`` and ``dz``'s column sums to ``db``."""
    dx, dw, db = grads
    start, length, groups = rows_blk
    xt_blk = None
    if wanted.w:
        if ax == 1:
            xt_blk = B.transposed_block(x, start, length, groups)
        else:
            xt_blk = B.block(x, start, length, 0, groups)
    dx_part, dw_part = _block_grads(plan, inp, dz, xt_blk, w_blk, wanted, ax)
    if wanted.x:
        dx = write_dx(dx, dx_part, start, 0, groups)
    if wanted.w:
        dw = dw + dw_part
    if wanted.bias:
        db = db + jnp.sum(dz, axis=0)
    return dx, dw, db


def _streaming_grads(spec: Spec, plan: Plan, inp: Inputs, coefs: Coefficients, wanted: _Wanted):
    """``(dx, dw, dbias)`` of ``sum_n loss_n * g_n`` (``g`` folded into ``coefs``)."""
    (n, d), v, ax = inp.x.shape, _columns(spec, inp), _vocab_axis(spec)
    tg, vg = plan.token_groups, plan.vocab_groups
    acc = coefs.lse_rel.dtype
    x, rows = B.group(inp.x, 0, tg), jax.tree.map(lambda a: B.group(a, 0, tg), inp.rows)
    coefs = jax.tree.map(lambda f: B.group(f, 0, tg), coefs)
    w = B.group(inp.w, ax, vg)
    bias, real = (B.group(a, 0, vg) for a in (inp.bias, inp.real_columns))
    columns = jax.tree.map(lambda a: B.group(a, 0, vg), inp.columns)
    teacher = L.grouped_teacher(spec, plan, inp.teacher)

    def vocab_step(v0, vb, carry):
        dx, dw, db = carry
        w_blk = B.block(w, v0, vb, ax, vg)
        b_blk, c_blk = (B.block(a, v0, vb, 0, vg) for a in (bias, real))
        cols = jax.tree.map(lambda a: B.block(a, v0, vb, 0, vg), columns)
        w_dx = L.real_weights(w_blk, c_blk, ax) if wanted.x else w_blk
        t_cols = L.teacher_columns(spec, teacher, v0, vb, vg)

        def token_step(r0, nb, inner):
            z, dcap = L.block_logits(spec, plan, B.block(x, r0, nb, 0, tg), w_blk, b_blk, c_blk)
            t = L.teacher_logits(spec, plan, t_cols, r0, nb, tg, c_blk)
            sub = jax.tree.map(lambda f: B.block(f, r0, nb, 0, tg), coefs)
            rows_blk = jax.tree.map(lambda a: B.block(a, r0, nb, 0, tg), rows)
            view = _view(rows_blk, cols, v0, vb, vg, v // vg, t)
            dz = _dlogits(spec, z, dcap, sub, view, c_blk)
            return _add_products(
                plan, inp, x, (r0, nb, tg), dz, w_dx, wanted, inner, B.add_block, ax
            )

        inner = (
            dx,
            jnp.zeros((d, vg * vb) if ax == 1 else (vg * vb, d), acc) if wanted.w else None,
            jnp.zeros((vg * vb,), acc) if wanted.bias else None,
        )
        dx, dw_blk, db_blk = B.for_blocks(n // tg, plan.token_block // tg, token_step, inner)
        if wanted.w:
            dw = B.put_block(dw, dw_blk.astype(dw.dtype), v0, ax, vg)
        if wanted.bias:
            db = B.put_block(db, db_blk.astype(db.dtype), v0, 0, vg)
        return dx, dw, db

    carry = (
        B.group(jnp.zeros((n, d), acc), 0, tg) if wanted.x else None,
        B.group(jnp.zeros(inp.w.shape, inp.w.dtype), ax, vg) if wanted.w else None,
        B.group(jnp.zeros(inp.bias.shape, inp.bias.dtype), 0, vg) if wanted.bias else None,
    )
    dx, dw, db = B.for_blocks(v // vg, plan.vocab_block // vg, vocab_step, carry)
    dx, dw, db = B.ungroup(dx, 0, tg), B.ungroup(dw, ax, vg), B.ungroup(db, 0, vg)
    return (None if dx is None else dx.astype(inp.x.dtype)), dw, db


def _single_pass(spec: Spec, plan: Plan, inp: Inputs, wanted: _Wanted):
    """Sum of the per-token losses and its gradients, one pass over token blocks.

    Every block spans the whole vocabulary, so its softmax is final as soon as its
    logits exist: ``dx`` rows are written per block, ``dw`` and ``dbias`` are summed
    over the blocks in the accumulation dtype. Returns them unscaled, in that dtype.
    """
    loss = spec.loss
    (n, d), v, ax = inp.x.shape, _columns(spec, inp), _vocab_axis(spec)
    tg = plan.token_groups
    acc = _acc(inp)
    x, rows = B.group(inp.x, 0, tg), jax.tree.map(lambda a: B.group(a, 0, tg), inp.rows)
    # With padding columns, dx's product needs w with its padding zeroed: a copy of w
    # (loop-invariant, made once), beside the [D, V] float32 accumulator of dw.
    w_dx = L.real_weights(inp.w, inp.real_columns, ax) if wanted.x else inp.w
    declared = loss.row_sums(inp.columns)
    no_weight = {k: jnp.zeros((), acc) for k in _gap_totals(declared, v, acc)}
    teacher = L.grouped_teacher(spec, plan, inp.teacher)  # the whole vocabulary in one block

    def token_step(r0, nb, carry):
        total, dx, dw, db = carry
        x_blk = B.block(x, r0, nb, 0, tg)
        rows_blk = jax.tree.map(lambda a: B.block(a, r0, nb, 0, tg), rows)
        z, dcap = L.block_logits(spec, plan, x_blk, inp.w, inp.bias, inp.real_columns)
        t = L.teacher_logits(spec, plan, teacher, r0, nb, tg, inp.real_columns)
        view = View(rows_blk, inp.columns, 0, v, 1, v, teacher=t)
        fresh = _init_running(loss, tg * nb, acc, inp.columns, t is not None)
        run = _merge(loss, fresh, z, view, no_weight)
        sums = _final(run, _gap_totals(declared, v, acc))
        # A second pass reads the same blocks: the whole vocabulary is here already.
        stats, _ = _second_stats(loss, sums, rows_blk)
        if stats is not None:
            second = _second_sums(loss, z, view, stats, inp.real_columns)
            sums = sums._replace(second=second)
        loss_blk, coefs = _finish(spec, inp, sums, rows_blk)
        # The block's maximum behind a barrier: otherwise XLA:CPU shares z - max between
        # the sum of exponentials above and the softmax below, and materialises it.
        coefs = coefs._replace(row_max=_backend.cpu_barrier(coefs.row_max))
        dz = _dlogits(spec, z, dcap, coefs, view, inp.real_columns)
        grads = _add_products(
            plan, inp, x, (r0, nb, tg), dz, w_dx, wanted, (dx, dw, db), B.put_block, ax
        )
        return total + jnp.sum(loss_blk), *grads

    carry = (
        jnp.zeros((), acc),
        B.group(jnp.zeros((n, d), acc), 0, tg) if wanted.x else None,
        jnp.zeros(inp.w.shape, acc) if wanted.w else None,
        jnp.zeros((v,), acc) if wanted.bias else None,
    )
    total, dx, dw, db = B.for_blocks(n // tg, plan.token_block // tg, token_step, carry)
    return total, B.ungroup(dx, 0, tg), dw, db


# --------------------------------------------------------------------------------------------
# custom_vjp wrappers
# --------------------------------------------------------------------------------------------


def _on_platform(spec: Spec, fn):
    """``fn(plan)`` with the lowering platform's plan."""
    return _backend.per_platform(fn, dict(spec.plans))


def _unwrap(args):
    """``(values, perturbed flags)`` of the ``CustomVJPPrimal`` arguments of a fwd rule."""
    is_primal = lambda a: isinstance(a, CustomVJPPrimal)  # noqa: E731
    values = jax.tree.map(lambda a: a.value, args, is_leaf=is_primal)
    perturbed = jax.tree.map(lambda a: a.perturbed, args, is_leaf=is_primal)
    return values, perturbed


def _wanted(inp: Inputs, perturbed) -> _Wanted:
    px, pw, pb = perturbed[:3]
    return _Wanted(bool(px), bool(pw), inp.bias is not None and bool(pb))


def _zero_cotangents(inp: Inputs):
    return (
        jnp.zeros_like(inp.x),
        jnp.zeros_like(inp.w),
        None if inp.bias is None else jnp.zeros_like(inp.bias),
    )


def _fill(inp: Inputs, grads):
    """Zeros of the right type for the gradients that were not wanted; the others summed
    over the mesh axes their primals do not vary over (``dx`` over the vocabulary shards,
    ``dw`` over the data shards)."""
    primals = (inp.x, inp.w, inp.bias)
    return tuple(
        z if gr is None else sum_to_type(gr, p)
        for gr, z, p in zip(grads, _zero_cotangents(inp), primals, strict=True)
    )


_NO_GRADS = (None, None, None, None)  # rows, columns, real_columns, teacher: constants


def _is_zero(a) -> bool:
    return isinstance(a, SymbolicZero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(spec, x, w, bias, rows, columns, real_columns, teacher):
    inp = Inputs(x, w, bias, rows, columns, real_columns, teacher)
    return _on_platform(spec, lambda plan: _forward(spec, plan, inp)[0])


def _per_token_fwd(spec, *args):
    values, perturbed = _unwrap(args)
    inp = Inputs(*values)
    loss, coefs = _on_platform(spec, lambda plan: _forward(spec, plan, inp))
    return loss, (inp, coefs, _wanted(inp, perturbed))


def _per_token_bwd(spec, res, g):
    inp, coefs, wanted = res
    if all(isinstance(gi, SymbolicZero) for gi in jax.tree.leaves(g, is_leaf=_is_zero)):
        return (*_zero_cotangents(inp), *_NO_GRADS)
    scaled = _scaled(coefs, g if isinstance(g, tuple) else g.astype(coefs.lse_rel.dtype))
    grads = _on_platform(spec, lambda plan: _streaming_grads(spec, plan, inp, scaled, wanted))
    return (*_fill(inp, grads), *_NO_GRADS)


_per_token.defvjp(_per_token_fwd, _per_token_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _summed(spec, x, w, bias, rows, columns, real_columns, teacher):
    inp = Inputs(x, w, bias, rows, columns, real_columns, teacher)
    return jnp.sum(_on_platform(spec, lambda plan: _forward(spec, plan, inp)[0]))


def _summed_fwd(spec, *args):
    values, perturbed = _unwrap(args)
    inp = Inputs(*values)
    wanted = _wanted(inp, perturbed)
    total, dx, dw, db = _on_platform(spec, lambda plan: _single_pass(spec, plan, inp, wanted))
    return total, (inp, dx, dw, db)


def _summed_bwd(spec, res, g):
    inp, dx, dw, db = res
    if isinstance(g, SymbolicZero):
        return (*_zero_cotangents(inp), *_NO_GRADS)
    grads = tuple(
        None if gr is None else (g.astype(gr.dtype) * gr).astype(like.dtype)
        for gr, like in zip((dx, dw, db), (inp.x, inp.w, inp.bias), strict=True)
    )
    return (*_fill(inp, grads), *_NO_GRADS)


_summed.defvjp(_summed_fwd, _summed_bwd, symbolic_zeros=True)


def per_token_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """Per-token losses ``[N]`` of ``x [N, D] @ w [D, V] (+ bias [V])``, streaming schedule.

    ``rows``/``columns``: the loss's per-token / per-column inputs (pytrees of ``[N]`` /
    ``[V]`` arrays, constants); ``real_columns``: bool ``[V]``, False on padding columns
    (with ``spec.num_classes``), or None; ``teacher``: ``(x_t [N, D_t], w_t, bias_t)``
    (``w_t`` in ``w``'s layout, ``bias_t`` or None), a second logits stream, or None.
    Differentiable in ``x``, ``w`` and ``bias`` (the teacher is a constant).
    """
    return _per_token(spec, x, w, bias, rows, columns, real_columns, teacher)


def summed_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """``sum_n loss_n`` with the single-pass schedule (every plan's ``vocab_block >= V``;
    one device's whole vocabulary)."""
    return _summed(spec, x, w, bias, rows, columns, real_columns, teacher)
