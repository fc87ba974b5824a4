"""The ``"pallas_tpu"`` implementation: the fused cross-entropy as Pallas Mosaic-TPU
kernels, every option of the ``"xla"`` one (issue 25).

Three kernels, each over a grid of ``[token_block, vocab_block]`` blocks of the logits.
A block is made in VMEM from a block of ``x`` (all of ``D``) and one of ``w`` (either
layout, read in place), with the bias, soft cap, temperature and padding columns as
the engine's (:mod:`jxent._fused.logits`: a padding column, or one past ``V`` in a
last, shorter block, is *selected* to ``PADDING_LOGIT`` before anything reads it):

* **forward** (tokens parallel, vocabulary inner): the online log-sum-exp ``(m, s)``,
  the loss's gap sum (label smoothing over the class weights, re-centred exactly when
  ``m`` moves: numerical rule 2) and its picks (the label's logit and class weight,
  read by comparing the column index with the label: no gather) in VMEM scratch, the
  per-token numbers out at the last vocabulary block. The loss's own ``finish`` (the
  contract, :mod:`jxent._fused.online`) turns them into the loss and the coefficients
  of its gradient.
* **dx** (tokens parallel, vocabulary inner): each block's logits again, ``dloss/dz``
  (the cross-entropy's ``dlogits``: ``scale p - smooth c - label [k = y]``, times the
  soft cap's derivative), ``dz @ w_blk^T`` into a float32 VMEM accumulator.
* **dw, dbias** (vocabulary parallel, tokens inner: tokamax's order for ``dw``): the
  same ``dz``, ``x_blk^T @ dz`` and ``dz``'s column sums into float32 VMEM accumulators
  of one block of ``w``'s columns.

Five products of the size of ``x @ w`` (the ``"xla"`` streaming schedule: four), no
``[N, V]`` array and no HBM temporary but per-token numbers; ``dz`` is rounded to the
inputs' dtype for the products and the gradients come back in the inputs' dtypes, as
``"xla"``'s. Only the wanted kernels run. The single pass (``summed_loss``) is the sum
of the per-token losses: the same kernels.

**Where it runs.** Lowered for a TPU (``lax.platform_dependent``), Mosaic, with blocks
sized for its VMEM (:func:`tpu_blocks`); on any other platform, and for float64 inputs
(Mosaic has none), Pallas' interpreter runs the same kernels as XLA loops with the
platform plan's blocks (the caller's ``chunk_size``): that is how the tests run them on
CPU. ``"auto"`` does not take it yet (it has not been timed on a TPU, and it runs five
products to ``"xla"``'s four: see :mod:`jxent._fused.engine`); asked for by name it
runs anywhere. It runs the cross-entropy on one device's whole
vocabulary without gradient filtering (:func:`supports`): other losses, a vocabulary
split and ``filter_eps`` take ``"xla"``.

Internal API: :func:`supports`, :func:`per_token_loss`,
:func:`summed_loss`, :func:`tpu_blocks`, :data:`VMEM_LIMIT`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jxent._fused import online
from jxent._fused.contract import Inputs, Spec, accumulation, class_count, num_columns
from jxent._fused.logits import PADDING_LOGIT, compute_dtype
from jxent._fused.plan import Plan
from jxent._rules import sum_to_type

MiB = 2**20
#: The losses the kernels run: the fused cross-entropy (``jxent._fused.xent``, which
#: imports the engine above this module: named, not imported).
KERNEL_LOSSES = ("jxent._fused.xent.CrossEntropy",)
#: VMEM the blocks may take (inputs double-buffered, accumulators, the logits block's
#: temporaries) and the scoped limit the kernels ask for: TPU v5e and v6e have 128 MiB.
VMEM_BUDGET = 40 * MiB
VMEM_LIMIT = 64 * MiB
#: The largest blocks: 512 tokens x 512 columns (a bfloat16 product of 512 flops per
#: byte of ``w`` read, above v5e's and v6e's ratio of compute to HBM bandwidth).
MAX_TOKEN_BLOCK = 512
MAX_VOCAB_BLOCK = 512


def supports(spec: Spec) -> bool:
    """Whether the kernels run the call: the cross-entropy on one device's vocabulary,
    without gradient filtering (``Spec.filter_eps``: every block's products run here)."""
    loss = type(spec.loss)
    name = f"{loss.__module__}.{loss.__qualname__}"
    return name in KERNEL_LOSSES and spec.axis_name is None and spec.filter_eps is None


class Kernel(NamedTuple):
    """The static choices of the kernels of one call."""

    n: int
    d: int
    v: int
    tb: int  # token block
    vb: int  # vocabulary block
    w_axis: int  # w's vocabulary axis: 1 ([D, V]), 0 ([V, D])
    acc: Any  # accumulation dtype
    cdt: Any  # the products' operand dtype
    precision: Any
    soft_cap: float | None
    inv_temperature: float | None
    bias: bool
    weights: bool  # the loss's per-column input (class weights) is given
    padded: bool  # padding columns (real_columns)
    smoothing: bool  # the loss keeps a gap sum
    interpret: bool

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.n // self.tb), -(-self.v // self.vb)


def tpu_blocks(n: int, d: int, v: int, itemsize: int) -> tuple[int, int]:
    """``(token_block, vocab_block)`` for Mosaic: multiples of 16 tokens and 128 columns
    (or the whole axis), dividing the axis where a block of at least half the largest
    does, within :data:`VMEM_BUDGET`."""

    def vmem(tb, vb):
        # x and w blocks double-buffered, the larger float32 accumulator, and the
        # logits block with the handful of [tb, vb] temporaries of its arithmetic.
        return 2 * (tb + vb) * d * itemsize + max(tb, vb) * d * 4 + 8 * tb * vb * 4

    tb, vb = MAX_TOKEN_BLOCK, MAX_VOCAB_BLOCK
    while vmem(tb, vb) > VMEM_BUDGET and max(tb, vb) > 128:
        tb, vb = (tb // 2, vb) if tb >= vb else (tb, vb // 2)
    return _divisor_block(n, tb, 16), _divisor_block(v, vb, 128)


def _divisor_block(total: int, cap: int, align: int) -> int:
    if total <= cap:
        return total
    for size in range(cap, cap // 2 - 1, -align):
        if total % size == 0:
            return size
    return cap


def _kernel(spec: Spec, plan: Plan, inp: Inputs, mosaic: bool) -> Kernel:
    n, d = inp.x.shape
    v = num_columns(spec, inp)
    acc = accumulation(inp)
    cdt = compute_dtype(inp.x, inp.w, inp.bias)
    if plan.bfloat16_blocks and cdt == jnp.float32:
        cdt = jnp.bfloat16  # one bfloat16 pass, as the XLA:TPU plan's products
    if mosaic:
        tb, vb = tpu_blocks(n, d, v, jnp.dtype(cdt).itemsize)
    else:
        tb, vb = min(plan.token_block, n), min(plan.vocab_block, v)
    temp = spec.temperature
    return Kernel(
        n,
        d,
        v,
        max(tb, 1),
        max(vb, 1),
        1 if spec.w_layout == "dv" else 0,
        jnp.dtype(acc),
        jnp.dtype(cdt),
        plan.precision,
        spec.soft_cap,
        None if temp is None or temp == 1 else 1 / temp,
        inp.bias is not None,
        inp.columns is not None,
        inp.real_columns is not None,
        bool(spec.loss.row_sums(inp.columns)),
        not mosaic,
    )


# --------------------------------------------------------------------------------------------
# Inside the kernels: one block's logits and dloss/dz
# --------------------------------------------------------------------------------------------


def _product(k: Kernel, a, b, contract: tuple[int, int]):
    a, b = a.astype(k.cdt), b.astype(k.cdt)
    dims = (((contract[0],), (contract[1],)), ((), ()))
    # A precision is the float32 products' (Mosaic rejects one for bfloat16 operands).
    precision = k.precision if k.cdt == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=k.acc)


def _columns(k: Kernel, j, axis: int = 1):
    """The vocabulary indices of block ``j`` (shape ``(1, vb)``, or ``(vb, 1)`` on axis 0)."""
    shape = (1, k.vb) if axis == 1 else (k.vb, 1)
    return j * k.vb + lax.broadcasted_iota(jnp.int32, shape, axis)


def _real(k: Kernel, r: dict, col, name: str = "real"):
    """Where the block's columns are classes (None: all of them): inside ``V`` and not
    padding columns."""
    real = col < k.v if k.v % k.vb else None
    if k.padded:
        flag = r[name][...] != 0
        real = flag if real is None else real & flag
    return real


def _rows(k: Kernel, i):
    """Where the block's tokens are inside ``N`` (None: all of them)."""
    if k.n % k.tb == 0:
        return None
    return i * k.tb + lax.broadcasted_iota(jnp.int32, (k.tb, 1), 0) < k.n


def _logits(k: Kernel, r: dict, j):
    """``(z, dcap, col, real)`` of the block: the logits in the accumulation dtype (the
    padding selected to ``PADDING_LOGIT``), the soft cap's and temperature's derivative
    (None: 1), the column indices and where they are classes."""
    z = _product(k, r["x"][...], r["w"][...], (1, 1 - k.w_axis))
    if k.bias:
        z = z + r["bias"][...].astype(k.acc)
    dcap = None
    if k.soft_cap is not None:
        t = jnp.tanh(z / k.soft_cap)
        z, dcap = k.soft_cap * t, 1 - t * t
    if k.inv_temperature is not None:
        inv = jnp.asarray(k.inv_temperature, k.acc)
        z = z * inv
        dcap = inv if dcap is None else dcap * inv
    col = _columns(k, j)
    real = _real(k, r, col)
    if real is not None:
        z = jnp.where(real, z, jnp.asarray(PADDING_LOGIT * jnp.finfo(k.acc).max, k.acc))
    return z, dcap, col, real


def _weights(k: Kernel, r: dict, real):
    """The block's class weights ``(1, vb)`` (0 past ``V``), or None."""
    if not k.weights:
        return None
    c = r["cols"][...].astype(k.acc)
    return c if real is None else jnp.where(real, c, jnp.zeros((), k.acc))


def _dlogits(k: Kernel, r: dict, i, j):
    """``(dz, real)``: the block's ``dloss/dz`` (0 on padding columns and past ``N``)."""
    z, dcap, col, real = _logits(k, r, j)
    log_p = (z - r["row_max"][...]) - r["lse_rel"][...]
    dz = r["scale"][...] * jnp.exp(log_p)
    if k.smoothing:
        c = _weights(k, r, real)
        dz = dz - r["smooth"][...] * (jnp.ones((1, k.vb), k.acc) if c is None else c)
    zero = jnp.zeros((), k.acc)
    dz = dz - jnp.where(col == r["labels"][...], r["label"][...], zero)
    if dcap is not None:
        dz = dz * dcap
    rows = _rows(k, i)
    keep = real if rows is None else (rows if real is None else rows & real)
    if keep is not None:
        dz = jnp.where(keep, dz, zero)
    return dz, real


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------


def _forward_kernel(k: Kernel, names, *refs):
    r = dict(zip(names, refs, strict=True))
    j, last = pl.program_id(1), k.grid[1] - 1
    acc, zero = k.acc, jnp.zeros((), k.acc)

    @pl.when(j == 0)
    def _():
        r["m_sc"][...] = jnp.full((k.tb, 1), -jnp.inf, acc)
        for name in ("s_sc", "g_sc", "zl_sc", "wl_sc", "seen_sc"):
            if name in r:
                r[name][...] = jnp.zeros(r[name].shape, acc)

    z, _, col, real = _logits(k, r, j)
    m_blk = jnp.max(z, axis=1, keepdims=True)
    s_blk = jnp.sum(jnp.exp(z - m_blk), axis=1, keepdims=True)
    m_old = r["m_sc"][...]
    m = jnp.maximum(m_old, m_blk)
    r["s_sc"][...] = r["s_sc"][...] * jnp.exp(m_old - m) + s_blk * jnp.exp(m_blk - m)
    r["m_sc"][...] = m
    c = _weights(k, r, real)
    if k.smoothing:
        # G = sum_k c_k (m - z_k), re-centred exactly when m moves (only non-negative
        # terms are added): the columns seen so far weigh `seen` in all.
        cs = jnp.ones((1, k.vb), acc) if c is None else c
        if c is None and real is not None:
            cs = jnp.where(real, cs, zero)
        g_blk = jnp.sum(cs * (m_blk - z), axis=1, keepdims=True)
        total = jnp.sum(cs, axis=1, keepdims=True)
        seen = r["seen_sc"][...]
        moved = jnp.where(m_old > -jnp.inf, m - m_old, zero)
        r["g_sc"][...] = r["g_sc"][...] + moved * seen + g_blk + (m - m_blk) * total
        r["seen_sc"][...] = seen + total
    hit = col == r["labels"][...]
    r["zl_sc"][...] += jnp.sum(jnp.where(hit, z, zero), axis=1, keepdims=True)
    if c is not None:
        r["wl_sc"][...] += jnp.sum(jnp.where(hit, c, zero), axis=1, keepdims=True)

    @pl.when(j == last)
    def _():
        for name in ("m", "s", "g", "zl", "wl"):
            if name + "_out" in r:
                r[name + "_out"][...] = r[name + "_sc"][...]


def _dx_kernel(k: Kernel, names, *refs):
    r = dict(zip(names, refs, strict=True))
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _():
        r["dx_sc"][...] = jnp.zeros(r["dx_sc"].shape, k.acc)

    dz, real = _dlogits(k, r, i, j)
    w = r["w"][...]
    if real is not None:
        # dz is 0 there, but 0 * inf and 0 * NaN are NaN: w's padding is selected away.
        if k.w_axis == 0:
            real = _real(k, r, _columns(k, j, axis=0), "real_t")
        w = jnp.where(real, w, jnp.zeros((), w.dtype))
    r["dx_sc"][...] += _product(k, dz, w, (1, k.w_axis))

    @pl.when(j == k.grid[1] - 1)
    def _():
        r["dx_out"][...] = r["dx_sc"][...].astype(r["dx_out"].dtype)


def _dw_kernel(k: Kernel, names, *refs):
    r = dict(zip(names, refs, strict=True))
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        for name in ("dw_sc", "db_sc"):
            if name in r:
                r[name][...] = jnp.zeros(r[name].shape, k.acc)

    dz, _ = _dlogits(k, r, i, j)
    if "dw_sc" in r:
        x = r["x"][...]
        rows = _rows(k, i)
        if rows is not None:
            x = jnp.where(rows, x, jnp.zeros((), x.dtype))
        if k.w_axis == 1:
            r["dw_sc"][...] += _product(k, x, dz, (0, 0))
        else:
            r["dw_sc"][...] += _product(k, dz, x, (0, 0))
    if "db_sc" in r:
        r["db_sc"][...] += jnp.sum(dz, axis=0, keepdims=True)

    @pl.when(i == k.grid[0] - 1)
    def _():
        for name in ("dw", "db"):
            if name + "_out" in r:
                r[name + "_out"][...] = r[name + "_sc"][...].astype(r[name + "_out"].dtype)


# --------------------------------------------------------------------------------------------
# The calls: operands, block specs, outputs
# --------------------------------------------------------------------------------------------


def _operands(k: Kernel, inp: Inputs, per_token: dict, transposed_mask: bool) -> dict:
    """The operands: ``x``, ``w``, the per-column inputs as ``(1, V)`` rows, the labels
    and ``per_token`` numbers as ``(N, 1)`` columns."""
    tb, vb, d = k.tb, k.vb, k.d
    by_token = lambda i, j: (i, 0)  # noqa: E731
    by_column = lambda i, j: (0, j)  # noqa: E731
    w_block = ((d, vb), by_column) if k.w_axis == 1 else ((vb, d), lambda i, j: (j, 0))
    ops = {
        "labels": (inp.rows.labels.astype(jnp.int32).reshape(-1, 1), (tb, 1), by_token),
        "x": (inp.x, (tb, d), by_token),
        "w": (inp.w, *w_block),
    }
    if k.bias:
        ops["bias"] = (inp.bias.reshape(1, -1), (1, vb), by_column)
    if k.weights:
        ops["cols"] = (inp.columns.reshape(1, -1), (1, vb), by_column)
    if k.padded:
        real = inp.real_columns.astype(jnp.int32)
        ops["real"] = (real.reshape(1, -1), (1, vb), by_column)
        if transposed_mask and k.w_axis == 0:
            ops["real_t"] = (real.reshape(-1, 1), (vb, 1), lambda i, j: (j, 0))
    for name, a in per_token.items():
        ops[name] = (a.astype(k.acc).reshape(-1, 1), (tb, 1), by_token)
    return ops


def _call(k: Kernel, body, ops: dict, outs: dict, scratch: dict, vocab_outer: bool, flops):
    """``body`` over the grid (vocabulary blocks outer with ``vocab_outer``): ``outs`` and
    ``scratch`` as ``{name: (shape or array shape, block, index map)}`` / ``{name: shape}``."""
    nt, nv = k.grid
    grid = (nv, nt) if vocab_outer else (nt, nv)

    def spec(block, index):
        order = (lambda j, i: index(i, j)) if vocab_outer else index
        return pl.BlockSpec(block, order)

    names = (*ops, *(n + "_out" for n in outs), *scratch)
    kernel = functools.partial(body, k, names)
    out_shape = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _, _ in outs.values()]
    bytes_in = sum(a.size * a.dtype.itemsize for a, _, _ in ops.values())
    call = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[spec(block, index) for _, block, index in ops.values()],
        out_specs=[spec(block, index) for _, _, block, index in outs.values()],
        scratch_shapes=[pltpu.VMEM(shape, k.acc) for shape in scratch.values()],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT
        ),
        cost_estimate=_cost(k, flops, bytes_in),
        interpret=k.interpret,
        name=body.__name__.strip("_"),
    )
    return dict(zip(outs, call(*(a for a, _, _ in ops.values())), strict=True))


