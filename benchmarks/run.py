"""Runs every jxent-vs-baseline comparison and writes a report.

    python -m benchmarks [--quick] [--out DIR] [--only NAME[,NAME...]] [--rows N] [--repeats R]

Suites (``--only`` takes their names):

- ``categorical``: softmax cross-entropy (``benchmarks/bench_categorical.py``);
- ``losses``: sigmoid BCE, focal, poly-1, KL, distillation, entropy and a naive
  cross-entropy formula (``benchmarks/bench_losses.py``);
- ``linear``: the fused linear cross-entropy (``benchmarks/bench_linear.py``);
- ``parallel``: the sharded losses on 8 simulated CPU devices
  (``benchmarks/bench_parallel.py``, run in a subprocess with ``XLA_FLAGS`` set).

``categorical`` and ``losses`` sweep the vocabulary size K at a fixed number of rows,
for float32 and bfloat16. Every comparison is ``jit(value_and_grad(mean loss))``:
median wall time after a warm-up (jxent and its baseline interleaved, so their ratio
is taken under the same load) and XLA's compiled temporary memory.

Writes ``<out>/<backend>.json`` (environment and every row), ``<out>/<backend>.md``
(markdown tables) and ``<out>/<backend>_time.png``, ``<out>/<backend>_memory.png``
(time and temporary memory against K, log scales). ``<out>`` defaults to
``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.common import Row, environment  # noqa: E402

DTYPES = (jnp.float32, jnp.bfloat16)
_DTYPE_ORDER = {jnp.dtype(d).name: i for i, d in enumerate(DTYPES)}


@dataclasses.dataclass(frozen=True)
class Config:
    """Shapes and repeats of one report."""

    rows: int
    classes: tuple[int, ...]
    repeats: int
    quick: bool
    # The fused linear loss: tokens x hidden size, swept over vocabularies, and the
    # model shapes (bench_linear.SHAPES) whose compiled memory is measured.
    linear_tokens: int
    linear_dim: int
    linear_vocabs: tuple[int, ...]
    linear_memory_shapes: tuple[str, ...]


def default_config(quick: bool, rows: int | None = None, repeats: int | None = None) -> Config:
    if quick:
        return Config(rows or 32, (256, 1024), repeats or 2, True, 64, 32, (512,), ())
    # On CPU, fewer rows and a smaller hidden size keep a full run to minutes;
    # accelerators get a realistic batch and Gemma-2's hidden size.
    models = ("gemma2", "llama3")
    if jax.default_backend() == "cpu":
        linear = (1024, 512, (8192, 32768, 131072), models)
        return Config(rows or 1024, (1024, 8192, 32768, 131072), repeats or 7, False, *linear)
    linear = (8192, 2304, (32768, 131072, 256000), models)
    return Config(rows or 4096, (1024, 8192, 32768, 131072), repeats or 7, False, *linear)


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    module: str
    steps: Callable[[Config], int]  # progress-bar steps, known before running
    run: Callable[[Config, Callable[[], None]], list[dict]]

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _record(suite: str, rows: Sequence[Row], classes: int | None) -> list[dict]:
    return [{"suite": suite, "classes": classes, **r.as_dict()} for r in rows]


def _sweep(suite: str, module: str, per_call: Callable[[], int]) -> Suite:
    """A suite whose ``run(rows, classes, repeats, progress)`` is called once per K."""

    def steps(cfg: Config) -> int:
        return per_call() * len(cfg.classes)

    def run(cfg: Config, progress) -> list[dict]:
        mod = importlib.import_module(module)
        out = []
        for k in cfg.classes:
            rows = mod.run(rows=cfg.rows, classes=k, repeats=cfg.repeats, progress=progress)
            out += _record(suite, rows, k)
        return out

    return Suite(suite, module, steps, run)


def _categorical_per_call() -> int:
    from benchmarks import bench_categorical

    return len(bench_categorical._cases(2)) * len(DTYPES)


def _losses_per_call() -> int:
    from benchmarks import bench_losses

    return len(bench_losses.CASES) * len(DTYPES)


def _parallel_dtypes(cfg: Config) -> tuple[str, ...]:
    # A smoke test needs one dtype: each case compiles for 8 simulated devices.
    return ("float32",) if cfg.quick else tuple(jnp.dtype(d).name for d in DTYPES)


def _parallel_steps(cfg: Config) -> int:
    from benchmarks import bench_parallel

    return len(bench_parallel.CASES) * len(_parallel_dtypes(cfg))


def _linear_steps(cfg: Config) -> int:
    return 2 * (len(cfg.linear_vocabs) + bool(cfg.linear_memory_shapes))


def _linear_run(cfg: Config, progress) -> list[dict]:
    """bench_linear's rows: compiled memory at the model shapes, and time (and memory)
    of one training step of the output layer over a sweep of vocabulary sizes."""
    from benchmarks import bench_linear

    out = []
    if cfg.linear_memory_shapes:
        rows = bench_linear.run(
            time_shape=(), memory_shapes=cfg.linear_memory_shapes, progress=progress
        )
        out += [{"suite": "linear", "classes": None, **r} for r in rows]
    for v in cfg.linear_vocabs:
        shape = (cfg.linear_tokens, cfg.linear_dim, v)
        rows = bench_linear.run(
            time_shape=shape, memory_shapes=(), repeats=cfg.repeats, progress=progress
        )
        title = f"fused linear cross-entropy, {cfg.linear_tokens} tokens x D {cfg.linear_dim}"
        out += [{"suite": "linear", "classes": v, "plot_title": title, **r} for r in rows]
    return out


# Runs bench_parallel in a process with 8 simulated devices; reports progress on stdout.
_PARALLEL_CHILD = """
import json, sys
import jax.numpy as jnp
from benchmarks import bench_parallel
out, options = sys.argv[1], json.loads(sys.argv[2])
options["dtypes"] = tuple(jnp.dtype(d) for d in options["dtypes"])
rows = bench_parallel.run(progress=lambda: print("@@step", flush=True), **options)
with open(out, "w") as f:
    json.dump([r.as_dict() for r in rows], f)
