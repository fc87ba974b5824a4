"""Runs the jxent benchmark suites and writes one results file and one figure per suite.

    python -m benchmarks [--quick] [--out DIR] [--only NAME[,NAME...]] [--rows N]
                         [--classes K[,K...]] [--repeats R]

Suites (``--only`` takes their names):

- ``categorical``: softmax cross-entropy against optax (``bench_categorical.py``);
- ``classification``: the same at classifiers' shapes, 256 to 65536 rows of 10 to 1000
  classes, in rounds (``bench_categorical.run_classification``);
- ``losses``: sigmoid BCE, focal, poly-1, KL, distillation and entropy against optax or,
  where optax has no such loss, the one-pass formula (``bench_losses.py``);
- ``linear``: the fused linear cross-entropy against ``x @ w`` + optax and the JAX peers
  that are installed (``bench_linear.py``);
- ``parallel``: per-device memory of the sharded losses on 8 simulated CPU devices
  (``bench_parallel.py``, in a subprocess with ``XLA_FLAGS`` set).

For each suite ``S`` on backend ``B`` it writes ``<out>/B_S.json`` (the record: command,
date, environment, machine, load average, configuration, skipped contenders and every
row; see ``benchmarks/common.py``) and ``<out>/B_S.png`` (time and memory against the
vocabulary size, every contender), and prints the suite's tables. ``<out>`` defaults to
``benchmarks/results``; after a run there, ``python -m benchmarks.tables`` puts the new
numbers into README.md and benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.common import command_line, finish_record, start_record  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Config:
    """Shapes and repeats of one run."""

    rows: int
    classes: tuple[int, ...]
    repeats: int
    quick: bool
    dtypes: tuple[str, ...]
    # The fused linear loss: (tokens, hidden, vocabulary) of the timed steps, and the
    # model shapes (bench_linear.SHAPES) whose compiled memory is measured.
    linear_time_shapes: tuple[tuple[int, int, int], ...]
    linear_memory_shapes: tuple[str, ...]
    linear_repeats: int
    # The sharded losses: tokens, hidden size and the vocabularies of the sweep.
    parallel_tokens: int
    parallel_hidden: int
    parallel_vocabs: tuple[int, ...]


def default_config(
    quick: bool,
    rows: int | None = None,
    repeats: int | None = None,
    classes: tuple[int, ...] | None = None,
) -> Config:
    both = ("float32", "bfloat16")
    if quick:
        tiny = ((64, 32, 512), (64, 32, 1000))
        return Config(
            rows or 32, classes or (256, 1024), repeats or 2, True, both,
            tiny, (), repeats or 2, 256, 64, (2048, 4000),
        )  # fmt: skip
    classes = classes or (1024, 8192, 32768, 131072)
    if jax.default_backend() == "cpu":
        # On 2 CPU cores: fewer rows and a smaller hidden size keep a run to minutes.
        # V 32000 (Llama 2) and 128256 (Llama 3) are real vocabularies, and no multiple
        # of 2048 (tokamax chunked_xla's padding shows in its error).
        linear = tuple((1024, 512, v) for v in (8192, 32000, 128256))
        return Config(
            rows or 1024, classes, repeats or 7, False, both,
            linear, ("gemma2", "llama3"), repeats or 5, 8192, 4096, (32000, 128256, 256000),
        )  # fmt: skip
    linear = tuple((8192, 2304, v) for v in (32000, 128256, 256000))
    return Config(
        rows or 4096, classes, repeats or 7, False, both,
        linear, ("gemma2", "llama3"), repeats or 5, 8192, 4096, (32000, 128256, 256000),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    module: str
    steps: Callable[[Config], int]  # progress-bar steps, known before running
    run: Callable[[Config, dict, Callable[[], None]], None]  # fills the record

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _sweep(name: str, module: str) -> Suite:
    """A suite whose ``run(rows, classes, repeats, progress, dtypes)`` is called per K."""

    def steps(cfg: Config) -> int:
        mod = importlib.import_module(module)
        return len(mod.CASES) * len(cfg.dtypes) * len(cfg.classes)

    def run(cfg: Config, record: dict, progress) -> None:
        import jax.numpy as jnp

        mod = importlib.import_module(module)
        dtypes = tuple(jnp.dtype(d) for d in cfg.dtypes)
        for k in cfg.classes:
            record["rows"] += mod.run(cfg.rows, k, cfg.repeats, progress, dtypes)

    return Suite(name, module, steps, run)


def _classification_shape(cfg: Config) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Rows, classes and rounds of the classification sweep (two small cells when quick)."""
    bc = importlib.import_module("benchmarks.bench_categorical")
    if cfg.quick:
        return (256,), (10, 100), 1
    return bc.CLASSIFICATION_ROWS, bc.CLASSIFICATION_CLASSES, 3


def _classification_steps(cfg: Config) -> int:
    bc = importlib.import_module("benchmarks.bench_categorical")
    rows, classes, _ = _classification_shape(cfg)
    return len(bc.CASES) * len(cfg.dtypes) * len(rows) * len(classes)


def _classification_run(cfg: Config, record: dict, progress) -> None:
    import jax.numpy as jnp

    bc = importlib.import_module("benchmarks.bench_categorical")
    rows, classes, rounds = _classification_shape(cfg)
    record["config"] |= {"rows": list(rows), "classes": list(classes), "rounds": rounds}
    dtypes = tuple(jnp.dtype(d) for d in cfg.dtypes)
    seconds = 0.05 if cfg.quick else 0.5
    record["rows"] += bc.run_classification(
        rows, classes, dtypes, rounds=rounds, round_seconds=seconds, progress=progress
    )


