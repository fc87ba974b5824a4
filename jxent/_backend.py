"""Every backend-specific choice of jxent, in one module: the register of workarounds.

jxent's numerics are the same on every platform; what differs is how XLA compiles
them. Each choice below is resolved **per lowering platform** with
``lax.platform_dependent`` (never with ``jax.default_backend()`` at trace time), so a
program lowered, compiled ahead of time or exported for several platforms from one
host carries the right form for each. The accelerator branches take the plain,
fusible form; the ``cpu`` branches hold what XLA:CPU needs.

Every entry names the jax version and the measurement that justified it, so that it
can be removed when XLA changes. Measurements are on XLA:CPU, jax 0.10, 2 cores,
unless said otherwise; the benchmark commands are those of ``benchmarks/``.

============================  ==========================================================
entry                         what it works around
============================  ==========================================================
``reduce_rows``               XLA:CPU's fused row reductions slow down 2-7x past 32768
                              float32 columns: long rows are reduced in pieces.
``slice_block``               XLA:CPU slices a bfloat16 array in float32, converting the
                              whole (loop-invariant) array: the slice runs in a branch.
``put_block``                 XLA:CPU writes a bfloat16 update by converting the whole
                              destination to float32 and back: written as integer bits.
``transposed_block``          XLA:CPU multiplies bfloat16 in bfloat16 only for a
                              row-major left operand: the transpose is materialised.
``gather_bits``               XLA:CPU upcasts a bfloat16 gather operand to float32 (a copy
                              of the whole logits): the gather reads integer bits.
``index_bits``                the same for one row or column at a traced index (gradient
                              filtering's targets: a copy of the whole of ``x``).
``cpu_barrier``               XLA:CPU materialises an expression (a broadcast constant, a
                              converted copy, ``z - max``) that CSE shares between two
                              fused passes: a barrier keeps the passes apart.
``panel_bytes``               the size of each float32 panel of the fused losses' blocks:
                              small on CPU, larger on accelerators.
``SINGLE_PASS_BLOCK_BYTES``   XLA:TPU and XLA:GPU materialise the single pass's logits
                              block (and its ``dz``) beside the ``[D, V]`` accumulator:
                              smaller token blocks there.
``GROUPED_BLOCKS``            XLA:TPU relayouts the whole of ``w`` for grouped blocks.
``VOCAB_ALIGN``               XLA:TPU relayouts ``w`` for blocks not aligned to 128 columns.
``BFLOAT16_BLOCKS``           XLA:TPU converts the whole float32 ``w`` to bfloat16 at the
                              default precision: the plan rounds each block of ``w`` in
                              the loop instead, through its bits.
``single_device``             views that merge part of the class axis with the batch are
                              only taken on one device (GSPMD could regather a
                              class-sharded axis for them).
============================  ==========================================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

MiB = 2**20


def on_cpu(cpu: Callable, default: Callable, *args):
    """``cpu(*args)`` when lowered for XLA:CPU, ``default(*args)`` for any other platform.

    Both are traced; the compiler sees only the lowering platform's branch (a
    multi-platform export keeps a conditional resolved before compilation).
    """
    return lax.platform_dependent(*args, cpu=cpu, default=default)


def per_platform(fn: Callable, plans: dict):
    """``fn(plans[p])`` for the lowering platform ``p`` (a key of ``plans``: ``"cpu"``,
    ``"tpu"``, and ``"default"`` for every other platform).

    Platforms with equal plans share one traced branch; one plan for all: no branch.
    """
    distinct: dict = {}
    for platform, plan in plans.items():
        distinct.setdefault(plan, []).append(platform)
    if len(distinct) == 1:
        return fn(next(iter(distinct)))
    branches = {}
    for plan, platforms in distinct.items():
        branch = functools.partial(fn, plan)  # one callable per plan: JAX joins them
        for platform in platforms:
            branches[platform] = branch
    default = branches.pop("default")
    return lax.platform_dependent(default=default, **branches)


def single_device() -> bool:
    """Whether the program runs on a single device (the only topology where views that
    merge part of the class axis with the batch are taken; see ``reduce_rows``)."""
    return jax.device_count() == 1


def narrow_float(a: jax.Array) -> bool:
    """bfloat16 / float16: the dtypes XLA:CPU converts to float32 around slices, writes,
    gathers and transposes (each workaround below is for those dtypes only)."""
    return jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4


# --------------------------------------------------------------------------------------------
# Row reductions
# --------------------------------------------------------------------------------------------

#: XLA:CPU (jax 0.10) runs a fused reduction 2-7x slower once a float32 row is longer
#: than this (measured: sum of exp 44 ms at 32768 columns, 320 ms at 40000 and above,
#: same element count); rows are then reduced in pieces of at most this length.
CPU_ROW_LIMIT = 32768


def _row_pieces(shape: tuple[int, ...]) -> int:
    """How many equal pieces to cut each row into on XLA:CPU (1: none)."""
    k = shape[-1]
    if k <= CPU_ROW_LIMIT or len(shape) < 2 or not single_device():
        # On several devices the [rows * p, K / p] view merges the batch with part of the
        # class axis: on a mesh that shards the classes, GSPMD would all-gather the
        # logits for it (measured), and under Auto axes a sharding is not visible here.
        return 1
    for pieces in range(-(-k // CPU_ROW_LIMIT), k // 1024 + 1):
        if k % pieces == 0:
            return pieces
    return 1  # no divisor gives pieces of 1024 to 32768 columns: keep the rows whole


def reduce_rows(reducer, term, arrays, row_values=()):
    """``reducer(term(*arrays, *(r[..., None] for r in row_values)), axis=-1)``.

    ``arrays`` have the same ``[..., K]`` shape, ``row_values`` their batch shape, and
    ``term`` is elementwise. On XLA:CPU, long rows are reduced as ``[rows * p, K / p]``
    pieces with the row values repeated, then the ``p`` partial results per row: the
    same numbers, at the speed of short rows (``CPU_ROW_LIMIT``).
    """

    def whole():
        return reducer(term(*arrays, *(r[..., None] for r in row_values)), axis=-1)

    pieces = _row_pieces(arrays[0].shape)
    if pieces == 1:
        return whole()

    def in_pieces():
        batch, k = arrays[0].shape[:-1], arrays[0].shape[-1]
        flat = [a.reshape(-1, k // pieces) for a in arrays]
        rows = [
            jnp.repeat(r.reshape(-1), pieces, total_repeat_length=r.size * pieces)[:, None]
            for r in row_values
        ]
        partial = reducer(term(*flat, *rows), axis=-1)
        return reducer(partial.reshape(batch + (pieces,)), axis=-1)

    return on_cpu(in_pieces, whole)


# --------------------------------------------------------------------------------------------
# Blocks of bfloat16/float16 arrays (the fused losses' loops)
# --------------------------------------------------------------------------------------------


def slice_block(a: jax.Array, start, length: int, axis: int) -> jax.Array:
    """``length`` entries of ``a`` along ``axis`` from a traced ``start``.

    XLA:CPU (jax 0.10) slices a bfloat16/float16 array in float32: it converts the whole
    array, and inside a loop that conversion of a loop-invariant operand (or of its
    integer view) is hoisted out and materialised, a full-size copy of ``w`` (measured
    with ``benchmarks.bench_linear``: +D*V*4 bytes of temporary memory). A slice inside
    a conditional branch cannot be hoisted, and fuses into a copy of the block.
    """
    take = lambda: lax.dynamic_slice_in_dim(a, start, length, axis)  # noqa: E731
    if not narrow_float(a):
        return take()
    shape = a.shape[:axis] + (length,) + a.shape[axis + 1 :]
    in_branch = lambda: lax.cond(start >= 0, take, lambda: jnp.zeros_like(a, shape=shape))  # noqa: E731
    return on_cpu(in_branch, take)


def put_block(a: jax.Array, update: jax.Array, start, axis: int) -> jax.Array:
    """``a`` with ``update`` written from ``start`` along ``axis``, in place.

    XLA:CPU (jax 0.10) writes a bfloat16/float16 update by converting the whole
    destination to float32 and back (measured: a copy of ``dw`` per vocabulary block in
    ``benchmarks.bench_linear``); through the unsigned-integer views it writes in place.
    """
    write = lambda: lax.dynamic_update_slice_in_dim(a, update, start, axis)  # noqa: E731
    if not narrow_float(a):
        return write()

    def as_bits():
        bits = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
        view = lambda t: lax.bitcast_convert_type(t, bits)  # noqa: E731
        out = lax.dynamic_update_slice_in_dim(view(a), view(update), start, axis)
        return lax.bitcast_convert_type(out, a.dtype)

    return on_cpu(as_bits, write)


def transposed_block(a: jax.Array, block: Callable[[], jax.Array], start, transposed_shape):
    """``block().T`` (a ``[tokens, D]`` block of ``a = x``) for the product ``x.T @ dz``.

    XLA:CPU (jax 0.10) runs a bfloat16 matrix product in bfloat16 (YNNPACK) only when
    its left operand is row-major; the transpose of a row-major block is a column-major
    view, so ``x.T @ dz`` would convert both operands to float32 (full copies) and
    multiply in float32, several times slower (measured: ``benchmarks.bench_linear``,
    bfloat16 rows). A transpose inside a conditional branch is materialised row-major
    instead, block by block (a copy of the block, negligible beside the product).
    """
    plain = lambda: block().T  # noqa: E731

    def row_major():
        if isinstance(start, int):
            # The barrier keeps XLA from folding the always-true predicate (and inlining
            # the branch, which would bring back the column-major view).
            pred = lax.optimization_barrier(jnp.bool_(True))
        else:
            pred = start >= 0
        # zeros_like keeps a's type (its sharding, the mesh axes it varies over).
        zeros = lambda: jnp.zeros_like(a, shape=transposed_shape)  # noqa: E731
        return lax.cond(pred, plain, zeros)

    if not narrow_float(a):
        return plain()
    return on_cpu(row_major, plain)


def gather_bits(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[..., index]`` per row (in-range ``index`` of the batch shape).

    XLA:CPU (jax 0.10) upcasts a bfloat16 gather operand to float32, which copies the
    whole logits array (measured: ``benchmarks.bench_categorical``, bfloat16 memory);
    the gather reads the logits' bits as unsigned integers instead.
    """

    def plain():
        return jnp.take_along_axis(x, index[..., None], axis=-1, mode="clip")[..., 0]

    def as_bits():
        bits = lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        picked = jnp.take_along_axis(bits, index[..., None], axis=-1, mode="clip")[..., 0]
        return lax.bitcast_convert_type(picked, x.dtype)

    if not narrow_float(x):
        return plain()
    return on_cpu(as_bits, plain)