"""


def _parallel_run(cfg: Config, progress) -> list[dict]:
    """bench_parallel needs 8 devices: simulate them on the CPU in a fresh process
    (on any backend: the suite measures per-device memory of the partitioned program)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    options = {"dtypes": _parallel_dtypes(cfg)}
    if cfg.quick:
        options |= {"memory_shape": [256, 64, 2048], "time_shape": [64, 32, 512], "repeats": 2}
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
        rows = json.loads(path.read_text())
    return [{"suite": "parallel", "classes": None, **r} for r in rows]


SUITES = {
    s.name: s
    for s in (
        _sweep("categorical", "benchmarks.bench_categorical", _categorical_per_call),
        _sweep("losses", "benchmarks.bench_losses", _losses_per_call),
        Suite("linear", "benchmarks.bench_linear", _linear_steps, _linear_run),
        Suite("parallel", "benchmarks.bench_parallel", _parallel_steps, _parallel_run),
    )
}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _ms(t: float) -> str:
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def _mib(m: float) -> str:
    if m == 0:
        return "0"
    return f"{m * 1024:.3g} KiB" if m < 1 else f"{m:.4g} MiB"


def markdown_table(records: list[dict]) -> str:
    """The rows of one suite. Unlike ``common.markdown_table`` it keeps 3 significant
    digits for sub-millisecond times and sub-MiB buffers (GPU rows), and leaves the
    memory ratio out where the baseline's temporary memory is under 64 KiB, since a
    ratio of two negligible numbers means nothing."""
    head = (
        "| case | dtype | shape | jxent ms | baseline ms | speed-up | jxent temp "
        "| baseline temp | memory ratio |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in records:
        base_mib = r["baseline_temp_mib"]
        ratio = f"{r['jxent_temp_mib'] / base_mib:.3g}" if base_mib >= 1 / 16 else "n/a"
        speedup = r["baseline_ms"] / r["jxent_ms"]
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['shape']} | {_ms(r['jxent_ms'])} "
            f"| {_ms(r['baseline_ms'])} ({r['baseline']}) | {speedup:.2f}x "
            f"| {_mib(r['jxent_temp_mib'])} | {_mib(r['baseline_temp_mib'])} | {ratio} |\n"
        )
    return head + "".join(lines)


def _order(records: list[dict]) -> list[dict]:
    """Each case's sweep together: by suite (run order), case, dtype, then K."""
    suites = list(dict.fromkeys(r["suite"] for r in records))
    cases = list(dict.fromkeys(r["case"] for r in records))
    return sorted(
        records,
        key=lambda r: (
            suites.index(r["suite"]),
            cases.index(r["case"]),
            _DTYPE_ORDER.get(r["dtype"], 9),
            r["classes"] or 0,
        ),
    )


_NOTES = {
    "linear": (
        "`linear_softmax_cross_entropy(x, w, labels)` against optax's cross-entropy of "
        "`x @ w`, gradients with respect to `x` and `w`; memory at the model shapes, time "
        "(and memory) over a sweep of vocabulary sizes.",
        "",
    ),
    "parallel": (
        "On 8 simulated CPU devices (`--xla_force_host_platform_device_count=8`, in a "
        "subprocess, whatever the backend): per-device compiled temporary memory of the "
        "sharded program at the shape shown, against the same loss on one device. The "
        "simulated devices share the same cores, so the times (taken at a small shape, "
        "see `bench_parallel.py`) are no speed-up figure.",
        "",
    ),
}


