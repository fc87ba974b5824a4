"""Checkpoints of the training state with orbax-checkpoint.

A checkpoint holds two items: ``state``, the arrays (model parameters and
optimizer state, restored with their shardings), and ``meta``, a JSON document
(the run's configuration and its metric history so far). Orbax writes each step
to a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact; :meth:`Checkpoints.latest_step`
only sees complete ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """The checkpoints of one run, in ``directory`` (one sub-directory per step)."""

    def __init__(self, directory: Path, *, keep: int):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving ``state`` and ``meta`` as ``step`` (asynchronously; see :meth:`wait`)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def read_meta(self, step: int) -> dict:
        """The JSON item of ``step`` alone (no arrays are read)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restores ``step``; the state gets the structure, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        """Blocks until every save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