def index_bits(a: jax.Array, index, axis: int) -> jax.Array:
    """``a``'s slice at the traced ``index`` along ``axis`` (that axis dropped).

    XLA:CPU (jax 0.10) reads it from a float32 conversion of the whole bfloat16 ``a``
    (measured by a review of gradient filtering's target products: compiled temporary
    memory of a bfloat16 streaming call 21.9 -> 36.2 MiB, a copy of ``x`` per skipped
    block); as integer bits it reads the slice alone (21.2 MiB).
    """
    take = lambda b: lax.dynamic_index_in_dim(b, index, axis=axis, keepdims=False)  # noqa: E731
    if not narrow_float(a):
        return take(a)

    def as_bits():
        bits = lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))
        return lax.bitcast_convert_type(take(bits), a.dtype)

    return on_cpu(as_bits, lambda: take(a))


# --------------------------------------------------------------------------------------------
# Fusion barriers
# --------------------------------------------------------------------------------------------


def cpu_barrier(values):
    """``lax.optimization_barrier(values)`` on XLA:CPU; ``values`` unchanged elsewhere.

    XLA:CPU (jax 0.10) materialises a value that CSE shares between two fused passes
    when it cannot fuse into both: a broadcast constant with several users (the binary
    losses' ``1 - t``: a float32 temporary the size of the input), the float32
    conversion of bfloat16 logits read by two reductions (the smoothing sums), the
    ``exp(z - max)`` of two passes over the same logits (poly-1 beside the
    cross-entropy; the fused loss's single pass). Measured as compiled temporary memory
    in ``benchmarks`` (``losses``, ``categorical``, ``linear``): each barrier removes a
    ``[rows, classes]`` float32 buffer. GPU and TPU fuse these without help.
    """
    return on_cpu(lambda v: lax.optimization_barrier(v), lambda v: v, values)