def markdown_report(env: dict, cfg: Config, records: list[dict]) -> str:
    lines = [
        f"# jxent benchmarks: {env['backend']} ({env['device']})",
        "",
        "Each row is `jit(value_and_grad(mean loss))`, jxent beside its baseline in the "
        "same run: median time over "
        f"{cfg.repeats} calls after a warm-up, and XLA's compiled temporary memory "
        "(`memory_analysis().temp_size_in_bytes`). Speed-up = baseline time / jxent time; "
        "memory ratio = jxent / baseline temporary memory (n/a where the baseline needs "
        "under 64 KiB).",
        "",
        "| environment | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in env.items()),
        "",
    ]
    records = _order(records)
    for suite in dict.fromkeys(r["suite"] for r in records):
        rows = [r for r in records if r["suite"] == suite]
        if suite == "linear":
            from benchmarks import bench_linear

            table = bench_linear.markdown(rows) + "\n"
        else:
            table = markdown_table(rows)
        lines += [f"## {suite}", "", *_NOTES.get(suite, ()), table]
    return "\n".join(lines)


def _sweeps(records: list[dict]) -> dict[str, list[dict]]:
    """Cases measured at two or more vocabulary sizes, which can be plotted against K."""
    by_case: dict[str, list[dict]] = {}
    for r in records:
        if r.get("classes") and "jxent_ms" in r:
            by_case.setdefault(r.get("plot_title", r["case"]), []).append(r)
    return {c: rs for c, rs in by_case.items() if len({r["classes"] for r in rs}) > 1}


def _k_label(k: int) -> str:
    return f"{k // 1024}k" if k % 1024 == 0 else str(k)


def plot(records: list[dict], metric: str, path: Path, title: str) -> bool:
    """One panel per case: jxent (solid) and baseline (dashed) against K, one colour per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sweeps = _sweeps(_order(records))
    if not sweeps:
        return False
    cols = min(4, len(sweeps))
    nrows = -(-len(sweeps) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.1 * nrows + 0.6), squeeze=False)
    unit = "ms" if metric == "ms" else "temp_mib"
    floor = 1e-3  # a zero temporary buffer still needs a point on a log axis
    colors = {"float32": "tab:blue", "bfloat16": "tab:orange"}
    for ax, (case, rs) in zip(axes.flat, sweeps.items(), strict=False):
        for dtype in dict.fromkeys(r["dtype"] for r in rs):
            pts = sorted((r for r in rs if r["dtype"] == dtype), key=lambda r: r["classes"])
            ks = [r["classes"] for r in pts]
            for who, style in (("jxent", "-"), ("baseline", "--")):
                ys = [max(r[f"{who}_{unit}"], floor) for r in pts]
                ax.plot(ks, ys, style, marker="o", ms=3, color=colors.get(dtype))
        ks = sorted({r["classes"] for r in rs})
        ax.set_xscale("log")
        ax.set_xticks(ks, [_k_label(k) for k in ks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_title(f"{case}\n(baseline: {rs[0]['baseline']})", fontsize=8)
        ax.set_xlabel("vocabulary size K", fontsize=8)
        ax.set_ylabel("median ms" if metric == "ms" else "temporary MiB", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(sweeps) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], color="k", ls="-", label="jxent"),
        Line2D([], [], color="k", ls="--", label="baseline"),
        *(Line2D([], [], color=c, lw=4, label=d) for d, c in colors.items()),
    ]
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated suites out of: {', '.join(SUITES)}"
    )
    parser.add_argument("--rows", type=int, default=None, help="rows (tokens) per batch")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median")
    args = parser.parse_args(argv)

    names = list(SUITES) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    suites = [SUITES[n] for n in names]
    missing = [s.name for s in suites if not s.available()]
    if missing and args.only is not None:
        parser.error(f"suite(s) {missing} not available: their module is missing")
    suites = [s for s in suites if s.available()]

    cfg = default_config(args.quick, args.rows, args.repeats)
    env = environment()
    records: list[dict] = []
    with tqdm(total=sum(s.steps(cfg) for s in suites), unit="case") as bar:
        for suite in suites:
            bar.set_description(suite.name)
            records += suite.run(cfg, lambda: bar.update())

    args.out.mkdir(parents=True, exist_ok=True)
    backend = env["backend"]
    report = {
        "environment": env,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "skipped_suites": missing,
        "rows": records,
    }
    written = [args.out / f"{backend}.json", args.out / f"{backend}.md"]
    written[0].write_text(json.dumps(report, indent=1) + "\n")
    written[1].write_text(markdown_report(env, cfg, records))
    where = f"{env['backend']}, {env['device']}"
    for metric, name in (("ms", "time"), ("mib", "memory")):
        path = args.out / f"{backend}_{name}.png"
        what = "median time" if name == "time" else "compiled temporary memory"
        if plot(records, metric, path, f"jxent vs baselines: {what} ({where})"):
            written.append(path)
    print("wrote " + ", ".join(str(p) for p in written))
    if missing:
        print(f"skipped (module not present): {', '.join(missing)}")


if __name__ == "__main__":
    main()
