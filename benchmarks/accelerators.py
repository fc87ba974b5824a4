"""The fused loss compiled for accelerators without a device: memory, cost and a roofline.

    python -m benchmarks.accelerators [--target tpu-v5e|tpu-v6e] [--out DIR]

    # NVIDIA H100, in a separate virtual environment with JAX's CUDA plugin (so that the
    # plugin never loads in the test runs of the main one):
    python3.11 -m venv /work/venv-cuda
    /work/venv-cuda/bin/pip install "jax==0.10.2" "jaxlib==0.10.2" \
        "jax-cuda12-plugin[with-cuda]==0.10.2" optax numpy "jax-cce==0.1.0" "tokamax==0.0.12"
    /work/venv-cuda/bin/pip install --no-deps -e .
    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 XLA_FLAGS=--xla_gpu_autotune_level=0 \
        /work/venv-cuda/bin/python -m benchmarks.accelerators --target h100

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
recomputes the logits; ``jxent single pass`` is the same loss with
``schedule="single_pass"``, three products for a float32 ``[D, V]`` accumulator) over
the peak below (bfloat16 matrix peak: every contender's float32 products run at JAX's
default precision, one bfloat16 pass on a TPU; jxent rounds its blocks of ``w`` in the
loop, ``_backend.BFLOAT16_BLOCKS``). At
these shapes every contender is compute-bound (``D`` multiply-adds per logit).

**H100** (``--target h100``): XLA:GPU compiles for a device described by a
``GpuTargetConfigProto`` (:data:`H100_TARGET_CONFIG`, the fields of XLA's
``xla/backends/gpu/target_config/specs/h100_sxm.txtpb`` that jaxlib's proto knows) on a
compile-only PJRT topology of the CUDA plugin: ``JAX_PLATFORMS=cpu`` (no GPU backend is
started; the CUDA plugin still builds the topology), ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``
and ``XLA_FLAGS=--xla_gpu_autotune_level=0`` (autotuning needs a device; the module
sets both where unset). The compile-only executable has no cost analysis of its own, so
the flops and bytes are XLA's ``HloCostAnalysis`` (the CPU client's) over the
GPU-optimised HLO module, with the same loop-body caveat. Besides jxent and ``x @ w`` +
optax, this target compiles issue 13's baseline (the logits cast to float32 before
optax's loss) and the JAX peers where importable (``jax-cce``, with its own ``[V, D]``
weight, and tokamax's ``xla`` implementation; see ``benchmarks/bench_linear.py``); the
others are listed in the record's ``skipped``. jax-cce recomputes the logits in its
backward pass (four products) and multiplies float32 copies of bfloat16 inputs (its
roofline takes the TF32 peak in both dtypes). XLA:GPU multiplies float32 at JAX's
default precision in TF32 (one pass: ``IsTf32Allowed`` for a ``DEFAULT`` dot with no
algorithm, ``tensor_float_32_execution_enabled`` being on by default), and jxent's plan
keeps the default precision on GPU, so every float32 roofline takes H100's dense TF32
peak. Each H100 row also has a memory floor: the arguments read once, the outputs
written once and the temporaries written and read once, over the HBM bandwidth (a lower
bound on the traffic), and jxent's rows issue 13's floor of its temporary memory (a
float32 ``dx`` and one float32 logits block of the GPU plan).

Writes the record ``<out>/accelerators_<target>.json`` (``<out>`` defaults to
``benchmarks/results``; ``python -m benchmarks.tables`` puts it in
benchmarks/README.md). The unfused contender is ``x @ w`` in the inputs' dtype, then
optax's loss, as an optax user writes it. Only one process may hold libtpu at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import command_line, finish_record, start_record

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]

#: Peak bfloat16 matrix throughput (FLOP/s) and HBM bandwidth (B/s) per chip, with sources.
#: A GPU target also gives its platform and its float32 (TF32) matrix peak.
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
    "h100": {
        "platform": "cuda",
        "topology": "1x1x1",
        "device": "NVIDIA H100 80GB HBM3 (SXM5)",
        "flops": 989.4e12,
        "float32_flops": 494.7e12,
        "bandwidth": 3.35e12,
        "source": (
            "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM (989.4 TFLOP/s dense bf16, "
            "494.7 TFLOP/s dense TF32: half the sparse 1979/989 figures; 3.35 TB/s HBM3)"
        ),
    },
}

#: The H100 SXM as XLA:GPU's compiler sees it (a ``stream_executor.GpuTargetConfigProto``
#: in text form): the device fields of XLA's ``xla/backends/gpu/target_config/specs/
#: h100_sxm.txtpb``, with cuDNN 9.8 (jax-cuda12-plugin 0.10.2's minimum) and the CUDA
#: runtime 12.9 of the NVIDIA wheels it installs. What it decides: compute capability 9.0
#: (Hopper's emitters and Triton GEMMs), 132 SMs, the shared memory and register limits,
#: the L2 size and the bandwidth that XLA's cost model uses for fusion decisions.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
    "4096x1024x32000": (4096, 1024, 32000),
}

UNFUSED = "x @ w + optax"
UNFUSED_FLOAT32 = "(x @ w).astype(f32) + optax"
#: jxent with ``schedule="single_pass"``: three products for a float32 ``[D, V]``
#: accumulator, beside the default schedule (streaming at language-model shapes).
SINGLE_PASS = "jxent single pass"
#: jxent with ``implementation="pallas_tpu"`` (TPU targets): Pallas Mosaic kernels, five
#: products (forward, and the logits recomputed for dx and for dw), no HBM temporary.
PALLAS = "jxent pallas_tpu"


def _products(name: str, n: int, d: int, v: int) -> int:
    """How many ``[N, D] x [D, V]`` products a contender runs (see the module docstring;
    jax-cce recomputes the logits in its backward pass)."""
    if name == "jax-cce":
        return 4
    if name == PALLAS:
        return 5
    if name != "jxent":  # the unfused loss, jxent's single pass
        return 3
    from jxent._fused import plan

    return 3 if plan.plans(n, d, v, "mean", None, 4)[1] else 4


def _floor_mib(n: int, d: int, v: int, platform: str) -> float:
    """Issue 13's floor of jxent's temporary memory: the float32 ``dx`` accumulator
    (``N D`` floats) and one float32 logits block of ``platform``'s plan."""
    from jxent._fused import plan

    blocks = dict(plan.plans(n, d, v, "mean", None, 4)[0])[platform]
    return (n * d * 4 + blocks.token_block * blocks.vocab_block * 4) / MiB


