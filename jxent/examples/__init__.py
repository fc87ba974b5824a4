"""Example trainer: Flax NNX models trained with Optax and jxent's losses.

Run ``python -m jxent.examples.train --help`` for the tasks and options. The
modules here need the ``examples`` extra (``pip install -e ".[examples]"``):

- :mod:`jxent.examples.train`: the entry point: ``--spawn``, joining the processes, the
  task's run, every failure's exit code;
- :mod:`jxent.examples.distill`: the distill task's phases (a teacher, then a student);
- :mod:`jxent.examples.runner`: one run in its output directory, to its exit code;
- :mod:`jxent.examples.settings`: a run's settings from its flags, and on ``--resume``;
- :mod:`jxent.examples.flags`: the flags, their parser and ``--help``, the exit codes;
- :mod:`jxent.examples.trainer`: the mesh, the training loop, evaluation, reports;
- :mod:`jxent.examples.report`: the header, throughput, summary table, JSON and plot;
- :mod:`jxent.examples.distributed`: several processes on JAX's distributed runtime
  (joining it, ``--spawn``'s local launcher);
- :mod:`jxent.examples.data`: the digits and byte-level corpus pipelines;
- :mod:`jxent.examples.models`: the digits classifier and the byte transformer;
- :mod:`jxent.examples.tasks`: losses, train and eval steps for each task;
- :mod:`jxent.examples.training`: the optimizer and the pure train/eval step functions;
- :mod:`jxent.examples.metrics`: accuracy, calibration error, bits per byte;
- :mod:`jxent.examples.checkpointing`: orbax checkpoints of the training state.
"""