# --------------------------------------------------------------------------------------------
# Block sizes of the fused losses
# --------------------------------------------------------------------------------------------

#: Float32 panel size of the fused losses' blocks (the logits block, its ``dx`` rows, its
#: ``dw`` columns). On CPU, memory-lean panels cost nothing: the matrix products are as
#: efficient at that size (``benchmarks.bench_linear``, 4096 x 1024 x 32000, jax 0.10);
#: a TPU runs larger blocks markedly faster (fewer, larger kernels), and has the memory
#: for them. On GPU (XLA:GPU for an H100, compiled without a device: ``python -m
#: benchmarks.accelerators --target h100``) a 128 MiB panel keeps the float32 logits
#: block, its bfloat16 ``dz`` and ``dx`` at 285 MiB at Llama-3 bf16, 1/14 of ``x @ w`` +
#: optax; 32 MiB panels take it to 175 MiB (1/23) and Gemma-2 bf16 from 260 to 133 MiB.
#: Flops are the same; the time cost of the 4x more, smaller blocks is unmeasured (no GPU).
PANEL_BYTES = {"cpu": 32 * MiB, "tpu": 128 * MiB, "default": 32 * MiB}

#: The platforms a fused loss's plan distinguishes (see ``per_platform``); "default" is
#: every other platform (CUDA, ROCm).
PLATFORMS = ("cpu", "tpu", "default")