def _cost(k: Kernel, flops, bytes_in) -> pl.CostEstimate | None:
    """XLA's estimate of a kernel's cost (None for a symbolic number of tokens)."""
    if not isinstance(k.n, int):
        return None
    return pl.CostEstimate(
        flops=int(flops), transcendentals=int(k.n * k.v), bytes_accessed=int(bytes_in)
    )


def _statistics(k: Kernel, inp: Inputs) -> dict:
    """The forward kernel's per-token numbers ``[N]``: ``m``, ``s``, the gap sum ``g``,
    the label's logit ``zl`` and class weight ``wl`` (those the loss keeps)."""
    ops = _operands(k, inp, {}, False)
    names = ["m", "s", "zl"] + (["g"] if k.smoothing else []) + (["wl"] if k.weights else [])
    token = ((k.n, 1), k.acc, (k.tb, 1), lambda i, j: (i, 0))
    outs = {name: token for name in names}
    scratch = {name + "_sc": (k.tb, 1) for name in names}
    if k.smoothing:
        scratch["seen_sc"] = (1, 1)
    out = _call(k, _forward_kernel, ops, outs, scratch, False, 2 * k.n * k.d * k.v)
    return {name: a.reshape(-1) for name, a in out.items()}


def _forward(spec: Spec, plan: Plan, mosaic: bool, inp: Inputs):
    """Per-token losses ``[N]`` and their coefficients (``online.Coefficients``)."""
    k = _kernel(spec, plan, inp, mosaic)
    stats = _statistics(k, inp)
    declared = spec.loss.row_sums(inp.columns)
    sums = {name: stats["g"] for name in declared}
    picks = {"z_label": stats["zl"]}
    if k.weights:
        picks["w_label"] = stats["wl"]
    run = online.Running(stats["m"], stats["s"], sums, picks)
    totals = online.gap_totals(declared, k.v, k.acc)
    sums = online.final(run, totals)
    loss, coefs, *_ = spec.loss.finish(sums, inp.rows, class_count(spec, inp))
    return loss, online.Coefficients(sums.row_max, sums.lse_rel, coefs, None)


