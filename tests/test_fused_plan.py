"""Block planning of the fused losses (jxent/_fused/plan.py): block lengths per platform,
the single pass, and the groups of a blocked axis."""

from __future__ import annotations

import jax
from jax import export

from jxent import _backend
from jxent._fused import plan


def test_default_blocks_at_llm_shapes():
    # Gemma 2 / Llama 3: the float32 [D, V] accumulator is too large, so the vocabulary
    # is streamed; the blocks divide N and V (no separately compiled last block).
    for n, d, v in ((8192, 2304, 256000), (8192, 4096, 128256)):
        for reduction in ("mean", "none"):
            tb, vb, single = plan.plan_blocks(n, d, v, reduction, None)
            assert not single
            assert n % tb == 0 and v % vb == 0, (tb, vb)
            panel = _backend.PANEL_BYTES["cpu"]
            assert tb * vb * 4 <= 1.1 * panel
            assert d * vb * 4 <= 1.1 * panel and tb * d * 4 <= panel
            # A TPU takes larger blocks: all 8192 tokens at once here; a GPU the CPU's.
            tb_tpu, vb_tpu, _ = plan.plan_blocks(n, d, v, reduction, None, platform="tpu")
            assert tb_tpu == n and v % vb_tpu == 0
            gpu = plan.plan_blocks(n, d, v, reduction, None, platform="default")
            assert gpu[:2] == (tb, vb)
    # A moderate vocabulary and an averaged loss: the single pass over token blocks.
    tb, vb, single = plan.plan_blocks(4096, 1024, 32000, "mean", None)
    assert single and vb == 32000 and 4096 % tb == 0
    # Per-token losses always stream the vocabulary.
    assert not plan.plan_blocks(4096, 1024, 32000, "none", None)[2]


def test_explicit_chunk_sizes():
    assert plan.plan_blocks(100, 8, 50, "mean", (7, 11)) == (7, 11, False)
    assert plan.plan_blocks(100, 8, 50, "mean", (7, 50)) == (7, 50, True)
    assert plan.plan_blocks(100, 8, 50, "none", (7, 80)) == (7, 50, False)
    assert plan.plan_blocks(100, 8, 50, "sum", (500, 80)) == (100, 50, True)
    tb, vb, single = plan.plan_blocks(100, 8, 50, "mean", 16)
    assert (vb, single) == (16, False) and 1 <= tb <= 100
    assert plan.plan_blocks(0, 8, 50, "mean", None)[0] == 1


def test_block_groups():
    """The power of two dividing the axis and the block, at most 64 and at most
    block / min_run; 1 without a loop."""
    assert plan.block_groups(8192, 512) == plan.MAX_GROUPS == 64
    assert plan.block_groups(32000, 2048) == 64
    assert plan.block_groups(128256, 1336) == 8
    assert plan.block_groups(48, 20) == 4
    assert plan.block_groups(61, 16) == 1
    assert plan.block_groups(64, 64) == plan.block_groups(64, 100) == plan.block_groups(0, 1) == 1
    # Runs of at least min_run (the vocabulary's 128 columns) from each group.
    assert plan.MIN_VOCAB_RUN == 128
    assert plan.block_groups(32000, 2048, 128) == 16
    assert plan.block_groups(8192, 512, 128) == 4
    assert plan.block_groups(8192, 127, 128) == plan.block_groups(8192, 200, 128) == 1
    assert plan.block_groups(2**20, 2**14, 128) == 64


def test_plans_per_platform():
    """One plan per platform; whether the single pass runs never depends on it."""
    plans, single = plan.plans(8192, 2304, 256000, "mean", None, 4)
    by_platform = dict(plans)
    assert set(by_platform) == set(_backend.PLATFORMS) and not single
    assert by_platform["tpu"].token_block > by_platform["cpu"].token_block
    plans, single = plan.plans(4096, 1024, 32000, "mean", None, 4)
    assert single and all(p.vocab_block == 32000 for _, p in plans)
    # Contiguous blocks on a shard of a split vocabulary.
    plans, _ = plan.plans(4096, 1024, 32000, "none", None, 4, grouped=False)
    assert all((p.token_groups, p.vocab_groups) == (1, 1) for _, p in plans)


