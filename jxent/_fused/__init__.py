"""The blocked engine of the fused losses (internal; users call ``jxent.linear`` and
``jxent.parallel``).

- ``plan``: block sizes and groups, per platform;
- ``blocks``: loops over blocks and the grouped views they are sliced from;
- ``engine``: the per-block contract (:class:`engine.FusedLoss`), the online
  statistics, the streaming and single-pass schedules under ``jax.custom_vjp``, and the
  vocabulary-parallel combine;
- ``xent``: the integer-label cross-entropy written to the contract, and its
  one-device driver.
"""