def _linear_steps(cfg: Config) -> int:
    return 1 + len(cfg.linear_time_shapes)


def _linear_run(cfg: Config, record: dict, progress) -> None:
    from benchmarks import bench_linear

    rows, skipped = bench_linear.run(
        cfg.linear_time_shapes,
        cfg.linear_memory_shapes,
        cfg.dtypes,
        cfg.linear_repeats,
        progress=progress,
    )
    record["rows"] += rows
    record["skipped"] += skipped


# Runs bench_parallel in a process with 8 simulated devices; reports progress on stdout.
_PARALLEL_CHILD = """
import json, sys
import jax.numpy as jnp
from benchmarks import bench_parallel
out, options = sys.argv[1], json.loads(sys.argv[2])
options["dtypes"] = tuple(jnp.dtype(d) for d in options["dtypes"])
rows = bench_parallel.run(progress=lambda: print("@@step", flush=True), **options)
with open(out, "w") as f:
    json.dump(rows, f)
"""


def _parallel_dtypes(cfg: Config) -> tuple[str, ...]:
    # A smoke test needs one dtype: each case compiles for 8 simulated devices.
    return cfg.dtypes[:1] if cfg.quick else cfg.dtypes


def _parallel_steps(cfg: Config) -> int:
    from benchmarks import bench_parallel

    return len(bench_parallel.CASES) * len(_parallel_dtypes(cfg)) * len(cfg.parallel_vocabs)


def _parallel_run(cfg: Config, record: dict, progress) -> None:
    """bench_parallel needs 8 devices: simulate them on the CPU in a fresh process
    (on any backend: the suite measures per-device memory of the partitioned program)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    options = {
        "tokens": cfg.parallel_tokens,
        "hidden": cfg.parallel_hidden,
        "vocabs": list(cfg.parallel_vocabs),
        "dtypes": list(_parallel_dtypes(cfg)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parallel.json"
        cmd = [sys.executable, "-c", _PARALLEL_CHILD, str(path), json.dumps(options)]
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if line.strip() == "@@step":
                    progress()
                else:
                    sys.stdout.write(line)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_parallel failed (exit {proc.returncode}); see above")
        record["rows"] += json.loads(path.read_text())
    record["machine"]["simulated_devices"] = 8


SUITES = {
    s.name: s
    for s in (
        _sweep("categorical", "benchmarks.bench_categorical"),
        Suite(
            "classification",
            "benchmarks.bench_categorical",
            _classification_steps,
            _classification_run,
        ),
        _sweep("losses", "benchmarks.bench_losses"),
        Suite("linear", "benchmarks.bench_linear", _linear_steps, _linear_run),
        Suite("parallel", "benchmarks.bench_parallel", _parallel_steps, _parallel_run),
    )
}

#: What each suite's record keeps of the configuration.
_CONFIG_KEYS = {
    "categorical": ("rows", "classes", "repeats", "dtypes"),
    "classification": ("dtypes",),
    "losses": ("rows", "classes", "repeats", "dtypes"),
    "linear": ("linear_time_shapes", "linear_memory_shapes", "linear_repeats", "dtypes"),
    "parallel": ("parallel_tokens", "parallel_hidden", "parallel_vocabs", "dtypes"),
}


def results_path(out: Path, backend: str, suite: str) -> Path:
    return out / f"{backend}_{suite}.json"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", default=None, help=f"comma-separated suites out of: {', '.join(SUITES)}"
    )
    parser.add_argument(
        "--rows", type=int, default=None, help="rows per batch (categorical, losses)"
    )
    parser.add_argument("--classes", default=None, help="comma-separated K of the sweeps")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    names = list(SUITES) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    suites = [SUITES[n] for n in names]
    missing = [s.name for s in suites if not s.available()]
    if missing:
        parser.error(f"suite(s) {missing} not available: their module is missing")

    classes = None if args.classes is None else tuple(int(k) for k in args.classes.split(","))
    cfg = default_config(args.quick, args.rows, args.repeats, classes)
    command = command_line("benchmarks", argv)
    backend = jax.default_backend()
    args.out.mkdir(parents=True, exist_ok=True)

    from benchmarks import plots, tables

    with tqdm(total=sum(s.steps(cfg) for s in suites), unit="case") as bar:
        for suite in suites:
            bar.set_description(suite.name)
            config = {k: getattr(cfg, k) for k in _CONFIG_KEYS[suite.name]}
            config["quick"] = cfg.quick
            record = start_record(command, suite.name, config)
            started = time.perf_counter()
            suite.run(cfg, record, lambda: bar.update())
            finish_record(record, started)
            path = results_path(args.out, backend, suite.name)
            path.write_text(json.dumps(record, indent=1) + "\n")
            figure = plots.plot_record(record, path.with_suffix(".png"))
            tqdm.write(tables.suite_tables(record))
            tqdm.write(f"wrote {path}" + (f", {figure}" if figure else ""))
    if args.out.resolve() == RESULTS.resolve():
        print("now run `python -m benchmarks.tables` to put the new numbers in the READMEs")


def suite_main(name: str) -> None:
    """``python -m benchmarks.bench_<name> [flags]``: ``python -m benchmarks --only name``."""
    main(["--only", name, *sys.argv[1:]])


if __name__ == "__main__":
    main()
