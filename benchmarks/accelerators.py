"""The fused loss compiled for accelerators without a device: memory, cost and a roofline.

    python -m benchmarks.accelerators [--target tpu-v5e|tpu-v6e] [--out DIR]

XLA compiles for a TPU on a CPU-only machine (``pip install "jax[tpu]==<jax version>"``,
which the test extra installs on Linux x86-64). For each shape (Gemma-2's and Llama-3's
output layers, and 4096 x 1024 x 32000) and dtype, ``jax.jit(jax.value_and_grad(mean
loss, argnums=(0, 1)))`` is compiled for jxent's fused loss and for ``x @ w`` + optax,
and the compiled program's ``memory_analysis()`` (temporary and output bytes) and
``cost_analysis()`` (flops, bytes accessed) are recorded. These are compile-time facts,
exact and machine-independent, except that XLA's cost analysis counts the body of a
loop once, whatever its trip count: for the fused loss (a loop over blocks) its flops
and bytes are those of one block. **Nothing runs, and the roofline column is an
estimate, not a timing**: the matrix products' flops (``2 N D V`` each: three for the
unfused loss and the fused single pass, four for the fused streaming schedule, which
recomputes the logits) over the peak below (bfloat16 matrix peak; jxent's float32
products run at ``HIGHEST``, six bfloat16 passes on a TPU, so their peak is taken as a
sixth; the unfused float32 ``x @ w`` runs at JAX's default precision, one pass). At
these shapes every contender is compute-bound (``D`` multiply-adds per logit).

Writes the record ``<out>/accelerators_<target>.json`` (``<out>`` defaults to
``benchmarks/results``; ``python -m benchmarks.tables`` puts it in
benchmarks/README.md). The unfused contender is ``x @ w`` in the inputs' dtype, then
optax's loss, as an optax user writes it. Only one process may hold libtpu at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import command_line, finish_record, start_record

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]

#: Peak bfloat16 matrix throughput (FLOP/s) and HBM bandwidth (B/s) per chip, with sources.
PEAKS = {
    "tpu-v5e": {
        "topology": "v5e=1x1",
        "flops": 197e12,
        "bandwidth": 819e9,
        "source": "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 819 GB/s HBM)",
    },
    "tpu-v6e": {
        "topology": "v6e=1x1",
        "flops": 918e12,
        "bandwidth": 1640e9,
        "source": "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 1640 GB/s HBM)",
    },
}

SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
    "4096x1024x32000": (4096, 1024, 32000),
}


def _products(name: str, n: int, d: int, v: int) -> int:
    """How many ``[N, D] x [D, V]`` products a contender runs (see the module docstring)."""
    if name != "jxent":
        return 3
    from jxent._fused import plan

    return 3 if plan.plans(n, d, v, "mean", None, 4)[1] else 4


def _contenders():
    import optax

    import jxent

    def fused(x, w, y):
        return jxent.linear_softmax_cross_entropy(x, w, y)

    def unfused(x, w, y):
        # As an optax user writes it: the logits in the inputs' dtype.
        return optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

    return {"jxent": fused, "x @ w + optax": unfused}


def measure(target: str) -> list[dict]:
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    peak = PEAKS[target]
    topo = topologies.get_topology_desc(peak["topology"], "tpu", chips_per_host_bounds=(1, 1, 1))
    mesh = topologies.make_mesh(topo, (1,), ("d",))
    spec = NamedSharding(mesh, P())
    rows = []
    for shape_name, (n, d, v) in SHAPES.items():
        for dtype in (jnp.bfloat16, jnp.float32):
            args = tuple(
                jax.ShapeDtypeStruct(s, dt, sharding=spec)
                for s, dt in (((n, d), dtype), ((d, v), dtype), ((n,), jnp.int32))
            )
            for name, fn in _contenders().items():
                grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
                compiled = grad.lower(*args).compile()
                mem = compiled.memory_analysis()
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                flops = float(cost.get("flops", 0.0))
                moved = float(cost.get("bytes accessed", 0.0))
                # jxent's float32 products run at HIGHEST (six bf16 passes on a TPU); the
                # unfused x @ w at JAX's default precision (one bf16 pass).
                highest = dtype == jnp.float32 and name == "jxent"
                flop_peak = peak["flops"] / (6 if highest else 1)
                matmul_flops = _products(name, n, d, v) * 2 * n * d * v
                rows.append(
                    {
                        "target": target,
                        "shape_name": shape_name,
                        "shape": f"{n}x{d}x{v}",
                        "dtype": jnp.dtype(dtype).name,
                        "contender": name,
                        "temp_mib": mem.temp_size_in_bytes / MiB,
                        "output_mib": mem.output_size_in_bytes / MiB,
                        "xla_gflops": flops / 1e9,
                        "xla_gbytes_accessed": moved / 1e9,
                        "matmul_gflops": matmul_flops / 1e9,
                        "roofline_ms": 1e3 * matmul_flops / flop_peak,
                    }
                )
                print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(PEAKS), default="tpu-v5e")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    record = start_record(command_line("benchmarks.accelerators", argv), "accelerators", {})
    started = time.perf_counter()
    record["peaks"] = PEAKS[args.target]
    record["rows"] = measure(args.target)
    finish_record(record, started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"accelerators_{args.target}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}; `python -m benchmarks.tables` puts it in benchmarks/README.md")


if __name__ == "__main__":
    main()
