"""Fused linear cross-entropy: jxent vs optax's unfused ``x @ w`` + cross-entropy.

Every case is ``jit(value_and_grad(mean loss, argnums=(0, 1)))`` (gradients w.r.t.
the hidden states and the weight). Memory is XLA's compiled temporary memory
(lowered from ``jax.ShapeDtypeStruct``: nothing is allocated), so the Gemma-2 and
Llama-3 shapes can be measured on any machine; time is the median of interleaved
calls (jxent and optax alternate) at a shape that fits the device. On a GPU the
timed shape defaults to Gemma-2's and the peak device memory of each contender is
reported too (measured in a fresh subprocess each, since the peak is per process).

    python benchmarks/bench_linear.py                     # CPU: memory at Gemma-2/Llama-3,
                                                          # time at 4096 x 1024 x 32000
    python benchmarks/bench_linear.py --time-shape 8192,2304,256000 --memory-shapes none
    python benchmarks/bench_linear.py --schedules          # also time each schedule forced
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/bench_linear.py`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jxent  # noqa: E402
from benchmarks.common import MiB, compiled_temp_bytes, environment, median_times  # noqa: E402

SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
    "small": (4096, 1024, 32000),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _loss_fns(chunk_size=None):
    def fused(x, w, y):
        return jxent.linear_softmax_cross_entropy(x, w, y, chunk_size=chunk_size)

    def unfused(x, w, y):
        return optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

    return fused, unfused


def _step(loss):
    return jax.value_and_grad(loss, argnums=(0, 1))


def _specs(shape, dtype):
    n, d, v = shape
    return (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )


def _inputs(shape, dtype, seed=0):
    n, d, v = shape
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v)
    return x, w, y


def _shape_str(shape) -> str:
    return "x".join(map(str, shape))


def memory_rows(shapes, dtypes) -> list[dict]:
    """Compiled temporary memory of jxent and optax (nothing is allocated)."""
    fused, unfused = _loss_fns()
    rows = []
    for name, shape in shapes.items():
        for dtype_name in dtypes:
            specs = _specs(shape, DTYPES[dtype_name])
            jx = compiled_temp_bytes(_step(fused), *specs) / MiB
            ox = compiled_temp_bytes(_step(unfused), *specs) / MiB
            rows.append(
                {
                    "kind": "memory",
                    "case": name,
                    "shape": _shape_str(shape),
                    "dtype": dtype_name,
                    "jxent_temp_mib": jx,
                    "baseline_temp_mib": ox,
                    "memory_ratio": jx / ox,
                    "baseline": "optax",
                }
            )
    return rows


_PEAK_CHILD = """
import json, sys
import jax
from benchmarks import bench_linear as b
which, shape, dtype = sys.argv[1], tuple(map(int, sys.argv[2].split(","))), sys.argv[3]
fused, unfused = b._loss_fns()
fn = jax.jit(b._step(fused if which == "jxent" else unfused))
args = b._inputs(shape, b.DTYPES[dtype])
jax.block_until_ready(fn(*args))
stats = jax.devices()[0].memory_stats() or {}
print(json.dumps(stats.get("peak_bytes_in_use")))
"""


def _peak_bytes(which: str, shape, dtype_name: str) -> int | None:
    """Peak device memory of one step, in a fresh process (the peak is per process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, which, ",".join(map(str, shape)), dtype_name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        print(f"peak memory of {which} {dtype_name} failed: {lines[-1]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_rows(shape, dtypes, repeats: int, schedules: bool = False, peak: bool = False):
    """Median time of jxent (default blocks, optionally each schedule forced) vs optax."""
    rows = []
    n, d, v = shape
    for dtype_name in dtypes:
        args = _inputs(shape, DTYPES[dtype_name])
        specs = _specs(shape, DTYPES[dtype_name])
        fused, unfused = _loss_fns()
        contenders = {"jxent": _step(fused)}
        if schedules:
            from jxent.linear.api import plan_blocks

            backend = jax.default_backend()
            tb, vb, _ = plan_blocks(n, d, v, "none", None, backend=backend)
            contenders[f"jxent streaming {tb}x{vb}"] = _step(_loss_fns((tb, vb))[0])
            tb1 = min(n, max(8, 2 * d))
            contenders[f"jxent single pass {tb1}x{v}"] = _step(_loss_fns((tb1, v))[0])
        contenders["optax"] = _step(unfused)
        times = median_times(contenders, args, repeats=repeats)
        base = times["optax"]
        for name, t in times.items():
            if name == "optax":
                continue
            row = {
                "kind": "time",
                "case": name,
                "shape": _shape_str(shape),
                "dtype": dtype_name,
                "jxent_ms": 1e3 * t,
                "baseline_ms": 1e3 * base,
                "speedup": base / t,
                "jxent_temp_mib": compiled_temp_bytes(contenders[name], *specs) / MiB,
                "baseline_temp_mib": compiled_temp_bytes(contenders["optax"], *specs) / MiB,
                "baseline": "optax",
            }
            if peak and name == "jxent":
                jx, ox = (
                    _peak_bytes("jxent", shape, dtype_name),
                    _peak_bytes("optax", shape, dtype_name),
                )
                row["jxent_peak_mib"] = None if jx is None else jx / MiB
                row["baseline_peak_mib"] = None if ox is None else ox / MiB
            rows.append(row)
    return rows


def run(
    time_shape=None,
    memory_shapes=("gemma2", "llama3"),
    dtypes=("float32", "bfloat16"),
    repeats: int = 5,
    schedules: bool = False,
    progress=None,
) -> list[dict]:
    """Every measurement as a list of dicts (``kind`` is "memory" or "time").

    ``time_shape`` defaults to Gemma-2's on an accelerator and to 4096 x 1024 x 32000
    on a CPU; ``None`` in ``memory_shapes`` or an empty tuple skips the memory rows.
    """
    on_cpu = jax.default_backend() == "cpu"
    if time_shape is None:
        time_shape = SHAPES["small"] if on_cpu else SHAPES["gemma2"]
    rows = memory_rows({k: SHAPES[k] for k in memory_shapes}, dtypes) if memory_shapes else []
    if progress is not None:
        progress()
    if time_shape:
        rows += time_rows(tuple(time_shape), dtypes, repeats, schedules, peak=not on_cpu)
    if progress is not None:
        progress()
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        out += [
            "Compiled temporary memory of `jit(value_and_grad(loss, argnums=(0, 1)))`:",
            "",
            "| shape | N x D x V | dtype | jxent MiB | optax MiB | jxent / optax |",
            "|---|---|---|---:|---:|---:|",
        ]
        out += [
            f"| {r['case']} | {r['shape']} | {r['dtype']} | {r['jxent_temp_mib']:.1f} "
            f"| {r['baseline_temp_mib']:.1f} | 1/{1 / r['memory_ratio']:.0f} |"
            for r in mem
        ]
        out.append("")
    tim = [r for r in rows if r["kind"] == "time"]
    if tim:
        peak = any("jxent_peak_mib" in r for r in tim)
        head = "| case | N x D x V | dtype | jxent ms | optax ms | optax / jxent | jxent temp MiB "
        head += "| optax temp MiB |"
        sep = "|---|---|---|---:|---:|---:|---:|---:|"
        if peak:
            head += " jxent peak MiB | optax peak MiB |"
            sep += "---:|---:|"
        out += ["Median time of the same step (interleaved runs):", "", head, sep]
        for r in tim:
            line = (
                f"| {r['case']} | {r['shape']} | {r['dtype']} | {r['jxent_ms']:.1f} "
                f"| {r['baseline_ms']:.1f} | {r['speedup']:.2f}x | {r['jxent_temp_mib']:.1f} "
                f"| {r['baseline_temp_mib']:.1f} |"
            )
            if peak:
                fmt = lambda b: "n/a" if b is None else f"{b:.0f}"  # noqa: E731
                line += f" {fmt(r.get('jxent_peak_mib'))} | {fmt(r.get('baseline_peak_mib'))} |"
            out.append(line)
    return "\n".join(out)


def _shape_arg(text: str):
    if text in SHAPES:
        return SHAPES[text]
    if text.lower() == "none":
        return ()
    return tuple(int(t) for t in text.split(","))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--time-shape",
        type=_shape_arg,
        default=None,
        help="N,D,V (or gemma2/llama3/small, or none) of the timed step; default: small on "
        "CPU, gemma2 on an accelerator",
    )
    parser.add_argument(
        "--memory-shapes",
        default="gemma2,llama3",
        help="comma-separated names out of gemma2,llama3,small for compiled memory, or none",
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--schedules", action="store_true", help="also time each schedule with forced blocks"
    )
    args = parser.parse_args(argv)
    memory_shapes = () if args.memory_shapes == "none" else tuple(args.memory_shapes.split(","))
    unknown = [s for s in memory_shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    rows = run(
        time_shape=args.time_shape,
        memory_shapes=memory_shapes,
        dtypes=tuple(args.dtypes.split(",")),
        repeats=args.repeats,
        schedules=args.schedules,
    )
    print(environment())
    print(markdown(rows))


if __name__ == "__main__":
    main()