#: Panels for a fused loss that scatters per-token values into its block of ``dz`` (a
#: teacher's top-k): XLA:TPU materialises that block (the other losses' block is fused
#: into its products), so its panel is this fraction. Compiled temporary memory of the
#: top-64 KL's ``value_and_grad`` at Gemma-2 (8192 x 2304 x 256000, bfloat16, TPU v5e,
#: jax 0.10.2, libtpu 0.0.42): 249 MiB with the 128 MiB panel's 8192 x 4096 blocks,
#: 91-135 MiB with quarter panels (the cross-entropy: 72.5 MiB). jax 0.12.0.1 (libtpu
#: 0.0.50) keeps more of the block: 165.3 MiB with quarter panels, 114.6 with eighth
#: panels (jax 0.10.2: 92.2), so TPU takes eighths (time cost unmeasured: no TPU). GPU:
#: quarters (the H100 figures were measured with them). CPU: unchanged (160 MiB).
SCATTER_PANEL_FRACTION = {"cpu": 1, "tpu": 8, "default": 4}


#: Largest float32 logits block ``[token_block, V]`` of the fused losses' single pass, per
#: platform (the token blocks are about ``2 D`` tokens within it). XLA:TPU keeps a block
#: of up to about 64 MiB out of the temporaries; a larger one it materialises, with its
#: ``dz``, beside the float32 ``[D, V]`` accumulator of ``dw``. Compiled temporary memory
#: of the cross-entropy's ``value_and_grad`` at 4096 x 1024 x 32000 (jax 0.10.2, libtpu
#: 0.0.42, compiled without a device), bfloat16 / float32, by token block: v5e 2048:
#: 500.6 / 250.4 MiB, 1024: 375.5 / 125.2, 512: 125.1 / 0.2 (the accumulator alone, and
#: none in float32, where it is the output); v6e 2048: 658.7 / 250.3, 512: 125.1 / 0.2
#: (``x @ w`` + optax: 250 / 500). XLA:GPU (H100, ``benchmarks.accelerators --target
#: h100``) materialises any block: 2048: 516 / 266 MiB, 1024: 268 / 137, 512: 173 / 72.5
#: (``x @ w`` + optax: 500 / 1000); 128 MiB keeps the block's ``x.T @ dz`` (``2 D V``
#: flops per token against the accumulator's ``8 D V`` bytes per block) near the ridge of
#: compute and bandwidth. CPU: unchanged (256 MiB).
SINGLE_PASS_BLOCK_BYTES = {"cpu": 256 * MiB, "tpu": 64 * MiB, "default": 128 * MiB}


