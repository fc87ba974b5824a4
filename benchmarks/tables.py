"""Every benchmark table of README.md and benchmarks/README.md, generated from the
committed results (``benchmarks/results/*.json``).

    python -m benchmarks.tables            # rewrite the tables between their markers
    python -m benchmarks.tables --check    # exit 1 if the markdown and the results disagree
    python -m benchmarks.tables --list     # the table names and the files they read

A table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``: on lines of
their own for a block (a table and its caption), or inside a sentence for a phrase.
Every table says which machine and run it comes from. ``--check`` also fails on a
marker with no generator, on a results file that no table reads (a stale result is
removed, not kept beside the new ones), and on a suite's results file without its
figure beside it. ``tests/test_benchmarks.py`` runs it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")

if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_summary  # noqa: E402

SUITES_WITH_FIGURES = ("categorical", "losses", "linear", "parallel")
MARKER = re.compile(r"<!-- table:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _ms(t: float | None) -> str:
    if t is None:
        return "n/a"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def _mib(m: float | None) -> str:
    if m is None:
        return "n/a"
    if m == 0:
        return "0"
    if m < 1 / 1024:
        return f"{m * 2**20:.0f} B"
    if m < 1:
        kib = m * 1024
        return f"{kib:.3g} KiB" if kib < 100 else f"{kib:.0f} KiB"
    return f"{m:.4g} MiB" if m < 10000 else f"{m:.0f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23x``."""
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _mem_ratio(jx: float, base: float) -> str:
    """jxent's memory over the baseline's: n/a where the baseline needs under 64 KiB
    (a ratio of two negligible numbers means nothing), ``1/N`` below 1/2."""
    if base < 1 / 16:
        return "n/a"
    r = jx / base
    if r == 0:
        return "0"
    return f"1/{1 / r:.0f}" if r < 0.5 else f"{r:.2f}"


def _err(e: float | None) -> str:
    return "n/a" if e is None else f"{e:.1e}"


def _k(v: int) -> str:
    return f"{v // 1024}k" if v % 1024 == 0 else str(v)


def caption(record: dict, path: str | None = None) -> str:
    """Where and how a table was measured: file, command, date, machine, versions, load."""
    env, load = record["environment"], record.get("load", {})
    versions = ", ".join(
        f"{k} {env[k]}" for k in ("jax", "jaxlib", "optax", "jax-cce", "tokamax") if k in env
    )
    if env.get("jxent_commit"):
        modified = " with uncommitted changes" if env.get("jxent_modified") else ""
        versions = f"jxent at {env['jxent_commit']}{modified}, {versions}"
    start = load.get("loadavg_start")
    end = load.get("loadavg_end")
    load_text = ""
    if start:
        load_text = f"; load average {start[0]:.2f} at the start"
        if end:
            load_text += f", {end[0]:.2f} at the end"
    where = f"`{path}`, " if path else ""
    return (
        f"*{where}{record['date'][:10]}: {machine_summary(record['machine'])}; "
        f"{env['backend']} backend; {versions}{load_text}. Command: `{record['command']}`.*"
    )


