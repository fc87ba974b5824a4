"""Shared measurement helpers: timing medians, compiled memory, the record of a run.

Every comparison is measured in one process, interleaving the contenders, so the
ratios are taken under the same machine load. Memory is XLA's compiled
``temp_size_in_bytes`` (and ``output_size_in_bytes``): exact, and independent of the
machine's load.

Every results file (``benchmarks/results/<backend>_<suite>.json``) is a *record*: the
command that wrote it, the date, the environment (Python and package versions), the
machine (CPU model, the instruction-set flags that decide XLA:CPU's kernels, the
``XLA_FLAGS`` in force) and the load average at the start and the end of the run, so
that a reader can judge both where a ratio holds and how noisy it was.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import jax
import numpy as np

MiB = 2**20

#: /proc/cpuinfo flags that decide which XLA:CPU kernels run (bfloat16 products in
#: particular): AVX2, AVX-512, AVX-512 BF16 and Intel AMX.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")

#: Packages whose versions every record carries (absent ones are left out).
PACKAGES = ("jax", "jaxlib", "jxent", "optax", "numpy", "jax-cce", "tokamax", "matplotlib")


def compiled_memory(fn: Callable, *args) -> dict[str, float]:
    """MiB of temporaries and of outputs XLA allocates for ``jit(fn)(*args)``
    (``args`` may be ``ShapeDtypeStruct``s: nothing is allocated)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {
        "temp_mib": stats.temp_size_in_bytes / MiB,
        "output_mib": stats.output_size_in_bytes / MiB,
    }


def compiled_temp_bytes(fn: Callable, *args) -> int:
    """Temporary memory XLA allocates for ``jit(fn)(*args)`` (args may be ShapeDtypeStructs)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def specs_of(args: Sequence) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]


def median_times(
    fns: dict[str, Callable],
    args: Sequence | dict[str, Sequence],
    repeats: int = 7,
    warmup: int = 2,
) -> dict[str, float]:
    """Median wall time (seconds) per call of each jitted function, interleaved round by
    round. ``args`` is shared, or a dict giving each contender its own arguments (a peer
    whose weight layout differs gets its own layout, prepared outside the timing)."""
    jitted = {name: jax.jit(fn) for name, fn in fns.items()}
    own = args if isinstance(args, dict) else dict.fromkeys(fns, args)
    for name, fn in jitted.items():
        for _ in range(warmup):
            jax.block_until_ready(fn(*own[name]))
    samples: dict[str, list[float]] = {name: [] for name in jitted}
    order = list(jitted.items())
    for round_ in range(repeats):
        # Every other round in reverse: each contender runs as often first as last,
        # so none always inherits another's freed buffers (worth a few percent).
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(fn(*own[name]))
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(ts)) for name, ts in samples.items()}


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device, where the backend reports it (GPU/TPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> dict[str, str | bool]:
    """The commit of the jxent that was imported, and whether its tree had changes."""
    import subprocess

    import jxent

    src = os.path.dirname(os.path.dirname(os.path.abspath(jxent.__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", src, "status", "--porcelain", "--", "jxent"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"jxent_commit": commit, "jxent_modified": bool(dirty)}


def environment() -> dict[str, str]:
    """Python, package versions, the jxent commit and the JAX backend."""
    device = jax.devices()[0]
    env = {"python": platform.python_version()}
    env |= {name: v for name in PACKAGES if (v := _version(name)) is not None}
    env |= _git_state()
    env |= {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
    }
    return env


def machine() -> dict:
    """The CPU model, core count, relevant instruction-set flags and XLA flags."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), "x86_64"):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the model from platform, no flags
        pass
    xla_flags = os.environ.get("XLA_FLAGS", "")
    isa = {f: f in flags for f in ISA_FLAGS}
    isa["amx"] = any(f.startswith("amx") for f in flags)
    limit = [f.split("=", 1)[1] for f in xla_flags.split() if f.startswith("--xla_cpu_max_isa=")]
    return {
        "cpu": model,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "isa_flags": isa,
        "xla_cpu_max_isa": limit[-1] if limit else None,
        "xla_flags": xla_flags,
        "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
    }


def machine_summary(m: dict) -> str:
    """One line for a table caption, e.g. ``AMD EPYC, 2 cores, AVX-512 + BF16, no AMX``."""
    f = m.get("isa_flags", {})
    if f.get("avx512f"):
        isa = "AVX-512" + (" + BF16" if f.get("avx512_bf16") else " (no BF16)")
    elif f.get("avx2"):
        isa = "AVX2 (no AVX-512)"
    else:
        isa = "no AVX2"
    isa += ", AMX" if f.get("amx") else ", no AMX"
    if m.get("xla_cpu_max_isa"):
        isa += f"; XLA limited to {m['xla_cpu_max_isa']} (--xla_cpu_max_isa)"
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {isa}"


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command as a reader would type it, with the environment variables that matter."""
    env = [
        f"{k}={shlex.quote(os.environ[k])}"
        for k in ("JAX_PLATFORMS", "XLA_FLAGS")
        if os.environ.get(k)
    ]
    return " ".join([*env, "python", "-m", module, *map(shlex.quote, argv)])


def start_record(command: str, suite: str, config: dict) -> dict:
    """The header of a results file, taken before the first measurement."""
    return {
        "suite": suite,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "machine": machine(),
        "load": {"loadavg_start": list(os.getloadavg())},
        "config": config,
        "skipped": [],
        "rows": [],
    }


def finish_record(record: dict, started: float) -> dict:
    record["load"]["loadavg_end"] = list(os.getloadavg())
    record["load"]["seconds"] = round(time.perf_counter() - started, 1)
    return record


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def measure(
    fns: dict[str, Callable],
    args: Sequence | dict[str, Sequence],
    *,
    repeats: int,
    timed: bool = True,
) -> dict[str, dict]:
    """Per contender: median ms (if ``timed``) and compiled temporary and output MiB."""
    own = args if isinstance(args, dict) else dict.fromkeys(fns, args)
    out = {name: compiled_memory(fn, *specs_of(own[name])) for name, fn in fns.items()}
    if timed:
        for name, t in median_times(fns, own, repeats=repeats).items():
            out[name] = {"ms": 1e3 * t, **out[name]}
    return out


def row(case: str, dtype, shape: Sequence[int], contenders: dict, baseline: str, **extra) -> dict:
    """One measured case: every contender's numbers side by side.

    ``shape`` is what was measured (rows x classes, or tokens x hidden x vocabulary);
    ``vocab`` (its last entry) is the x axis of the plots; ``baseline`` names the
    contender the speed-up and memory ratio are taken against.
    """
    return {
        "case": case,
        "dtype": np.dtype(dtype).name if not isinstance(dtype, str) else dtype,
        "shape": "x".join(map(str, shape)),
        "vocab": int(shape[-1]),
        "baseline": baseline,
        **extra,
        "contenders": contenders,
    }
