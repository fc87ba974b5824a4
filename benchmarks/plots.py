"""One figure per suite: time and memory against the vocabulary size, every contender.

    python -m benchmarks.plots            # redraw every figure from benchmarks/results/*.json

``python -m benchmarks`` draws each suite's figure beside its results file
(``<backend>_<suite>.png`` beside ``<backend>_<suite>.json``); this redraws them from
the committed records (e.g. after a change of style), without measuring anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: Colours per contender (stable across figures), line styles per dtype.
COLORS = {
    "jxent": "tab:blue",
    "optax": "tab:orange",
    "jnp one-pass": "tab:brown",
    "jax-cce": "tab:green",
    "tokamax xla": "tab:red",
    "tokamax chunked_xla": "tab:purple",
    "sharded": "tab:blue",
    "1 device": "tab:orange",
}
STYLES = {"float32": "-", "bfloat16": "--", "float16": ":"}

#: (metric key, axis label) per suite; a zero still needs a point on a log axis.
METRICS = {
    "parallel": (
        ("temp_mib", "temporary MiB per device"),
        ("io_mib", "arguments + outputs MiB per device"),
    ),
    "default": (("ms", "median ms"), ("temp_mib", "compiled temporary MiB")),
}
FLOOR = 1e-3


def _k(v: int) -> str:
    return f"{v // 1024}k" if v % 1024 == 0 else f"{v / 1000:.4g}k"


def plot_record(record: dict, path: Path) -> Path | None:
    """Draws ``record``'s rows measured at two or more vocabulary sizes into ``path``:
    one column per case (per dtype for the fused loss), one row per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    from benchmarks.common import machine_summary

    suite = record["suite"]
    if suite == "classification":  # several row counts per K: its table is the figure
        return None
    rows = [r for r in record["rows"] if r.get("kind", "time") != "memory"]
    by_column: dict[str, list[dict]] = {}
    for r in rows:
        key = (
            f"{r['dtype']}, {r['shape'].rsplit('x', 1)[0]} x V" if suite == "linear" else r["case"]
        )
        by_column.setdefault(key, []).append(r)
    by_column = {k: rs for k, rs in by_column.items() if len({r["vocab"] for r in rs}) > 1}
    if not by_column:
        return None
    metrics = METRICS.get(suite, METRICS["default"])
    cols = len(by_column)
    fig, axes = plt.subplots(
        len(metrics), cols, figsize=(3.3 * cols + 0.4, 2.8 * len(metrics) + 1.1), squeeze=False
    )
    contenders, dtypes = {}, {}
    for j, (title, rs) in enumerate(by_column.items()):
        vocabs = sorted({r["vocab"] for r in rs})
        for i, (metric, label) in enumerate(metrics):
            ax = axes[i][j]
            names = dict.fromkeys(n for r in rs for n in r["contenders"])
            for name in names:
                for dtype in dict.fromkeys(r["dtype"] for r in rs):
                    pts = sorted(
                        (r for r in rs if r["dtype"] == dtype and name in r["contenders"]),
                        key=lambda r: r["vocab"],
                    )
                    ys = [r["contenders"][name].get(metric) for r in pts]
                    if not pts or any(y is None for y in ys):
                        continue
                    ax.plot(
                        [r["vocab"] for r in pts],
                        [max(y, FLOOR) for y in ys],
                        STYLES.get(dtype, "-"),
                        color=COLORS.get(name),
                        marker="o",
                        ms=3,
                    )
                    contenders[name], dtypes[dtype] = True, True
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(vocabs, [_k(v) for v in vocabs])
            ax.xaxis.set_minor_locator(NullLocator())
            # Labelled ticks at 1, 2 and 5 per decade where the range is narrow (so that a
            # range within one decade still reads), at the powers of 10 otherwise.
            lo, hi = ax.get_ylim()
            subs = (1.0, 2.0, 5.0) if hi / lo < 300 else (1.0,)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
            if i == 0:
                ax.set_title(title, fontsize=8)
            if i == len(metrics) - 1:
                ax.set_xlabel("vocabulary size V", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    handles = [Line2D([], [], color=COLORS.get(n), lw=3, label=n) for n in contenders]
    handles += [Line2D([], [], color="k", ls=STYLES.get(d, "-"), label=d) for d in dtypes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    env = record["environment"]
    where = machine_summary(record["machine"])
    if suite == "parallel":
        where += "; 8 simulated devices, compiled memory only (no time: the devices share cores)"
    fig.suptitle(
        f"{suite}: {env['backend']}, jax {env.get('jax')}, {record['date'][:10]}\n{where}",
        fontsize=9,
        x=0.01,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.93))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0]) if argv else RESULTS
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("suite") in ("categorical", "losses", "linear", "parallel") and plot_record(
            record, path.with_suffix(".png")
        ):
            print(f"drew {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