def single_pass_block_bytes(platform: str) -> int:
    """The largest single-pass logits block for ``platform`` (``SINGLE_PASS_BLOCK_BYTES``)."""
    return SINGLE_PASS_BLOCK_BYTES.get(platform, SINGLE_PASS_BLOCK_BYTES["default"])


#: The panel size for float32 inputs where it differs from ``PANEL_BYTES``. On CPU every
#: float32 block (the slice of ``w``, the product into ``dw``, ``x``'s rows) is twice a
#: bfloat16 one: 11 MiB panels take Gemma-2's float32 ``value_and_grad`` (8192 x 2304 x
#: 256000) from 145.5 to 49.1 MiB of temporaries, at the same speed (2048 x 2304 x 32768
#: float32, medians of 3: 6846 ms at 32 MiB, 7065 at 11, within the run-to-run spread;
#: bfloat16 keeps 32 MiB: 3.7% slower at 12).
FLOAT32_PANEL_BYTES = {"cpu": 11 * MiB}


def panel_bytes(platform: str, scatters: bool = False, float32: bool = False) -> int:
    """The panel size for ``platform`` (``"cpu"``, ``"tpu"`` or ``"default"``), for a loss
    that ``scatters`` into its block of ``dz`` or not, with float32 inputs or not."""
    size = PANEL_BYTES.get(platform, PANEL_BYTES["default"])
    if float32:
        size = FLOAT32_PANEL_BYTES.get(platform, size)
    if scatters:
        size //= SCATTER_PANEL_FRACTION.get(platform, SCATTER_PANEL_FRACTION["default"])
    return size


#: Whether the fused losses' blocked axes are grouped (``jxent._fused.blocks``) on each
#: platform. XLA:TPU (jax 0.10.2, libtpu 0.0.42) relayouts the whole of ``w`` for the
#: strided blocks of a grouped view: compiled temporary memory of the fused loss's
#: ``value_and_grad`` at Gemma-2 (8192 x 2304 x 256000, bfloat16, TPU v5e, compiled
#: without a device) is 1198 MiB with groups, 72.7 MiB without. Without groups a ``w``
#: sharded over its columns on ``Auto`` mesh axes is gathered on TPU: use
#: ``jxent.parallel`` (or ``Explicit`` axes, which take it) to split the vocabulary there.
GROUPED_BLOCKS = {"cpu": True, "tpu": False, "default": True}

#: The alignment of the vocabulary blocks per platform. XLA:TPU tiles the minor dimension
#: by 128: a block of columns that is not a multiple of 128 (or starts off a multiple of
#: 128) is sliced from a relayouted copy of ``w`` (Gemma-2 bfloat16 on v5e: 4000-column
#: blocks 1198 MiB, 2048-column blocks 72.7 MiB). Where this is above 8 the plan also
#: prefers any aligned divisor of ``V`` to a shorter last block, whose write XLA:TPU turns
#: into a pad that lays ``dw`` out column-major, copied back at the end (Llama-3
#: 8192 x 4096 x 128256 bfloat16 on v6e: 4096-column blocks 1132 MiB, 768-column 128.5).
VOCAB_ALIGN = {"cpu": 8, "tpu": 128, "default": 8}

#: Whether the fused losses' float32 products at the default precision round their
#: blocks to bfloat16 themselves, per platform. XLA:TPU multiplies float32 at the default
#: precision in one bfloat16 pass, as ``x @ w`` does, but for a product inside the block
#: loop it converts the whole loop-invariant ``w`` to bfloat16 once, before the loop: a
#: copy of ``w`` (Gemma 2 float32 on v5e: 1161.6 MiB of temporary memory; an
#: optimization barrier on each block does not prevent it, jax 0.10.2). The plan then
#: rounds each block of ``w`` to bfloat16 where it is read, through its bits
#: (``jxent._fused.logits.round_to_bfloat16``: integer arithmetic, which XLA does not move
#: out of the loop), ``x`` and ``dz`` with a plain conversion, and multiplies bfloat16
#: operands, accumulating in float32: the same single pass, 72.6 MiB. A caller's
#: ``precision=`` or a ``jax.default_matmul_precision`` context multiplies float32 as asked
#: (at XLA:TPU's default, with the copy). Narrower inputs are multiplied as they are.
BFLOAT16_BLOCKS = {"cpu": False, "tpu": True, "default": False}
