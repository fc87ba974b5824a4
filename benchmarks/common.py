"""Shared measurement helpers: timing medians, compiled memory, tables, environment.

Every comparison is measured in one process, interleaving the contenders, so the
ratios are taken under the same machine load. Memory is XLA's compiled
``temp_size_in_bytes``: exact and machine-independent.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

MiB = 2**20


def compiled_temp_bytes(fn: Callable, *args) -> int:
    """Temporary memory XLA allocates for ``jit(fn)(*args)`` (args may be ShapeDtypeStructs)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def median_times(fns: dict[str, Callable], args: Sequence, repeats: int = 7, warmup: int = 2):
    """Median wall time per call of each jitted function, interleaved round by round."""
    jitted = {name: jax.jit(fn) for name, fn in fns.items()}
    for fn in jitted.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in jitted}
    order = list(jitted.items())
    for round_ in range(repeats):
        # Every other round in reverse: each contender runs as often first as last,
        # so neither always inherits the other's freed buffers (worth a few percent).
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(ts)) for name, ts in samples.items()}


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device, where the backend reports it (GPU/TPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def environment() -> dict[str, str]:
    import jxent

    versions = {"jax": jax.__version__, "jxent": jxent.__version__}
    for name in ("jaxlib", "optax", "flax"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": str(jax.device_count()),
        "cpu": platform.processor() or platform.machine(),
        **versions,
    }


@dataclasses.dataclass
class Row:
    """One comparison: a case measured for jxent and a baseline in the same run."""

    case: str
    dtype: str
    shape: str
    jxent_ms: float
    baseline_ms: float
    jxent_temp_mib: float
    baseline_temp_mib: float
    baseline: str = "optax"

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.jxent_ms

    @property
    def memory_ratio(self) -> float:
        return self.jxent_temp_mib / max(self.baseline_temp_mib, 1e-9)

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "speedup": self.speedup,
            "memory_ratio": self.memory_ratio,
        }


def markdown_table(rows: Sequence[Row]) -> str:
    head = (
        "| case | dtype | shape | jxent ms | baseline ms | speed-up | jxent temp MiB "
        "| baseline temp MiB | memory ratio |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r.case} | {r.dtype} | {r.shape} | {r.jxent_ms:.1f} | {r.baseline_ms:.1f} "
        f"({r.baseline}) | {r.speedup:.2f}x | {r.jxent_temp_mib:.1f} | {r.baseline_temp_mib:.1f} "
        f"| {r.memory_ratio:.3f} |\n"
        for r in rows
    )
    return head + body


def compare(
    case: str,
    jxent_fn: Callable,
    baseline_fn: Callable,
    args: Sequence,
    *,
    shape: str,
    repeats: int = 7,
    baseline: str = "optax",
) -> Row:
    """Times and measures ``jxent_fn`` against ``baseline_fn`` on the same arguments."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    times = median_times({"jxent": jxent_fn, "baseline": baseline_fn}, args, repeats=repeats)
    dtype = str(args[0].dtype)
    return Row(
        case=case,
        dtype=dtype,
        shape=shape,
        jxent_ms=1e3 * times["jxent"],
        baseline_ms=1e3 * times["baseline"],
        jxent_temp_mib=compiled_temp_bytes(jxent_fn, *specs) / MiB,
        baseline_temp_mib=compiled_temp_bytes(baseline_fn, *specs) / MiB,
        baseline=baseline,
    )


def suite_main(run: Callable[..., Sequence[Row]], description: str) -> None:
    """The command line of a single suite: ``--rows``, ``--classes``, ``--repeats``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(environment())
    print(markdown_table(run(args.rows, args.classes, args.repeats)))