def _contenders(peers: bool = False, tpu: bool = False) -> tuple[dict, list[dict]]:
    """``({name: (loss, weight_layout)}, skipped)``: jxent, the unfused loss, with ``tpu``
    jxent's Pallas kernels and, with ``peers``, the JAX peers importable here
    (``benchmarks.bench_linear.contenders``)."""
    import optax

    import jxent

    def fused(x, w, y):
        return jxent.linear_softmax_cross_entropy(x, w, y)

    def fused_single_pass(x, w, y):
        return jxent.linear_softmax_cross_entropy(x, w, y, schedule="single_pass")

    def unfused(x, w, y):
        # As an optax user writes it: the logits in the inputs' dtype.
        return optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

    def unfused_float32(x, w, y):
        # Issue 13's baseline: the logits cast to float32 before optax's loss.
        logits = (x @ w).astype(jnp.float32)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def fused_pallas(x, w, y):
        return jxent.linear_softmax_cross_entropy(x, w, y, implementation="pallas_tpu")

    out = {"jxent": (fused, "DV"), SINGLE_PASS: (fused_single_pass, "DV")}
    if tpu:
        out[PALLAS] = (fused_pallas, "DV")
    out[UNFUSED] = (unfused, "DV")
    if not peers:
        return out, []
    out[UNFUSED_FLOAT32] = (unfused_float32, "DV")
    from benchmarks import bench_linear

    names = ("jax-cce", "tokamax xla", "tokamax chunked_xla")
    found, skipped = bench_linear.contenders(names)
    out |= {c.name: (c.loss, c.layout) for c in found}
    return out, skipped


