"""The blocked engine of the fused losses (internal; users call ``jxent.linear`` and
``jxent.parallel``). Modules from the bottom up:

- ``plan``: block sizes and groups, per platform;
- ``blocks``: loops over blocks and the grouped views they are sliced from;
- ``logits``: one block's logits, the student's and a teacher's stream (soft cap,
  temperature, padding columns, either layout of ``w``);
- ``contract``: what a fused loss tells the engine (:class:`contract.FusedLoss`) and
  the call's static choices (:class:`contract.Spec`);
- ``online``: the per-block arithmetic both schedules share (online statistics, a
  second pass's sums, one block's gradient and its products);
- ``streaming``, ``single_pass``: the two schedules (the streaming one also split
  over a mesh axis, with the vocabulary-parallel combine);
- ``rules``: their ``jax.custom_vjp`` rules, the XLA implementation;
- ``engine``: the implementations and the choice between them (``implementation=``);
- ``options``: a call's arguments checked once (:class:`options.Options`,
  :class:`options.Call`);
- ``explicit``: arrays typed with ``Explicit`` mesh axes, run under ``shard_map``;
- ``driver``: one run of any fused loss, on one device or a vocabulary split (plans,
  the engine's spec, schedule, reduction);
- ``xent``, ``logprobs``, ``distill``: the losses written to the contract (the
  integer-label cross-entropy; log-probabilities and entropy; distillation and the
  Jensen-Shannon divergence from a teacher's top-k or its logits stream).
"""