def _table(head: list[str], align: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Suite tables (also printed by `python -m benchmarks` after each suite)
# --------------------------------------------------------------------------------------------


def sweep(record: dict, *, cases=None, dtypes=None, vocabs=None) -> str:
    """categorical / losses: jxent beside its baseline, one row per case, dtype and K."""
    lines = []
    for r in record["rows"]:
        if cases and r["case"] not in cases or dtypes and r["dtype"] not in dtypes:
            continue
        if vocabs and r["vocab"] not in vocabs:
            continue
        jx, base = r["contenders"]["jxent"], r["contenders"][r["baseline"]]
        lines.append(
            [
                r["case"],
                r["baseline"],
                r["dtype"],
                r["shape"],
                _ms(jx["ms"]),
                _ms(base["ms"]),
                _ratio(base["ms"], jx["ms"]),
                _mib(jx["temp_mib"]),
                _mib(base["temp_mib"]),
                _mem_ratio(jx["temp_mib"], base["temp_mib"]),
            ]
        )
    head = ["case", "baseline", "dtype", "N x K", "jxent ms", "baseline ms", "speed-up"]
    head += ["jxent temp", "baseline temp", "memory jxent / baseline"]
    return _table(head, ["---"] * 4 + ["---:"] * 6, lines)


def _skipped(record: dict) -> str:
    return "\n".join(
        f"- **{s['contender']}**: not measured. {s['reason']}" for s in record.get("skipped", [])
    )


def linear_memory(record: dict) -> str:
    """The fused loss at model shapes: compiled temporary and output memory per contender."""
    lines = []
    for r in record["rows"]:
        if r.get("kind") != "memory":
            continue
        base = r["contenders"]["optax"]["temp_mib"]
        for name, c in r["contenders"].items():
            lines.append(
                [
                    f"{r['case']} {r['shape']}",
                    r["dtype"],
                    name,
                    _mib(c["temp_mib"]),
                    _mib(c["output_mib"]),
                    "1" if name == "optax" else _mem_ratio(c["temp_mib"], base),
                ]
            )
    head = ["shape N x D x V", "dtype", "contender", "temp", "outputs", "temp / optax's"]
    return _table(head, ["---"] * 3 + ["---:"] * 3, lines)


def linear_time(record: dict) -> str:
    """The fused loss's timed steps: time, memory and error against float64, per contender."""
    lines = []
    peak = any("peak_mib" in c for r in record["rows"] for c in r["contenders"].values())
    for r in record["rows"]:
        if r.get("kind") != "time":
            continue
        base = r["contenders"].get("optax", {}).get("ms")
        for name, c in r["contenders"].items():
            cells = [
                r["shape"],
                r["dtype"],
                name,
                _ms(c["ms"]),
                "1" if name == "optax" else _ratio(base, c["ms"]),
                _mib(c["temp_mib"]),
                _mib(c["output_mib"]),
                _err(c.get("loss_rel_error")),
                _err(c.get("grad_rel_error")),
            ]
            if peak:
                cells.append(_mib(c.get("peak_mib")))
            lines.append(cells)
    head = ["N x D x V", "dtype", "contender", "ms", "optax ms / ms", "temp", "outputs"]
    head += ["loss rel. error", "gradient rel. error"]
    if peak:
        head.append("peak device memory")
    table = _table(head, ["---"] * 3 + ["---:"] * (len(head) - 3), lines)
    skipped = _skipped(record)
    return table + ("\n\n" + skipped if skipped else "")


def parallel(record: dict) -> str:
    """Per-device compiled memory of the sharded programs against one device."""
    lines = []
    for r in record["rows"]:
        s, one = r["contenders"]["sharded"], r["contenders"]["1 device"]
        lines.append(
            [
                r["case"],
                r["dtype"],
                r["shape"],
                _mib(s["temp_mib"]),
                _mib(one["temp_mib"]),
                _mib(s["io_mib"]),
                _mib(one["io_mib"]),
                _ratio(one["io_mib"], s["io_mib"]),
            ]
        )
    head = ["case", "dtype", "shape", "temp per device", "temp on 1 device"]
    head += ["args + outputs per device", "args + outputs on 1 device", "saving"]
    return _table(head, ["---"] * 3 + ["---:"] * 5, lines)


def filtering(record: dict) -> str:
    """Gradient filtering (``bench_filtering``): per shape, dtype and distribution, the
    fraction of blocks skipped per ``filter_eps`` and each jxent's time against the
    unfused loss's."""
    rows = record["rows"]
    names = [k for k in rows[0].get("ms", {}) if k != "x @ w + optax"]
    lines = []
    for r in rows:
        skipped = ", ".join(f"{k}: {v:.2f}" for k, v in r["skipped_fraction"].items())
        times = [f"{r['ms'][k]:.0f} ms ({r['speedup_vs_unfused'][k]:.2f}x)" for k in names]
        unfused = [f"{r['ms']['x @ w + optax']:.0f} ms"] if names else []
        lines.append(
            [r["shape"], r["dtype"], r["distribution"], f"{r['entropy_nats']:.2f}",
             f"{r['mean_p_label']:.2f}", r["schedule"], skipped, *unfused, *times]
        )  # fmt: skip
    head = ["shape", "dtype", "softmax", "entropy (nats)", "mean p(label)", "schedule",
            "blocks skipped, by filter_eps"]  # fmt: skip
    head += ["x @ w + optax"] if names else []
    head += [f"{k} (speed-up)" for k in names]
    return _table(head, ["---"] * 7 + ["---:"] * (len(head) - 7), lines)


def suite_tables(record: dict) -> str:
    """A suite's tables, as ``python -m benchmarks`` prints them after the suite."""
    suite = record["suite"]
    if suite == "linear":
        parts = [linear_memory(record), linear_time(record)]
        return "\n\n".join(p for p in parts if p.count("\n") > 1 or "not measured" in p)
    if suite == "parallel":
        return parallel(record)
    if suite == "classification":
        return classification(record)
    return sweep(record)


# --------------------------------------------------------------------------------------------
# The tables of the READMEs, by marker name
# --------------------------------------------------------------------------------------------


class Results:
    """The committed records, loaded on demand; remembers which files were read."""

    def __init__(self, directory: Path = RESULTS):
        self.directory = directory
        self.read: set[str] = set()

    def __call__(self, name: str) -> dict:
        path = self.directory / name
        self.read.add(name)
        return json.loads(path.read_text())

    def glob(self, pattern: str) -> list[tuple[str, dict]]:
        return [(p.name, self(p.name)) for p in sorted(self.directory.glob(pattern))]

    def rel(self, name: str) -> str:
        return f"benchmarks/results/{name}"


def _with_caption(res: Results, name: str, body: Callable[[dict], str], note: str = "") -> str:
    record = res(name)
    parts = [caption(record, res.rel(name))]
    if note:
        parts.append(note)
    parts.append(body(record))
    return "\n\n".join(parts)


def _sweep_block(res: Results, name: str) -> str:
    record = res(name)
    figure = Path(name).with_suffix(".png").name
    return "\n\n".join(
        [caption(record, res.rel(name)), sweep(record), f"![{record['suite']}](results/{figure})"]
    )


def classification(record: dict) -> str:
    """The classification sweep: jxent's speed-up over optax per case, dtype and row count
    (rows of the table) and class count (columns), with the range of the rounds' ratios."""
    classes = sorted({r["vocab"] for r in record["rows"]})
    cells: dict[tuple, dict[int, str]] = {}
    for r in record["rows"]:
        jx, base = r["contenders"]["jxent"], r["contenders"][r["baseline"]]
        cell = _ratio(base["ms"], jx["ms"])
        rounds = r.get("round_ratios") or []
        if len(rounds) > 1:
            cell += f" ({min(rounds):.2f}-{max(rounds):.2f})"
        n = int(r["shape"].split("x")[0])
        cells.setdefault((r["case"], r["dtype"], n), {})[r["vocab"]] = cell
    lines = [
        [case, dtype, str(n), *(by_k.get(k, "") for k in classes)]
        for (case, dtype, n), by_k in cells.items()
    ]
    head = ["case", "dtype", "N", *(f"K = {k}" for k in classes)]
    return _table(head, ["---"] * 3 + ["---:"] * len(classes), lines)


def _classification_block(res: Results) -> str:
    name = "cpu_classification.json"
    record = res(name)
    rounds = record["config"].get("rounds")
    note = (
        "Speed-up of jxent over optax (optax's median time / jxent's) at classifiers' "
        f"shapes, N rows x K classes; in brackets the lowest and highest of the {rounds} "
        "rounds' ratios, each round's medians taken over calls alternating between the two:"
    )
    return "\n\n".join([caption(record, res.rel(name)), note, classification(record)])


def _linear_block(res: Results) -> str:
    name = "cpu_linear.json"
    record = res(name)
    return "\n\n".join(
        [
            caption(record, res.rel(name)),
            "Compiled memory at the output layers of Gemma 2 2B and Llama 3 8B (nothing "
            "allocated):",
            linear_memory(record),
            "Timed steps (gradients with respect to `x` and `w`; errors are relative to a "
            "float64 NumPy reference on the same rounded inputs: the loss's absolute error "
            "over its value, the gradients' Frobenius norm of the difference over the "
            "reference's, the larger of `dx` and `dw`):",
            linear_time(record),
            "![linear](results/cpu_linear.png)",
        ]
    )


def _isa_block(res: Results) -> str:
    """The fused loss against optax at 4096 x 1024 x 32000 with each CPU instruction set."""
    lines, captions = [], []
    found = res.glob("cpu_isa_*.json")
    found.sort(key=lambda nr: nr[1]["machine"].get("xla_cpu_max_isa") is not None)
    for name, record in found:
        captions.append("- " + caption(record, res.rel(name)))
        for r in record["rows"]:
            jx, ox = r["contenders"]["jxent"], r["contenders"]["optax"]
            isa = record["machine"].get("xla_cpu_max_isa") or "native (all of the CPU's)"
            lines.append(
                [
                    isa,
                    r["shape"],
                    r["dtype"],
                    _ms(jx["ms"]),
                    _ms(ox["ms"]),
                    _ratio(ox["ms"], jx["ms"]),
                    _mib(jx["temp_mib"]),
                    _mib(ox["temp_mib"]),
                    _err(jx.get("loss_rel_error")),
                    _err(ox.get("loss_rel_error")),
                ]
            )
    head = ["XLA:CPU instruction set", "N x D x V", "dtype", "jxent ms", "optax ms"]
    head += ["optax / jxent", "jxent temp", "optax temp", "jxent loss error", "optax loss error"]
    table = _table(head, ["---"] * 3 + ["---:"] * 7, lines)
    return "\n".join(captions) + "\n\n" + table


def _parallel_block(res: Results) -> str:
    name = "cpu_parallel.json"
    record = res(name)
    return "\n\n".join(
        [caption(record, res.rel(name)), parallel(record), "![parallel](results/cpu_parallel.png)"]
    )


def _products(r: dict) -> int:
    """Matrix products the size of ``x @ w`` in an accelerator record's row: its matmul
    flops over one product's (jxent takes the single pass where the shape allows: 3)."""
    n, d, v = (int(a) for a in r["shape"].split("x"))
    return round(r["matmul_gflops"] * 1e9 / (2 * n * d * v))


def _filtered_fraction(res: Results) -> tuple[float, str]:
    """The skipped fraction measured at the peaked bfloat16 softmax on CPU (the filtering
    record), and its description, for the roofline estimate with filtering."""
    record = res("cpu_filtering.json")
    rows = [
        r for r in record["rows"] if r["dtype"] == "bfloat16" and r["distribution"] == "zipf s=2.5"
    ]
    r = rows[0]
    f = r["skipped_fraction"]["auto"]
    return f, (
        f"{f:.3f}, the fraction filter_eps='auto' skips on CPU at {r['shape']} bfloat16 with "
        f"a Zipf softmax of {r['entropy_nats']:.2f} nats (benchmarks/results/cpu_filtering.json)"
    )


def _accelerators(res: Results, target: str) -> str:
    name = f"accelerators_{target}.json"
    record = res(name)
    peak = record["peaks"]
    f, described = _filtered_fraction(res)

    def filtered(r: dict) -> str:
        # A skipped block saves the backward pass's two gradient products, and streaming's
        # (four products) its logits made again too: it is decided from the forward pass.
        products = _products(r)
        if r["contender"] in ("x @ w + optax", "jxent pallas_tpu"):  # no filtering there
            return "-"
        saved = 3 if products == 4 else 2
        return f"{r['roofline_ms'] * (products - saved * f) / products:.2f}"

    lines = [
        [
            f"{r['shape_name']} ({r['shape']})",
            r["dtype"],
            r["contender"],
            f"{r['temp_mib']:.1f}",
            f"{r['output_mib']:.1f}",
            f"{r['xla_gflops']:.0f}",
            f"{r['xla_gbytes_accessed']:.1f}",
            f"{r['matmul_gflops']:.0f}",
            str(_products(r)),
            f"{r['roofline_ms']:.2f}",
            filtered(r),
        ]
        for r in record["rows"]
    ]
    head = ["shape", "dtype", "contender", "temp MiB", "outputs MiB", "XLA GFLOP", "XLA GB"]
    head += ["matmul GFLOP", "products", "roofline ms", f"roofline ms, filtering {f:.2f}"]
    note = (
        f"Compiled for {target} without a device: compile-time facts, not timings. XLA's "
        "cost analysis counts a loop body once (the fused loss's figures are one block's); "
        f"the roofline is the matrix products' flops over the peak of {peak['source']} "
        "(float32 products at the default precision: one bfloat16 pass, jxent's blocks of "
        "w rounded in the loop). `jxent` is the default schedule "
        "(streaming at these shapes: four products), `jxent single pass` the same loss "
        "with schedule='single_pass' (three products, a float32 [D, V] accumulator), "
        "`jxent pallas_tpu` with implementation='pallas_tpu' (Pallas Mosaic kernels: five "
        "products, its XLA GFLOP the kernels' cost estimates over the whole call). "
        "The last column is an estimate, not a compile: the roofline with gradient "
        "filtering skipping the backward products of a fraction f of the blocks (each "
        "skipped block saves two products in the single pass, three when streaming: its "
        f"logits are not made again), f = {described}."
    )
    return "\n\n".join(
        [caption(record, res.rel(name)), note, _table(head, ["---"] * 3 + ["---:"] * 8, lines)]
    )


def _accelerators_gpu(res: Results, target: str) -> str:
    """A GPU target's compiled memory, cost and roofline, then issue 13's bound for jxent
    (at most 2x the floor, at most 1/20 of each unfused baseline)."""
    name = f"accelerators_{target}.json"
    record = res(name)
    peak = record["peaks"]
    unfused, unfused32 = "x @ w + optax", "(x @ w).astype(f32) + optax"
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for r in record["rows"]:
        cases.setdefault((r["shape_name"], r["dtype"]), {})[r["contender"]] = r
    lines, bounds = [], []
    for (shape_name, dtype), rs in cases.items():
        base = rs[unfused]["temp_mib"]
        for r in rs.values():
            lines.append(
                [
                    f"{shape_name} ({r['shape']})",
                    dtype,
                    r["contender"],
                    f"{r['temp_mib']:.1f}",
                    f"{r['output_mib']:.1f}",
                    f"{r['temp_mib'] + r['output_mib']:.1f}",
                    _mem_ratio(r["temp_mib"], base),
                    f"{r['xla_gflops']:.0f}",
                    f"{r['xla_gbytes_accessed']:.1f}",
                    f"{r['matmul_gflops']:.0f}",
                    f"{r['roofline_ms']:.2f}",
                    f"{r['memory_floor_ms']:.2f}",
                ]
            )
        jx = rs["jxent"]
        limits = {"2x floor": 2 * jx["floor_mib"], "1/20 of x @ w": base / 20}
        cells = [f"{jx['floor_mib']:.1f}", _mem_ratio(jx["temp_mib"], base)]
        if unfused32 in rs:
            limits["1/20 of f32 logits"] = rs[unfused32]["temp_mib"] / 20
            cells.append(_mem_ratio(jx["temp_mib"], rs[unfused32]["temp_mib"]))
        else:
            cells.append("n/a")
        missed = [what for what, limit in limits.items() if jx["temp_mib"] > limit]
        verdict = "no: " + ", ".join(missed) if missed else "yes"
        bounds.append(
            [f"{shape_name} ({jx['shape']})", dtype, f"{jx['temp_mib']:.1f}", *cells, verdict]
        )
    head = ["shape", "dtype", "contender", "temp MiB", "outputs MiB", "temp + outputs MiB"]
    head += ["temp / x @ w + optax's", "XLA GFLOP", "XLA GB", "matmul GFLOP", "compute ms"]
    head.append("memory floor ms")
    env = record["environment"]
    plugin = env.get("jax-cuda12-plugin")
    note = (
        f"Compiled for {peak['device']} without a device (XLA:GPU, "
        f"{'jax-cuda12-plugin ' + plugin + ', ' if plugin else ''}the target config in "
        "the record, `--xla_gpu_autotune_level=0`): compile-time facts, not timings. XLA's "
        "cost analysis (the CPU client's, over the GPU-optimised HLO) counts a loop body "
        "once (the fused loss's and jax-cce's figures are one block's). Compute ms: the "
        "matrix products' flops over the peak of "
        f"{peak['source']}; bfloat16 at the bf16 peak, float32 at the TF32 peak (XLA:GPU "
        "runs float32 products at JAX's default precision as one TF32 pass, jxent's "
        "included; jax-cce multiplies float32 copies of bfloat16 inputs and recomputes the "
        "logits: four products). Memory floor ms: arguments read once, outputs written once and "
        "temporaries written and read once, over the HBM bandwidth (a lower bound on the "
        "traffic): every contender is compute-bound here."
    )
    bound_note = (
        "Issue 13's bound for jxent on this target: temporary memory at most twice the "
        "floor (a float32 `dx`, N x D, and one float32 logits block of the GPU plan) and at "
        "most 1/20 of the unfused loss's, in the inputs' dtype and with float32 logits."
    )
    bound_head = ["shape", "dtype", "jxent temp MiB", "floor MiB", "temp / x @ w + optax's"]
    bound_head += ["temp / f32-logits optax's", "bound met"]
    return "\n\n".join(
        [
            caption(record, res.rel(name)),
            note,
            _table(head, ["---"] * 3 + ["---:"] * 9, lines),
            bound_note,
            _table(bound_head, ["---"] * 2 + ["---:"] * 4 + ["---"], bounds),
            *filter(None, [_skipped(record)]),
        ]
    )


def _find(record: dict, case: str, dtype: str, vocab: int | None = None, kind=None) -> dict:
    for r in record["rows"]:
        if r["case"] == case and r["dtype"] == dtype and (vocab is None or r["vocab"] == vocab):
            if kind is None or r.get("kind") == kind:
                return r
    raise KeyError(f"no row {case!r} {dtype} {vocab} in {record['suite']}")


def _headline(res: Results) -> str:
    """README.md's summary: a few rows of each suite, each with its machine and file."""
    lines = []
    for suite, picks in (
        (
            "categorical",
            [("integer labels", "float32"), ("integer labels", "bfloat16"),
             ("integer labels, smoothing 0.1", "bfloat16")],
        ),
        ("losses", [("sigmoid binary cross-entropy", "bfloat16"), ("entropy", "float32")]),
    ):  # fmt: skip
        record = res(f"cpu_{suite}.json")
        vocab = 32768 if any(r["vocab"] == 32768 for r in record["rows"]) else None
        for case, dtype in picks:
            r = _find(record, case, dtype, vocab)
            jx, base = r["contenders"]["jxent"], r["contenders"][r["baseline"]]
            lines.append(
                [
                    f"{case} ({r['baseline']})",
                    dtype,
                    r["shape"],
                    _ratio(base["ms"], jx["ms"]),
                    f"{_mib(jx['temp_mib'])} vs {_mib(base['temp_mib'])}",
                    f"CPU, `cpu_{suite}.json`",
                ]
            )
    linear = res("cpu_linear.json")
    times = [r for r in linear["rows"] if r.get("kind") == "time"]
    if times:
        largest = max(r["vocab"] for r in times)
        for dtype in ("float32", "bfloat16"):
            r = _find(linear, "timed step", dtype, largest, "time")
            jx, ox = r["contenders"]["jxent"], r["contenders"]["optax"]
            lines.append(
                [
                    "fused linear cross-entropy (`x @ w` + optax)",
                    dtype,
                    r["shape"],
                    _ratio(ox["ms"], jx["ms"]),
                    f"{_mib(jx['temp_mib'])} vs {_mib(ox['temp_mib'])}",
                    "CPU, `cpu_linear.json`",
                ]
            )
    r = _find(linear, "gemma2", "bfloat16", kind="memory")
    jx, ox = r["contenders"]["jxent"], r["contenders"]["optax"]
    lines.append(
        [
            "fused linear cross-entropy (`x @ w` + optax), Gemma 2's output layer",
            "bfloat16",
            r["shape"],
            "(compiled only)",
            f"{_mib(jx['temp_mib'])} vs {_mib(ox['temp_mib'])}",
            "CPU compiler, `cpu_linear.json`",
        ]
    )
    tpu = res("accelerators_tpu-v5e.json")
    rs = {r["contender"]: r for r in tpu["rows"]
          if r["shape_name"] == "gemma2" and r["dtype"] == "bfloat16"}  # fmt: skip
    if {"jxent", "x @ w + optax"} <= rs.keys():
        jx, ox = rs["jxent"], rs["x @ w + optax"]
        lines.append(
            [
                "the same, compiled for TPU v5e",
                "bfloat16",
                jx["shape"],
                "(compiled only)",
                f"{_mib(jx['temp_mib'])} vs {_mib(ox['temp_mib'])}",
                "TPU v5e compiler, `accelerators_tpu-v5e.json`",
            ]
        )
    machine = machine_summary(res("cpu_categorical.json")["machine"])
    loads = [
        x
        for name in ("cpu_categorical.json", "cpu_losses.json", "cpu_linear.json")
        for x in (res(name)["load"]["loadavg_start"][0], res(name)["load"]["loadavg_end"][0])
    ]
    machine += f"; 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the runs"
    head = ["loss (baseline)", "dtype", "shape", "speed-up", "temp memory jxent vs baseline"]
    head.append("measured on, file")
    return (
        f"*CPU rows: {machine}; files in `benchmarks/results/`, tables and captions in "
        "[benchmarks/README.md](benchmarks/README.md).*\n\n"
        + _table(head, ["---"] * 3 + ["---:"] * 2 + ["---"], lines)
    )


def _gemma2_phrase(res: Results) -> str:
    """The README's sentence on Gemma 2's output layer (compiled memory on CPU)."""
    r = _find(res("cpu_linear.json"), "gemma2", "bfloat16", kind="memory")
    jx, ox = r["contenders"]["jxent"]["temp_mib"], r["contenders"]["optax"]["temp_mib"]
    big = f"{ox / 1024:.1f} GiB" if ox >= 1024 else _mib(ox)
    small = f"{jx:.0f} MiB" if jx >= 10 else _mib(jx)
    return (
        f"about {small}, against {big} for `x @ w` followed by optax's loss "
        f"(1/{ox / jx:.0f}; compiled on CPU)"
    )


def _fused_losses(res: Results) -> str:
    """README's table of the fused losses beyond cross-entropy: compiled temporary memory
    at Gemma 2's output layer on CPU and TPU v5e, and the timed KL against optax."""
    cpu, tpu = "cpu_fused_losses.json", "tpu-v5e_fused_losses.json"
    rc, rt = res(cpu), res(tpu)

    def cell(c: dict) -> str:
        if "error" in c:
            kind = c["error"].split(":")[0]
            return "exceeds the chip's memory" if kind == "RESOURCE_EXHAUSTED" else kind
        return _mib(c["temp_mib"])

    mem_c, mem_t = (_find(r, "gemma2", "bfloat16") for r in (rc, rt))
    lines = [
        [name, cell(c), cell(mem_t["contenders"][name])] for name, c in mem_c["contenders"].items()
    ]
    memory = _table(["loss", "CPU temp", "TPU v5e temp"], ["---", "---:", "---:"], lines)
    timed = []
    for r in rc["rows"]:
        if not r["case"].endswith("-time"):
            continue
        (na, a), (nb, b) = r["contenders"].items()
        timed.append(
            [r["dtype"], r["shape"], f"{na}: {a['ms']:.0f} ms, {_mib(a['temp_mib'])}",
             f"{nb}: {b['ms']:.0f} ms, {_mib(b['temp_mib'])}", _ratio(b["ms"], a["ms"])]
        )  # fmt: skip
    time_table = _table(
        ["dtype", "shape", "jxent", "unfused (optax)", "speed-up"],
        ["---", "---", "---:", "---:", "---:"],
        timed,
    )
    return "\n\n".join(
        [
            caption(rc, res.rel(cpu)),
            caption(rt, res.rel(tpu)),
            "Compiled temporary memory of `value_and_grad` at Gemma 2's output layer "
            f"({mem_c['shape']}, bfloat16, the teacher's top-64; nothing runs):",
            memory,
            "CPU time of `value_and_grad` (medians after warm-up, interleaved):",
            time_table,
        ]
    )


GENERATORS: dict[str, Callable[[Results], str]] = {
    "headline": _headline,
    "gemma2-memory": _gemma2_phrase,
    "categorical": lambda res: _sweep_block(res, "cpu_categorical.json"),
    "classification": _classification_block,
    "losses": lambda res: _sweep_block(res, "cpu_losses.json"),
    "linear": _linear_block,
    "linear-isa": _isa_block,
    "parallel": _parallel_block,
    "fused-losses": _fused_losses,
    "filtering": lambda res: _with_caption(res, "cpu_filtering.json", filtering),
    "accelerators-tpu-v5e": lambda res: _accelerators(res, "tpu-v5e"),
    "accelerators-tpu-v6e": lambda res: _accelerators(res, "tpu-v6e"),
    "accelerators-h100": lambda res: _accelerators_gpu(res, "h100"),
}


# --------------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------------


def render(text: str, res: Results) -> tuple[str, list[str]]:
    """``text`` with every marked table regenerated, and the unknown marker names."""
    unknown = []

    def replace(m: re.Match) -> str:
        name = m["name"]
        if name not in GENERATORS:
            unknown.append(name)
            return m[0]
        body = GENERATORS[name](res)
        block = m["body"].startswith("\n")
        inner = f"\n{body}\n" if block else body
        return f"<!-- table:{name} -->{inner}<!-- /table:{name} -->"

    return MARKER.sub(replace, text), unknown


def problems_with_results(res: Results) -> list[str]:
    """Results no table reads, and suites' results without their figure."""
    out = []
    for path in sorted(res.directory.glob("*.json")):
        if path.name not in res.read:
            out.append(f"{path.relative_to(ROOT)}: read by no table (stale? remove it)")
        record = json.loads(path.read_text())
        is_sweep = record.get("suite") in SUITES_WITH_FIGURES and not path.name.startswith(
            "cpu_isa_"
        )
        if is_sweep and not path.with_suffix(".png").exists():
            out.append(
                f"{path.relative_to(ROOT)}: no figure beside it (python -m benchmarks.plots)"
            )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if anything is stale")
    parser.add_argument("--list", action="store_true", help="the tables and the files they read")
    args = parser.parse_args(argv)
    res = Results()
    if args.list:
        for name, gen in GENERATORS.items():
            before = set(res.read)
            gen(res)
            print(f"{name}: {', '.join(sorted(res.read - before)) or '(cached)'}")
        return 0
    failures = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        new, unknown = render(text, res)
        failures += [f"{doc.relative_to(ROOT)}: unknown table marker {n!r}" for n in unknown]
        if new == text:
            continue
        if args.check:
            diff = difflib.unified_diff(
                text.splitlines(), new.splitlines(), str(doc.relative_to(ROOT)), "generated",
                lineterm="", n=1,
            )  # fmt: skip
            failures.append("\n".join(diff))
        else:
            doc.write_text(new)
            print(f"updated {doc.relative_to(ROOT)}")
    failures += problems_with_results(res)
    if failures:
        print("\n".join(failures), file=sys.stderr)
        if args.check:
            print(
                "benchmark tables disagree with benchmarks/results: run "
                "`python -m benchmarks.tables`",
                file=sys.stderr,
            )
        return 1
    if args.check:
        print("benchmark tables agree with benchmarks/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