def _per_token_coefficients(spec: Spec, coefs: online.Coefficients) -> dict:
    """The numbers the cross-entropy's ``dlogits`` reads, by the kernels' names."""
    c = coefs.loss
    if spec.loss.with_lse:
        (scale, label, smooth), lse = c
        scale = scale + lse
    else:
        scale, label, smooth = c
    out = {"row_max": coefs.row_max, "lse_rel": coefs.lse_rel, "scale": scale, "label": label}
    if smooth is not None:
        out["smooth"] = smooth
    return out


def _backward(spec: Spec, plan: Plan, mosaic: bool, inp: Inputs, coefs, wanted):
    """``(dx, dw, dbias)`` (those wanted, else None) of ``sum_n loss_n g_n``."""
    k = _kernel(spec, plan, inp, mosaic)
    per_token = _per_token_coefficients(spec, coefs)
    dx = dw = db = None
    products = 4 * k.n * k.d * k.v
    if wanted.x:
        ops = _operands(k, inp, per_token, True)
        outs = {"dx": (inp.x.shape, inp.x.dtype, (k.tb, k.d), lambda i, j: (i, 0))}
        dx = _call(k, _dx_kernel, ops, outs, {"dx_sc": (k.tb, k.d)}, False, products)["dx"]
    if wanted.w or wanted.bias:
        ops = _operands(k, inp, per_token, False)
        outs, scratch = {}, {}
        if wanted.w:
            block = (k.d, k.vb) if k.w_axis == 1 else (k.vb, k.d)
            index = (lambda i, j: (0, j)) if k.w_axis == 1 else (lambda i, j: (j, 0))
            outs["dw"] = (inp.w.shape, inp.w.dtype, block, index)
            scratch["dw_sc"] = block
        if wanted.bias:
            outs["db"] = ((1, k.v), inp.bias.dtype, (1, k.vb), lambda i, j: (0, j))
            scratch["db_sc"] = (1, k.vb)
        out = _call(k, _dw_kernel, ops, outs, scratch, True, products)
        dw, db = out.get("dw"), out.get("db")
        db = None if db is None else db.reshape(-1)
    return dx, dw, db