def _gpu_environment() -> None:
    """What a compile for a GPU without one needs, where the caller did not set it."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_autotune_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_autotune_level=0".strip()


def _topology(target: str):
    from jax.experimental import topologies

    peak = PEAKS[target]
    if peak.get("platform") == "cuda":
        return topologies.get_topology_desc(
            platform="cuda", topology=peak["topology"], target_config=H100_TARGET_CONFIG
        )
    return topologies.get_topology_desc(peak["topology"], "tpu", chips_per_host_bounds=(1, 1, 1))


def _cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program; for a compile-only GPU executable (which
    has none), the CPU client's ``HloCostAnalysis`` over the GPU-optimised HLO."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost:
        return cost
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    module = compiled.runtime_executable().hlo_modules()[0]
    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)


def measure(target: str, shapes=None, peers: bool = False) -> tuple[list[dict], list[dict]]:
    """``(rows, skipped)``: one row per shape, dtype and contender."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    peak = PEAKS[target]
    gpu = peak.get("platform") == "cuda"
    mesh = topologies.make_mesh(_topology(target), (1,), ("d",))
    spec = NamedSharding(mesh, P())
    contenders, skipped = _contenders(peers, tpu=not gpu)
    rows = []
    for shape_name, (n, d, v) in SHAPES.items():
        if shapes and shape_name not in shapes:
            continue
        for dtype in (jnp.bfloat16, jnp.float32):
            for name, (fn, layout) in contenders.items():
                w_shape = (v, d) if layout == "VD" else (d, v)
                args = tuple(
                    jax.ShapeDtypeStruct(s, dt, sharding=spec)
                    for s, dt in (((n, d), dtype), (w_shape, dtype), ((n,), jnp.int32))
                )
                grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
                started = time.perf_counter()
                compiled = grad.lower(*args).compile()
                seconds = time.perf_counter() - started
                mem = compiled.memory_analysis()
                cost = _cost(compiled)
                flops = float(cost.get("flops", 0.0))
                moved = float(cost.get("bytes accessed", 0.0))
                if gpu:
                    # XLA:GPU's float32 products at the default precision: one TF32 pass.
                    # jax-cce multiplies float32 copies of bfloat16 inputs.
                    float32 = dtype == jnp.float32 or name == "jax-cce"
                    flop_peak = peak["float32_flops"] if float32 else peak["flops"]
                else:
                    # Every float32 product at the default precision: one bf16 pass.
                    flop_peak = peak["flops"]
                matmul_flops = _products(name, n, d, v) * 2 * n * d * v
                row = {
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
                if gpu:
                    # A lower bound on HBM traffic: every argument read and every output
                    # written once, every temporary buffer written and read once.
                    moved_floor = (
                        mem.argument_size_in_bytes
                        + mem.output_size_in_bytes
                        + 2 * mem.temp_size_in_bytes
                    )
                    row["argument_mib"] = mem.argument_size_in_bytes / MiB
                    row["memory_floor_ms"] = 1e3 * moved_floor / peak["bandwidth"]
                    if name == "jxent":
                        row["floor_mib"] = _floor_mib(n, d, v, "default")
                    row["compile_s"] = round(seconds, 1)
                rows.append(row)
                print(rows[-1], flush=True)
    return rows, skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(PEAKS), default="tpu-v5e")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    gpu = PEAKS[args.target].get("platform") == "cuda"
    if gpu:
        _gpu_environment()
    record = start_record(command_line("benchmarks.accelerators", argv), "accelerators", {})
    started = time.perf_counter()
    record["peaks"] = PEAKS[args.target]
    if gpu:
        from importlib.metadata import version

        record["environment"]["jax-cuda12-plugin"] = version("jax-cuda12-plugin")
        record["target_config"] = H100_TARGET_CONFIG.strip()
        record["rows"], record["skipped"] = measure(args.target, peers=True)
    else:
        record["rows"] = measure(args.target)[0]
    finish_record(record, started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"accelerators_{args.target}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}; `python -m benchmarks.tables` puts it in benchmarks/README.md")


if __name__ == "__main__":
    main()
