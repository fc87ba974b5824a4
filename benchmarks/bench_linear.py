"""Fused linear cross-entropy: jxent, the unfused ``x @ w`` + optax, and the JAX peers.

Every contender computes the mean cross-entropy of ``x @ w`` over integer labels, and
every case is ``jit(value_and_grad(loss, argnums=(0, 1)))`` (gradients with respect to
the hidden states and the weight):

- ``jxent``: ``jxent.linear_softmax_cross_entropy(x, w, y)``;
- ``optax``: ``optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()``,
  as an optax user writes it (the logits in the inputs' dtype);
- ``jax-cce``: ``jax_cce.linear_cross_entropy(x, w_t, y)``, given its own ``[V, D]``
  weight (prepared outside the timing; it has no ignore handling, none is used);
- ``tokamax xla`` and ``tokamax chunked_xla``:
  ``tokamax.linear_softmax_cross_entropy_loss(x, y, w, reduction="mean",
  implementation=...)``. ``chunked_xla`` (tokamax >= 0.0.17: Python >= 3.12, jax >=
  0.11.1) pads the vocabulary to a multiple of 2048 with zero columns that it does not
  mask, so its loss is wrong when ``V`` is not such a multiple: the error column
  shows it.

A peer that is not installed (``pip install -e ".[bench]"``) or lacks an
implementation is skipped, with the reason recorded in the results and printed in the
table. For each case: median time (interleaved calls), XLA's compiled temporary and
output memory (lowered from ``ShapeDtypeStruct``s: nothing is allocated, so the
Gemma-2 and Llama-3 shapes are measured on any machine), and the relative error of
the loss and of the gradients against a float64 NumPy reference computed from the same
(rounded) inputs.

    python -m benchmarks.bench_linear                                   # the suite
    python -m benchmarks.bench_linear --time-shape 4096,1024,32000 --dtypes bfloat16 \\
        --memory-shapes none --contenders jxent,optax --out FILE.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/bench_linear.py`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jxent  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MiB,
    command_line,
    compiled_memory,
    eprint,
    finish_record,
    median_times,
    row,
    start_record,
)

SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
    "small": (4096, 1024, 32000),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Contender:
    """A fused-loss implementation: ``loss(x, w_in, y)`` with ``w_in`` in its layout."""

    name: str
    loss: Callable
    layout: str = "DV"  # "VD": the peer takes the weight as [V, D]

    def weight(self, w):
        return w.T if self.layout == "VD" else w

    def weight_shape(self, d: int, v: int) -> tuple[int, int]:
        return (v, d) if self.layout == "VD" else (d, v)


def _jxent(x, w, y):
    return jxent.linear_softmax_cross_entropy(x, w, y)


def _optax(x, w, y):
    return optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()


def contenders(names=None) -> tuple[list[Contender], list[dict]]:
    """The contenders importable here, and ``{"contender", "reason"}`` for the others."""
    out = [Contender("jxent", _jxent), Contender("optax", _optax)]
    skipped = []
    try:
        import jax_cce

        out.append(
            Contender("jax-cce", lambda x, w_t, y: jax_cce.linear_cross_entropy(x, w_t, y), "VD")
        )
    except ImportError as e:
        skipped.append({"contender": "jax-cce", "reason": f"not installed ({e})"})
    try:
        import tokamax
    except ImportError as e:
        for impl in ("xla", "chunked_xla"):
            skipped.append({"contender": f"tokamax {impl}", "reason": f"not installed ({e})"})
    else:
        from importlib.metadata import version

        from absl import flags

        # tokamax reads absl flags, which would parse this process's own command line.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        for impl in ("xla", "chunked_xla"):

            def loss(x, w, y, impl=impl):
                return tokamax.linear_softmax_cross_entropy_loss(
                    x, y, w, reduction="mean", implementation=impl
                )

            probe = (
                jax.ShapeDtypeStruct((8, 8), jnp.float32),
                jax.ShapeDtypeStruct((8, 256), jnp.float32),
                jax.ShapeDtypeStruct((8,), jnp.int32),
            )
            try:
                jax.eval_shape(loss, *probe)
            except Exception as e:  # an implementation this version lacks
                reason = f"tokamax {version('tokamax')} cannot run it: {type(e).__name__}: {e}"
                if impl == "chunked_xla":
                    reason += (
                        " (chunked_xla is in tokamax >= 0.0.17, which needs Python >= 3.12 "
                        f"and jax >= 0.11.1; here Python {sys.version.split()[0]}, "
                        f"jax {jax.__version__})"
                    )
                skipped.append({"contender": f"tokamax {impl}", "reason": reason})
            else:
                out.append(Contender(f"tokamax {impl}", loss))
    if names is not None:
        out = [c for c in out if c.name in names]
        skipped = [s for s in skipped if s["contender"] in names]
    return out, skipped


def _step(loss):
    return jax.value_and_grad(loss, argnums=(0, 1))


def _specs(c: Contender, shape, dtype):
    n, d, v = shape
    return (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct(c.weight_shape(d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )


def _inputs(shape, dtype, seed=0):
    n, d, v = shape
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v)
    return x, w, y


def reference(x, w, y, block: int = 8192):
    """Loss, dx and dw of the mean cross-entropy in float64 (NumPy), in vocabulary
    blocks (two passes: the log-sum-exp, then the gradients)."""
    x, w, y = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(y)
    n, v = x.shape[0], w.shape[1]
    m = np.full(n, -np.inf)
    s = np.zeros(n)
    picked = np.einsum("nd,dn->n", x, w[:, y])
    for lo in range(0, v, block):
        z = x @ w[:, lo : lo + block]
        m_new = np.maximum(m, z.max(axis=1))
        s = s * np.exp(m - m_new) + np.exp(z - m_new[:, None]).sum(axis=1)
        m = m_new
    lse = m + np.log(s)
    loss = float(np.mean(lse - picked))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for lo in range(0, v, block):
        z = x @ w[:, lo : lo + block]
        dz = np.exp(z - lse[:, None])
        cols = (y >= lo) & (y < lo + block)
        dz[np.flatnonzero(cols), y[cols] - lo] -= 1.0
        dz /= n
        dx += dz @ w[:, lo : lo + block].T
        dw[:, lo : lo + block] = x.T @ dz
    return loss, dx, dw


def _errors(c: Contender, out, ref) -> dict[str, float]:
    loss, (dx, dw) = out
    ref_loss, ref_dx, ref_dw = ref
    dw = np.asarray(dw, np.float64)
    if c.layout == "VD":
        dw = dw.T

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))

    return {
        "loss_rel_error": abs(float(loss) - ref_loss) / abs(ref_loss),
        "grad_rel_error": max(rel(dx, ref_dx), rel(dw, ref_dw)),
    }


def memory_rows(cs: list[Contender], shapes: dict, dtypes) -> list[dict]:
    """Compiled temporary and output memory of every contender (nothing is allocated)."""
    rows = []
    for name, shape in shapes.items():
        for dtype_name in dtypes:
            got = {
                c.name: compiled_memory(_step(c.loss), *_specs(c, shape, DTYPES[dtype_name]))
                for c in cs
            }
            rows.append(row(name, dtype_name, shape, got, "optax", kind="memory"))
    return rows


_PEAK_CHILD = """
import json, sys
import jax
from benchmarks import bench_linear as b
name, shape, dtype = sys.argv[1], tuple(map(int, sys.argv[2].split(","))), sys.argv[3]
(c,), _ = b.contenders([name])
x, w, y = b._inputs(shape, b.DTYPES[dtype])
jax.block_until_ready(jax.jit(b._step(c.loss))(x, c.weight(w), y))
stats = jax.devices()[0].memory_stats() or {}
print(json.dumps(stats.get("peak_bytes_in_use")))
"""


def _peak_mib(name: str, shape, dtype_name: str) -> float | None:
    """Peak device memory of one step, in a fresh process (the peak is per process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, name, ",".join(map(str, shape)), dtype_name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        eprint(f"peak memory of {name} {dtype_name} failed: {lines[-1]}")
        return None
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return None if peak is None else peak / MiB


def time_rows(cs: list[Contender], shape, dtypes, repeats: int, errors: bool = True):
    """Median time, compiled memory and error against float64 of every contender."""
    rows = []
    peak = jax.default_backend() != "cpu"
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        x, w, y = _inputs(shape, dtype)
        own = {c.name: (x, c.weight(w), y) for c in cs}
        steps = {c.name: _step(c.loss) for c in cs}
        times = median_times(steps, own, repeats=repeats)
        ref = reference(x, w, y) if errors else None
        got = {}
        for c in cs:
            got[c.name] = {
                "ms": 1e3 * times[c.name],
                **compiled_memory(steps[c.name], *_specs(c, shape, dtype)),
            }
            if errors:
                out = jax.block_until_ready(jax.jit(steps[c.name])(*own[c.name]))
                got[c.name] |= _errors(c, out, ref)
            if peak:
                got[c.name]["peak_mib"] = _peak_mib(c.name, shape, dtype_name)
        rows.append(row("timed step", dtype_name, shape, got, "optax", kind="time"))
    return rows


def run(
    time_shapes=(),
    memory_shapes=("gemma2", "llama3"),
    dtypes=("float32", "bfloat16"),
    repeats: int = 5,
    names=None,
    errors: bool = True,
    progress=None,
) -> tuple[list[dict], list[dict]]:
    """``(rows, skipped)``: memory rows at the named model shapes, then a time row per
    shape in ``time_shapes`` and dtype; ``skipped`` lists the contenders not run."""
    cs, skipped = contenders(names)
    rows = memory_rows(cs, {k: SHAPES[k] for k in memory_shapes}, dtypes)
    if progress is not None:
        progress()
    for shape in time_shapes:
        rows += time_rows(cs, tuple(shape), dtypes, repeats, errors)
        if progress is not None:
            progress()
    return rows, skipped


def _shape_arg(text: str):
    if text in SHAPES:
        return [SHAPES[text]]
    if text.lower() == "none":
        return []
    return [tuple(int(t) for t in part.split(",")) for part in text.split(";")]


def main(argv=None) -> None:
    """A one-off measurement, e.g. at the issue's 4096 x 1024 x 32000 shape. The suite
    itself (shapes as in ``benchmarks/run.py``) is ``python -m benchmarks --only linear``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--time-shape",
        type=_shape_arg,
        default=[SHAPES["small"]],
        help="N,D,V[;N,D,V...] (or gemma2/llama3/small, or none) of the timed step",
    )
    parser.add_argument(
        "--memory-shapes",
        default="gemma2,llama3",
        help="comma-separated names out of gemma2,llama3,small for compiled memory, or none",
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--contenders", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--no-errors", action="store_true", help="skip the float64 reference")
    parser.add_argument("--out", type=Path, default=None, help="write the record as JSON here")
    args = parser.parse_args(argv)
    memory_shapes = () if args.memory_shapes == "none" else tuple(args.memory_shapes.split(","))
    unknown = [s for s in memory_shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    names = None if args.contenders is None else args.contenders.split(",")
    dtypes = tuple(args.dtypes.split(","))
    config = {
        "time_shapes": [list(s) for s in args.time_shape],
        "memory_shapes": {k: list(SHAPES[k]) for k in memory_shapes},
        "dtypes": list(dtypes),
        "repeats": args.repeats,
        "contenders": names,
    }
    argv = sys.argv[1:] if argv is None else list(argv)
    record = start_record(command_line("benchmarks.bench_linear", argv), "linear", config)
    started = time.perf_counter()
    rows, skipped = run(
        args.time_shape, memory_shapes, dtypes, args.repeats, names, not args.no_errors
    )
    record["rows"], record["skipped"] = rows, skipped
    finish_record(record, started)
    from benchmarks import tables

    print(tables.linear_time(record))
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
