"""The blocked engine of the fused losses (internal; users call ``jxent.linear`` and
``jxent.parallel``).

- ``plan``: block sizes and groups, per platform;
- ``blocks``: loops over blocks and the grouped views they are sliced from;
- ``logits``: one block's logits, the student's and a teacher's stream (soft cap,
  temperature, padding columns, either layout of ``w``);
- ``engine``: the per-block contract (:class:`engine.FusedLoss`), the online
  statistics, an optional second forward pass, the streaming and single-pass schedules
  under ``jax.custom_vjp``, and the vocabulary-parallel combine;
- ``driver``: one device's run of any fused loss (plans, schedule, reduction);
- ``xent``: the integer-label cross-entropy written to the contract, and its
  one-device driver;
- ``logprobs``, ``distill``: the log-probabilities and entropy; distillation and the
  Jensen-Shannon divergence from a teacher's top-k or its logits stream.
"""
