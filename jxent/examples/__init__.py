"""Example trainer: Flax NNX models trained with Optax and jxent's losses.

Run ``python -m jxent.examples.train --help`` for the tasks and options. The
modules here need the ``examples`` extra (``pip install -e ".[examples]"``):

- :mod:`jxent.examples.train`: the entry point: ``--spawn``, joining the processes, the
  task's run, every failure's exit code;
- :mod:`jxent.examples.distill`: the distill task's phases (a teacher, then a student);
- :mod:`jxent.examples.runner`: one run in its output directory, to its exit code;
- :mod:`jxent.examples.settings`: a run's settings from its flags, and on ``--resume``;
- :mod:`jxent.examples.flags`: the flags, one function per ``--help`` group, their parser;
- :mod:`jxent.examples.cli`: the command's name, ``--help`` text and exit codes,
  ``UsageError``, how a flag is declared and its value types;
- :mod:`jxent.examples.trainer`: the mesh, the training loop, evaluation, reports;
- :mod:`jxent.examples.report`: the header, throughput, summary table, JSON and plot;
- :mod:`jxent.examples.distributed`: several processes on JAX's distributed runtime
  (joining it, ``--spawn``'s local launcher);
- :mod:`jxent.examples.data`: the digits and byte-level corpus pipelines;
- :mod:`jxent.examples.models`: the digits classifier and the byte transformer;
- :mod:`jxent.examples.tasks`: the task of a run's settings (``make_task``);
- :mod:`jxent.examples.digits_task`, :mod:`jxent.examples.lm_task`,
  :mod:`jxent.examples.distill_task`: each task's data, model, loss and evaluation;
- :mod:`jxent.examples.task_base`: what the tasks share: batches, summary rows, hooks;
- :mod:`jxent.examples.teacher`: the distill task's teacher, loaded from an lm run;
- :mod:`jxent.examples.teacher_dir`: where the teacher is (no Flax: checked before a run);
- :mod:`jxent.examples.training`: the optimizer and the pure train/eval step functions;
- :mod:`jxent.examples.metrics`: accuracy, calibration error, bits per byte;
- :mod:`jxent.examples.checkpointing`: orbax checkpoints of the training state.
"""
