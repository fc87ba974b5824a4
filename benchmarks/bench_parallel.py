"""Sharded losses on an 8-device mesh vs the same loss on one device: per-device memory.

Needs 8 devices; on a CPU they are simulated (this script sets the flag when run
directly; ``python -m benchmarks`` runs it in a subprocess with the flag set):

    python benchmarks/bench_parallel.py [--tokens 8192] [--hidden 4096] [--vocabs 32000,128256]

Every case is ``jit(value_and_grad(mean loss))``, compiled (lowered from
``ShapeDtypeStruct``s: nothing is allocated), for the shape shown in its row:

- ``fused linear, w over 8 devices`` and ``fused linear, 2x4 (data x model)``:
  ``jxent.parallel.linear_softmax_cross_entropy`` in ``shard_map`` with ``w`` split
  over the vocabulary (and the tokens over ``data``);
- ``integer labels, logits 2x4 (jit)``: the categorical loss with the logits sharded
  ``P("data", "model")`` under ``jit`` (a quarter of the tokens: the unsharded logits
  would otherwise take gigabytes).

The contenders are the sharded program (per device) and the same loss on one device:
XLA's compiled temporary memory, and arguments plus outputs (``x``/``w``/logits and
their gradients), where most of the saving is. Nothing is timed: simulated devices
share the same cores, so a time measured on them is no speed-up figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_parallel.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402
from benchmarks.common import MiB, finish_record, row, start_record  # noqa: E402

#: tokens and hidden size of Llama 3 8B's output layer; its vocabulary is 128256.
TOKENS, HIDDEN = 8192, 4096
VOCABS = (32000, 128256, 256000)
#: (name, kind, mesh shape): kind "linear" (fused, shard_map) or "logits" (jit, GSPMD);
#: a 1-D mesh is a "model" axis alone (tensor parallel), a 2-D one ("data", "model").
CASES = (
    ("fused linear, w over 8 devices", "linear", (8,)),
    ("fused linear, 2x4 (data x model)", "linear", (2, 4)),
    ("integer labels, logits 2x4 (jit)", "logits", (2, 4)),
)
DTYPES = (jnp.float32, jnp.bfloat16)


def _mesh(mesh_shape):
    names = ("model",) if len(mesh_shape) == 1 else ("data", "model")
    return jax.make_mesh(mesh_shape, names)


def _padded(num_classes: int, shards: int) -> int:
    return -(-num_classes // shards) * shards


def _programs(kind: str, mesh, num_classes: int):
    """``(sharded, unsharded, in_specs)``: mean-loss functions and the sharded layout."""
    data = "data" if "data" in mesh.axis_names else None
    if kind == "linear":

        def local(x, w, y):
            return jxent.parallel.linear_softmax_cross_entropy(
                x, w, y, axis_name="model", batch_axis_name=data, num_classes=num_classes
            )

        specs = (P(data, None), P(None, "model"), P(data))
        sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
        return sharded, jxent.linear_softmax_cross_entropy, specs

    def loss(logits, y):
        return jxent.softmax_cross_entropy_with_integer_labels(logits, y, reduction="mean")

    return loss, loss, (P("data", "model"), P("data"))


def _shapes(kind: str, shape, shards: int):
    n, d, v = shape
    v = _padded(v, shards)
    if kind == "linear":
        return [(n, d), (d, v), (n,)]
    return [(n, v), (n,)]


def _structs(kind, shape, dtype, mesh=None, specs=None, shards=1):
    shapes = _shapes(kind, shape, shards)
    dtypes = [dtype] * (len(shapes) - 1) + [jnp.int32]
    shardings = [None] * len(shapes) if mesh is None else [NamedSharding(mesh, p) for p in specs]
    return [
        jax.ShapeDtypeStruct(s, t, sharding=h)
        for s, t, h in zip(shapes, dtypes, shardings, strict=True)
    ]


def _memory(fn, structs, argnums) -> dict[str, float]:
    """Per-device MiB of temporaries, and of arguments plus outputs."""
    stats = (
        jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*structs).compile()
    ).memory_analysis()
    return {
        "temp_mib": stats.temp_size_in_bytes / MiB,
        "io_mib": (stats.argument_size_in_bytes + stats.output_size_in_bytes) / MiB,
    }


def measure(name, kind, mesh_shape, dtype, shape) -> dict:
    """One case at ``shape`` (tokens, hidden, vocabulary): sharded vs one device."""
    shards = mesh_shape[-1]
    argnums = (0, 1) if kind == "linear" else 0
    mesh = _mesh(mesh_shape)
    sharded, single, specs = _programs(kind, mesh, shape[2])
    with jax.set_mesh(mesh):
        mem = _memory(sharded, _structs(kind, shape, dtype, mesh, specs, shards), argnums)
    base = _memory(single, _structs(kind, shape, dtype), argnums)
    n, d, v = shape
    measured = (n, d, v) if kind == "linear" else (n, v)
    return row(name, dtype, measured, {"sharded": mem, "1 device": base}, "1 device")


def run(tokens=TOKENS, hidden=HIDDEN, vocabs=VOCABS, dtypes=DTYPES, progress=None) -> list[dict]:
    """Per-device compiled memory, sharded vs one device, for every case, dtype and V."""
    if jax.device_count() < 8:
        raise RuntimeError(
            f"bench_parallel needs 8 devices, found {jax.device_count()}; on a CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting Python."
        )
    rows = []
    for dtype in dtypes:
        for name, kind, mesh_shape in CASES:
            for v in vocabs:
                n = tokens if kind == "linear" else tokens // 4
                rows.append(measure(name, kind, mesh_shape, dtype, (n, hidden, v)))
                if progress is not None:
                    progress()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    parser.add_argument("--out", type=Path, default=None, help="write the record as JSON here")
    args = parser.parse_args()
    vocabs = tuple(int(v) for v in args.vocabs.split(","))
    config = {"tokens": args.tokens, "hidden": args.hidden, "vocabs": list(vocabs)}
    record = start_record("python benchmarks/bench_parallel.py", "parallel", config)
    started = time.perf_counter()
    record["rows"] = run(args.tokens, args.hidden, vocabs)
    finish_record(record, started)
    from benchmarks import tables

    print(tables.parallel(record))
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