def _on_platform(spec: Spec, fn, *args):
    """``fn(plan, mosaic, *args)``: Mosaic where lowered for a TPU (float32 accumulation),
    Pallas' interpreter elsewhere, each with its platform's plan."""
    plans = dict(spec.plans)
    mosaic = accumulation(args[0]) == jnp.float32
    return lax.platform_dependent(
        *args,
        tpu=functools.partial(fn, spec, plans["tpu"], mosaic),
        cpu=functools.partial(fn, spec, plans["cpu"], False),
        default=functools.partial(fn, spec, plans["default"], False),
    )


# --------------------------------------------------------------------------------------------
# The custom_vjp rule (as jxent._fused.rules')
# --------------------------------------------------------------------------------------------

_NO_GRADS = (None, None, None, None)  # rows, columns, real_columns, teacher: constants


def _zeros(inp: Inputs):
    bias = None if inp.bias is None else jnp.zeros_like(inp.bias)
    return jnp.zeros_like(inp.x), jnp.zeros_like(inp.w), bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(spec, x, w, bias, rows, columns, real_columns, teacher):
    inp = Inputs(x, w, bias, rows, columns, real_columns, teacher)
    return _on_platform(spec, lambda s, p, m, a: _forward(s, p, m, a)[0], inp)


def _per_token_fwd(spec, *args):
    is_primal = lambda a: isinstance(a, CustomVJPPrimal)  # noqa: E731
    values = jax.tree.map(lambda a: a.value, args, is_leaf=is_primal)
    px, pw, pb = jax.tree.map(lambda a: a.perturbed, args[:3], is_leaf=is_primal)
    inp = Inputs(*values)
    loss, coefs = _on_platform(spec, _forward, inp)
    return loss, (inp, coefs, online.Wanted(bool(px), bool(pw), inp.bias is not None and bool(pb)))