def test_tpu_plan_is_ungrouped_and_lane_aligned():
    """XLA:TPU copies the whole of w for grouped or unaligned vocabulary blocks, and for
    float32 products at the default precision (``_backend``'s register): the TPU plan
    has one group, blocks of whole 128-column tiles, and float32 products as bfloat16
    blocks rounded in the loop (one pass, the default precision's); a caller's precision
    or a jax.default_matmul_precision context multiplies as asked instead."""
    for n, d, v in ((8192, 2304, 256000), (8192, 4096, 128256), (4096, 1024, 32000)):
        for float32 in (False, True):
            plans, single = plan.plans(n, d, v, "mean", None, 4, float32=float32)
            tpu = dict(plans)["tpu"]
            assert (tpu.token_groups, tpu.vocab_groups) == (1, 1)
            # The flag is the platform's; each product applies it to float32 operands.
            assert tpu.precision is None and tpu.bfloat16_blocks
            if not single:
                assert tpu.vocab_block % 128 == 0, tpu
            assert not dict(plans)["cpu"].bfloat16_blocks
            asked = dict(plan.plans(n, d, v, "mean", None, 4, float32=True, precision="highest")[0])
            assert asked["tpu"].precision == "highest" and not asked["tpu"].bfloat16_blocks
            with jax.default_matmul_precision("float32"):
                ctx = dict(plan.plans(n, d, v, "mean", None, 4, float32=True)[0])["tpu"]
            assert ctx.precision is None and not ctx.bfloat16_blocks


def test_symbolic_token_count():
    """A symbolic number of tokens (``num_tokens=None``): the token block is a power of two
    from D, V and the panel alone (at most ``SYMBOLIC_MAX_TOKEN_BLOCK``), the single pass
    is decided as for a static count, and the tokens are one group."""
    assert plan.symbolic_token_block(3640) == 2048
    assert plan.symbolic_token_block(10**6) == plan.SYMBOLIC_MAX_TOKEN_BLOCK == 4096
    assert plan.symbolic_token_block(1) == 8
    for d, v, reduction in ((2304, 256000, "mean"), (1024, 32000, "mean"), (1024, 32000, "none")):
        for platform in _backend.PLATFORMS:
            tb, vb, single = plan.plan_blocks(None, d, v, reduction, None, platform=platform)
            static = plan.plan_blocks(8192, d, v, reduction, None, platform=platform)
            assert single == static[2] and tb & (tb - 1) == 0 and 8 <= tb <= 4096
            assert vb == v if single else vb <= v
        plans, single = plan.plans(None, d, v, reduction, None, 4)
        assert all(p.token_groups == 1 for _, p in plans)
    # A symbolic dimension is planned as None.
    (n,) = export.symbolic_shape("n")
    assert plan.plans(n, 2304, 256000, "mean", None, 2) == plan.plans(
        None, 2304, 256000, "mean", None, 2
    )
    # Gemma 2 on CPU: the static rule's cap of 3640 tokens gives blocks of 2048.
    assert plan.plan_blocks(None, 2304, 256000, "mean", None)[0] == 2048
    # A pair sets the token block as given; an int the vocabulary block.
    assert plan.plan_blocks(None, 8, 50, "none", (7, 11)) == (7, 11, False)
    assert plan.plan_blocks(None, 8, 50, "mean", 16)[1:] == (16, False)


def test_single_pass_blocks_per_platform():
    """The single pass's logits block is at most the platform's
    ``_backend.SINGLE_PASS_BLOCK_BYTES`` (XLA:TPU keeps a 64 MiB block out of its
    temporaries, materialises a larger one); CPU keeps blocks of about 2 D tokens."""
    assert _backend.SINGLE_PASS_BLOCK_BYTES == {
        "cpu": 256 * plan.MiB,
        "tpu": 64 * plan.MiB,
        "default": 128 * plan.MiB,
    }
    blocks = {
        platform: plan.plan_blocks(4096, 1024, 32000, "mean", None, platform=platform)
        for platform in _backend.PLATFORMS
    }
    assert blocks == {
        "cpu": (2048, 32000, True),
        "tpu": (512, 32000, True),
        "default": (1024, 32000, True),
    }
    for platform, (tb, vb, _) in blocks.items():
        assert tb * vb * 4 <= _backend.single_pass_block_bytes(platform)


def test_schedule_choice():
    """schedule= trades memory for a product: the single pass at any size of its float32
    [D, V] accumulator (a summed or averaged loss), or never."""
    gemma2 = (8192, 2304, 256000)
    assert not plan.plan_blocks(*gemma2, "mean", None)[2]
    tb, vb, single = plan.plan_blocks(*gemma2, "mean", None, schedule="single_pass")
    assert single and vb == 256000 and 8192 % tb == 0
    # Per-token losses cannot take it whatever is asked; the driver refuses the request.
    assert not plan.plan_blocks(*gemma2, "none", None, schedule="single_pass")[2]
    # "streaming" streams where "auto" would take the single pass, blocks given or not.
    assert plan.plan_blocks(4096, 1024, 32000, "mean", None)[2]
    tb, vb, single = plan.plan_blocks(4096, 1024, 32000, "mean", None, schedule="streaming")
    assert not single and vb < 32000
    assert plan.plan_blocks(100, 8, 50, "mean", (7, 50), schedule="streaming") == (7, 50, False)
    plans, single = plan.plans(*gemma2, "sum", None, 4, schedule="single_pass")
    assert single and all(p.vocab_block == 256000 for _, p in plans)
