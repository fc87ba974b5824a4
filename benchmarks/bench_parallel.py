"""Sharded losses on an 8-device mesh vs the same loss on one device: per-device memory.

Needs 8 devices; on a CPU they are simulated (this script sets the flag when run directly):

    python benchmarks/bench_parallel.py [--memory-shape 8192,4096,128256] [--time-shape ...]

Every case is ``jit(value_and_grad(mean loss))``. The "jxent" columns are the sharded
program: the fused linear loss with ``w`` split over the vocabulary
(``jxent.parallel.linear_softmax_cross_entropy`` in ``shard_map``, tokens split over
``data``), or the categorical loss with the logits sharded ``P("data", "model")``. The
"baseline" columns are the same loss unsharded on one device. Memory is XLA's compiled
temporary memory per device (``memory_analysis()`` of the partitioned program, lowered
from ``ShapeDtypeStruct``s: nothing is allocated) at the memory shape; ``main()`` also
prints the per-device arguments and outputs (``x``/``w``/logits and their gradients),
where most of the saving is. Time is the median of interleaved calls at a small shape;
simulated CPU devices share the same cores, so the sharded time is no speed-up figure.
"""

from __future__ import annotations

import argparse
import os
import sys
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
from benchmarks.common import MiB, Row, environment, markdown_table, median_times  # noqa: E402

#: (tokens, hidden, vocabulary): Llama 3's output layer over 8192 tokens.
MEMORY_SHAPE = (8192, 4096, 128256)
TIME_SHAPE = (1024, 256, 8192)
#: (name, kind, mesh shape): kind "linear" (fused, shard_map) or "logits" (jit, GSPMD);
#: a 1-D mesh is a "model" axis alone (tensor parallel), a 2-D one ("data", "model").
CASES = (
    ("fused linear, w over 8 devices", "linear", (8,)),
    ("fused linear, 2x4 (data x model)", "linear", (2, 4)),
    ("integer labels, logits 2x4 (jit)", "logits", (2, 4)),
)


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
        "temp": stats.temp_size_in_bytes / MiB,
        "io": (stats.argument_size_in_bytes + stats.output_size_in_bytes) / MiB,
    }


def _arrays(kind, shape, dtype, shards):
    """Unsharded and padded arguments for the timing."""
    n, d, v = shape
    kx, kw, ky = jax.random.split(jax.random.key(0), 3)
    y = jax.random.randint(ky, (n,), 0, v)
    if kind == "linear":
        x = jax.random.normal(kx, (n, d), dtype)
        w = (jax.random.normal(kw, (d, v)) / d**0.5).astype(dtype)
        return (x, w, y), (x, jnp.pad(w, ((0, 0), (0, _padded(v, shards) - v))), y)
    logits = (3 * jax.random.normal(kx, (n, v))).astype(dtype)
    return (logits, y), (jnp.pad(logits, ((0, 0), (0, _padded(v, shards) - v))), y)


def measure(name, kind, mesh_shape, dtype, memory_shape, time_shape, repeats):
    """One case: ``(Row, per-device MiB of arguments + outputs, sharded and unsharded)``."""
    shards = mesh_shape[-1]
    argnums = (0, 1) if kind == "linear" else 0
    mesh = _mesh(mesh_shape)
    sharded, single, specs = _programs(kind, mesh, memory_shape[2])
    with jax.set_mesh(mesh):
        mem = _memory(sharded, _structs(kind, memory_shape, dtype, mesh, specs, shards), argnums)
    base = _memory(single, _structs(kind, memory_shape, dtype), argnums)

    sharded, single, specs = _programs(kind, mesh, time_shape[2])
    plain, padded = _arrays(kind, time_shape, dtype, shards)
    padded = [jax.device_put(a, NamedSharding(mesh, p)) for a, p in zip(padded, specs, strict=True)]
    step = lambda fn: jax.value_and_grad(fn, argnums=argnums)  # noqa: E731
    with jax.set_mesh(mesh):
        t_sharded = median_times({"s": step(sharded)}, padded, repeats=repeats)["s"]
    t_single = median_times({"u": step(single)}, plain, repeats=repeats)["u"]
    n, d, v = memory_shape
    row = Row(
        case=name,
        dtype=jnp.dtype(dtype).name,
        shape=f"{n}x{d}x{v}" if kind == "linear" else f"{n}x{v}",
        jxent_ms=1e3 * t_sharded,
        baseline_ms=1e3 * t_single,
        jxent_temp_mib=mem["temp"],
        baseline_temp_mib=base["temp"],
        baseline="1 device",
    )
    return row, mem["io"], base["io"]


def run(
    memory_shape=MEMORY_SHAPE,
    time_shape=TIME_SHAPE,
    repeats: int = 3,
    dtypes=(jnp.float32, jnp.bfloat16),
    progress=None,
    details: list | None = None,
) -> list[Row]:
    """Rows of per-device compiled temporary memory (and time), sharded vs one device.

    The categorical case uses a quarter of the memory shape's tokens (its unsharded
    logits would otherwise be 4 GiB). ``details``, if given, receives per case the
    per-device MiB of arguments + outputs, sharded and unsharded.
    """
    if jax.device_count() < 8:
        raise RuntimeError(
            f"bench_parallel needs 8 devices, found {jax.device_count()}; on a CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting Python."
        )
    rows = []
    for dtype in dtypes:
        for name, kind, mesh_shape in CASES:
            n, d, v = memory_shape
            shape = memory_shape if kind == "linear" else (n // 4, d, v)
            row, io, base_io = measure(name, kind, mesh_shape, dtype, shape, time_shape, repeats)
            rows.append(row)
            if details is not None:
                details.append((row, io, base_io))
            if progress is not None:
                progress()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-shape", default=",".join(map(str, MEMORY_SHAPE)))
    parser.add_argument("--time-shape", default=",".join(map(str, TIME_SHAPE)))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    details: list = []
    rows = run(shape(args.memory_shape), shape(args.time_shape), args.repeats, details=details)
    print(environment())
    print(markdown_table(rows))
    print("| case | dtype | per-device arguments + outputs MiB | on one device MiB |")
    print("|---|---|---:|---:|")
    for row, io, base_io in details:
        print(f"| {row.case} | {row.dtype} | {io:.1f} | {base_io:.1f} |")


if __name__ == "__main__":
    main()
