"""Where the distill task's teacher is: an lm run's directory and its checkpoint folder.

Nothing here needs the ``examples`` extra: the distill task's phases
(:mod:`jxent.examples.distill`) check ``--teacher-checkpoint`` before a run imports
Flax and Orbax, so that a missing extra is still reported in one line.

Internal API: :func:`teacher_directory`, :func:`teacher_checkpoints`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def teacher_directory(cfg: Any) -> Path:
    """Where the distill task's teacher is: ``--teacher-checkpoint``, else the lm run the
    task trains first in ``<out-dir>/teacher``."""
    if cfg.teacher_checkpoint is not None:
        return Path(cfg.teacher_checkpoint)
    return Path(cfg.out_dir) / "teacher"


def teacher_checkpoints(directory: Path) -> Path:
    """The checkpoint folder of an lm run given by its ``--out-dir`` (or the folder
    itself); raises ``ValueError`` if it holds no checkpoint."""
    directory = Path(directory)
    folder = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    if not folder.is_dir() or not any(p.name.isdigit() for p in folder.iterdir()):
        raise ValueError(f"the teacher: no checkpoint in {folder}")
    return folder
