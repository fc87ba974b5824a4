"""Block planning for the fused losses: how big each block is, and how it is grouped.

All static (Python ints from the shapes), and made once per platform: a program
lowered for XLA:CPU takes the CPU plan, one lowered for a GPU or TPU the accelerator
plan (``_backend.PANEL_BYTES``; the choice is made per lowering platform by
``_backend.per_platform``).

A symbolic number of tokens (``jax.export`` with ``symbolic_shape("n, D")``; passed as
is, or as ``num_tokens=None``): the token block then depends on ``D``, ``V`` and the panel
alone (:func:`symbolic_token_block`), never on ``N``, and the caller pads the tokens to
a multiple of it (``jxent._fused.driver.pad_tokens``).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import jax

from jxent import _backend

MiB = _backend.MiB

#: Largest float32 ``[D, V]`` weight-gradient accumulator the single-pass schedule may use.
SINGLE_PASS_MAX_ACCUMULATOR = 256 * MiB
#: Most groups a blocked axis is split into (see ``jxent._fused.blocks``): every block
#: takes a slice of each group, so that under ``jax.jit`` with ``w`` (or ``x``) sharded
#: along the blocked axis over ``Auto`` mesh axes, each device slices its own part.
MAX_GROUPS = 64
#: Fewest consecutive vocabulary columns a block takes from each group. A ``w`` block is
#: then copied in runs of at least this many columns: on CPU, with 2048-column blocks,
#: runs of 32 columns (64 groups) cost 4-8% of a float32 training step, runs of 128 about
#: half of that (measured, 2048 x 512 x 32768; within the noise for bfloat16).
MIN_VOCAB_RUN = 128
#: Largest token block for a symbolic number of tokens: the tokens are padded to a
#: multiple of the block, so it bounds the padded rows (and their wasted products) of a
#: call with few tokens; beyond a few thousand rows a block is no faster.
SYMBOLIC_MAX_TOKEN_BLOCK = 4096


class Plan(NamedTuple):
    """The blocks of one call on one platform. Each block length counts whole blocks (all
    groups) and is a multiple of its number of groups, which divides the axis too."""

    token_block: int
    vocab_block: int
    token_groups: int = 1
    vocab_groups: int = 1
    # The products' precision, as jnp.dot's: the caller's, or None (the context's
    # jax.default_matmul_precision, or JAX's default).
    precision: Any = None
    # float32 products at the default precision as bfloat16 blocks rounded in the loop
    # (_backend.BFLOAT16_BLOCKS): one pass, without a bfloat16 copy of the whole of w. Set
    # where the platform needs it and the default precision is in force; each product
    # applies it to float32 operands only.
    bfloat16_blocks: bool = False


def _block_length(total: int, cap: int, align: int, step: int = 8, floor: int = 0) -> int:
    """A block length of at most about ``cap`` for ``total`` items.

    Prefers a divisor of ``total`` (a multiple of ``step``) in ``[floor, cap]``
    (``floor`` 0: ``cap / 2``): a shorter last block is compiled as a separate copy of
    the loop body, with buffers of its own. Otherwise splits ``total`` into near-equal
    blocks, rounded up to a multiple of ``align``.
    """
    cap = max(align, cap - cap % align)
    if total <= cap:
        return max(total, 1)
    for size in range(cap - cap % step, max(floor or cap // 2, step) - 1, -step):
        if total % size == 0:
            return size
    count = -(-total // cap)
    size = -(-total // count)
    return min(total, -(-size // align) * align)


def symbolic_token_block(cap: int) -> int:
    """The token block for an unknown number of tokens, given the cap the rule for a
    known ``N`` would use: the largest power of two at most ``cap`` and
    :data:`SYMBOLIC_MAX_TOKEN_BLOCK`, at least 8. Powers of two divide the usual token
    counts (no padding then), and the blocks of all platforms divide the largest one (the
    tokens are padded once, for all of them)."""
    return _power_of_two_at_most(max(8, min(cap, SYMBOLIC_MAX_TOKEN_BLOCK)))


def _power_of_two_at_most(cap: int) -> int:
    return 1 << (max(cap, 1).bit_length() - 1)


def block_groups(total: int, block: int, min_run: int = 1) -> int:
    """Groups of a blocked axis of length ``total`` with blocks of ``block`` (static).

    The largest power of two that divides both, at most ``MAX_GROUPS`` and at most
    ``block / min_run`` (each group's slice of a block has at least ``min_run``
    entries); 1 for a single block. A sharding of the axis over ``S`` devices (``Auto``
    mesh axes, GSPMD) stays local to each device through the block loop when ``S``
    divides this number.
    """
    if block >= total:
        return 1
    common = math.gcd(total, block)
    groups = min(common & -common, MAX_GROUPS)
    while groups > 1 and groups * min_run > block:
        groups //= 2
    return groups


def _static_count(num_tokens):
    """``num_tokens``, or None for an unknown (symbolic) count."""
    return num_tokens if isinstance(num_tokens, int) else None


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"chunk_size must be a positive int or a pair of them, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"chunk_size must be None, a positive int (vocabulary columns per block) or a "
            f"pair (tokens, vocabulary columns) of positive ints; got {what} {value!r}."
        ) from None
    if value <= 0:
        raise ValueError(f"chunk_size must be positive, got {what} {value}.")
    return value


def plan_blocks(
    num_tokens: int | None,
    hidden: int,
    num_classes: int,
    reduction: str,
    chunk_size: int | tuple[int, int] | None,
    acc_bytes: int = 4,
    platform: str = "cpu",
    scatters: bool = False,
    float32: bool = False,
    schedule: str = "auto",
) -> tuple[int, int, bool]:
    """``(token_block, vocab_block, single_pass)`` for a call on ``platform`` (all static).

    The rule for ``chunk_size=None``, with ``P`` the panel size (``_backend.PANEL_BYTES``:
    32 MiB on CPU and GPU, 128 MiB on TPU, 11 MiB on CPU for float32 inputs
    (``_backend.FLOAT32_PANEL_BYTES``); sizes counted in float32):

    * Single pass, when the loss is summed or averaged and the ``[D, V]`` weight-
      gradient accumulator takes at most 256 MiB: token blocks of about ``2 D``
      tokens (a logits block of at least ``P``, at most the platform's
      ``_backend.SINGLE_PASS_BLOCK_BYTES``: 256 MiB on CPU, 128 MiB on GPU, 64 MiB on
      TPU) spanning the whole vocabulary. Three matrix products, as many as the
      unfused computation.
    * Streaming otherwise (per-token losses, or a large ``D * V`` as in language
      models): token blocks of at most ``P`` of ``dx`` rows (``P / 4D`` tokens)
      and vocabulary blocks of at most ``P`` of logits and of ``dw`` columns.
      Four matrix products; temporary memory ``O(N * D)`` plus a few panels,
      whatever ``V``.

    Block lengths prefer divisors of ``N`` and ``V`` (multiples of 8) within a
    factor 2 of those caps, since a shorter last block is compiled separately.
    An int ``chunk_size`` sets the vocabulary block (tokens blocked as above), a
    pair sets both; a vocabulary block as wide as ``V`` with a summed or averaged
    loss selects the single pass. Whether the single pass is taken never depends on
    the platform (only the block lengths do).

    ``schedule``: ``"auto"`` (the rule above), ``"single_pass"`` (a summed or averaged
    loss takes the single pass whatever the accumulator's size: three products for
    ``4 D V`` bytes of memory) or ``"streaming"`` (never the single pass).

    ``num_tokens=None`` (or a symbolic dimension): an unknown number of tokens. The
    token block is then the power of two of :func:`symbolic_token_block` below the
    same cap (a pair ``chunk_size`` sets it as given), and a streamed vocabulary block
    is the one of the largest power of two of tokens within the cap (as a static count
    that large would take); the caller pads the tokens to a multiple of the token block
    (``jxent._fused.driver.pad_tokens``).
    """
    n, d, k = _static_count(num_tokens), hidden, num_classes

    def token_block(cap: int) -> int:
        return symbolic_token_block(cap) if n is None else _block_length(n, cap, 8)

    summed = reduction != "none"
    panel = _backend.panel_bytes(platform, scatters, float32) // acc_bytes  # elements
    if chunk_size is not None:
        if isinstance(chunk_size, (tuple, list)):
            if len(chunk_size) != 2:
                raise ValueError(
                    "chunk_size must be an int or a pair (tokens, vocabulary columns), got "
                    f"{chunk_size!r}."
                )
            tb = _positive_int(chunk_size[0], "token block")
            vb = _positive_int(chunk_size[1], "vocabulary block")
        else:
            vb = _positive_int(chunk_size, "vocabulary block")
            tb = token_block(panel // max(d, 1))
        tb, vb = (tb if n is None else min(tb, max(n, 1))), min(vb, k)
        if schedule == "single_pass" and vb < k:
            raise ValueError(
                f'schedule="single_pass" needs vocabulary blocks spanning all {k} columns; '
                f"chunk_size={chunk_size!r} sets blocks of {vb}: pass (tokens, {k}) or no "
                "chunk_size."
            )
        return tb, vb, summed and vb == k and schedule != "streaming"
    rows_cap = panel // max(d, 1)
    small = d * k * acc_bytes <= SINGLE_PASS_MAX_ACCUMULATOR
    if summed and schedule != "streaming" and (small or schedule == "single_pass"):
        # Token blocks of about 2 D rows: each block adds its x.T @ dz into the [D, V]
        # accumulator, and an inner dimension of 2 D keeps that product efficient and
        # the accumulator's traffic small beside it.
        largest = _backend.single_pass_block_bytes(platform) // (acc_bytes * k)
        rows = min(max(2 * d, panel // k), largest)
        return token_block(max(rows, 1)), k, True
    tb = token_block(rows_cap)
    # The vocabulary block of that many tokens; for a symbolic count, of as many as the
    # panel allows (a power of two, as a static count that large would take), even
    # beyond SYMBOLIC_MAX_TOKEN_BLOCK: a wider vocabulary block beside a shorter token
    # block would enlarge the block's dw columns (D x vocab_block, float32).
    span = tb if n is not None else max(tb, _power_of_two_at_most(rows_cap))
    step = _backend.VOCAB_ALIGN.get(platform, _backend.VOCAB_ALIGN["default"])
    # Where blocks are tile-aligned, any aligned divisor beats a shorter last block.
    floor = step if step > 8 else 0
    return tb, _block_length(k, min(panel // max(d, 1), panel // span), 128, step, floor), False


def plans(
    num_tokens: int | None,
    hidden: int,
    columns: int,
    reduction: str,
    chunk_size,
    acc_bytes: int,
    *,
    grouped: bool = True,
    float32: bool = False,
    scatters: bool = False,
    schedule: str = "auto",
    precision: Any = None,
) -> tuple[tuple[tuple[str, Plan], ...], bool]:
    """Every platform's :class:`Plan` (as ``((platform, plan), ...)``, hashable) and
    whether the loss takes the single pass. ``grouped=False``: contiguous blocks (one
    group), as on a shard of a vocabulary already split over devices; platforms whose
    compiler copies ``w`` for grouped blocks never group (``_backend.GROUPED_BLOCKS``).
    ``float32``: the products are float32 (CPU's smaller panels,
    ``_backend.FLOAT32_PANEL_BYTES``). ``scatters``: the loss scatters into its block of
    ``dz`` (``_backend.SCATTER_PANEL_FRACTION``); ``schedule``: as :func:`plan_blocks`'s;
    ``precision``: the caller's (as ``jnp.dot``'s), or None for the products' default:
    ``jax.default_matmul_precision`` where set, else JAX's (float32 blocks rounded to
    bfloat16 in the loop where ``_backend.BFLOAT16_BLOCKS`` says so: ``Plan.bfloat16_blocks``).
    ``num_tokens``: None for an unknown number of tokens, or a symbolic one (see
    :func:`plan_blocks`; the tokens are one group)."""
    out, single = [], None
    num_tokens = _static_count(num_tokens)
    # The context's default (read while tracing, where jax.default_matmul_precision is in
    # force) is the products' as it is x @ w's: None leaves it to the lowering.
    context = jax.config.jax_default_matmul_precision is not None
    for platform in _backend.PLATFORMS:
        tb, vb, single = plan_blocks(
            num_tokens,
            hidden,
            columns,
            reduction,
            chunk_size,
            acc_bytes,
            platform,
            scatters,
            float32,
            schedule,
        )
        # Each product rounds its own float32 blocks (a teacher's stream may differ in dtype
        # from the student's): the flag says only that the default precision is in force.
        rounded = precision is None and not context
        rounded = rounded and _backend.BFLOAT16_BLOCKS.get(platform, False)
        groups = (1, 1)
        if grouped and _backend.GROUPED_BLOCKS[platform]:
            token_groups = 1 if num_tokens is None else block_groups(num_tokens, tb)
            groups = (token_groups, block_groups(columns, vb, MIN_VOCAB_RUN))
        out.append((platform, Plan(tb, vb, *groups, precision, rounded)))
    return tuple(out), bool(single)