def _per_token_bwd(spec, res, g):
    inp, coefs, wanted = res
    is_zero = lambda a: isinstance(a, SymbolicZero)  # noqa: E731
    if all(is_zero(gi) for gi in jax.tree.leaves(g, is_leaf=is_zero)):
        return (*_zeros(inp), *_NO_GRADS)
    scaled = online.scaled(coefs, g if isinstance(g, tuple) else g.astype(coefs.lse_rel.dtype))
    grads = _on_platform(spec, lambda s, p, m, a, c: _backward(s, p, m, a, c, wanted), inp, scaled)
    filled = tuple(
        z if gr is None else sum_to_type(gr, p)
        for gr, z, p in zip(grads, _zeros(inp), (inp.x, inp.w, inp.bias), strict=True)
    )
    return (*filled, *_NO_GRADS)


_per_token.defvjp(_per_token_fwd, _per_token_bwd, symbolic_zeros=True)


def per_token_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """Per-token losses ``[N]`` (as :func:`jxent._fused.engine.per_token_loss`)."""
    return _per_token(spec, x, w, bias, rows, columns, real_columns, teacher)


def summed_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """``sum_n loss_n``: the per-token kernels, summed (the single pass has no kernel of
    its own)."""
    loss = per_token_loss(spec, x, w, bias, rows, columns, real_columns, teacher)
    return jnp.sum(loss)
