"""The distill task's teacher: a trained lm run's byte transformer, loaded frozen.

Internal API: :class:`Teacher`, :func:`load_teacher`, :func:`describe_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jxent.examples import data as data_lib
from jxent.examples import training
from jxent.examples.checkpointing import Checkpoints
from jxent.examples.models import ByteTransformer, count_params
from jxent.examples.teacher_dir import teacher_checkpoints


def describe_layers(n: int) -> str:
    """``"1 layer"``, ``"2 layers"``."""
    return f"{n} layer{'s' if n > 1 else ''}"


@dataclass(frozen=True)
class Teacher:
    """A trained byte transformer, frozen: its graph, its parameters (replicated over the
    mesh), its lm run's settings and the step of the checkpoint."""

    model_def: nnx.GraphDef
    state: nnx.State
    config: dict[str, Any]
    step: int
    directory: Path
    num_params: int

    def describe(self) -> str:
        c = self.config
        return (
            f"d_model {c['d_model']}, {describe_layers(c['num_layers'])}, {self.num_params:,} "
            f"parameters (lm run {self.directory}, step {self.step} of {c['steps']})"
        )


def load_teacher(directory: Path, mesh: Mesh | None = None, max_len: int | None = None) -> Teacher:
    """The latest checkpoint of an lm run (its ``--out-dir`` or ``checkpoints/`` folder),
    its parameters replicated over ``mesh``; raises ``ValueError`` with the reason if
    there is none, or if it cannot read sequences of ``max_len`` bytes."""
    directory = Path(directory)
    folder = teacher_checkpoints(directory)
    checkpoints = Checkpoints(folder, keep=1 << 20)
    try:
        step = checkpoints.latest_step()
        config = checkpoints.read_meta(step)["config"]
        if config.get("task") != "lm":
            raise ValueError(
                f"the teacher must be an lm run; {directory} holds a {config.get('task')} run"
            )
        if max_len is not None and config["seq_len"] < max_len:
            raise ValueError(
                f"the teacher in {directory} reads at most {config['seq_len']} bytes (its "
                f"--seq-len); --seq-len {max_len} is longer"
            )
        cfg = SimpleNamespace(**config)
        shape = SimpleNamespace(
            init_model=lambda rngs: ByteTransformer(
                data_lib.NUM_BYTES,
                cfg.seq_len,
                d_model=cfg.d_model,
                num_layers=cfg.num_layers,
                num_heads=cfg.num_heads,
                rngs=rngs,
            )
        )
        tx = training.make_optimizer(
            learning_rate=cfg.learning_rate,
            steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip,
        )
        # The state's structure, to restore into (the optimizer's part is dropped): traced,
        # not computed.
        defs = {}

        def build():
            defs["model"], _, state = training.init_training(shape, tx, cfg.seed)
            return state

        abstract = jax.eval_shape(build)
        model_def = defs["model"]
        place = NamedSharding(mesh, P()) if mesh is not None else None
        place = place or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=place), abstract
        )
        state, _ = checkpoints.restore(step, like)
    finally:
        checkpoints.close()
    num_params = count_params(nnx.merge(model_def, state["model"]))
    return Teacher(model_def, state["model"], config, step, directory, num_params)
