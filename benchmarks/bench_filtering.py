"""Gradient filtering (``filter_eps=``): the fraction of blocks skipped and the time of
the fused cross-entropy against ``x @ w`` + optax, on peaked and flat distributions.

The inputs are built to a stated softmax: ``x = [1, h]`` (a constant feature and
``h ~ N(0, 1)``) and ``w = [b; W]`` with ``W ~ N(0, sigma^2 / D)``, so the logits
are ``z_nk = b_k + sigma g_nk`` (``g`` standard normal): ``b_k = -s log(1 + k)`` is a
Zipf prior (a tokenizer numbers frequent tokens first) and ``sigma`` the tokens' own
spread. Labels are drawn from each token's softmax, as a calibrated (trained) model's
would be. Each distribution is reported with its mean entropy (nats) and the mean
probability of the label.

For each case: the fraction of (token block, column chunk) pairs whose products the
filter skips (the rule of ``jxent._fused.filtering`` on the plan's blocks, computed from
the float32 logits), and the median time of ``jit(value_and_grad)`` (gradients to ``x``
and ``w``, mean over the tokens) of ``x @ w`` + optax, jxent without filtering, and jxent
with ``filter_eps="auto"`` (and any other ``--eps``), interleaved.

    python -m benchmarks.bench_filtering                      # the suite, CPU
    python -m benchmarks.bench_filtering --shapes 4096,1024,32000 --dtypes float32 \\
        --repeats 5 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jxent  # noqa: E402
from benchmarks import tables  # noqa: E402
from benchmarks.common import (  # noqa: E402
    command_line,
    eprint,
    finish_record,
    median_times,
    start_record,
)
from jxent._fused import filtering, plan  # noqa: E402

#: (name, Zipf exponent s, spread sigma): from flat to a trained model's peak.
DISTRIBUTIONS = (
    ("flat", 0.0, 0.5),
    ("zipf s=1.5", 1.5, 1.0),
    ("zipf s=2.5", 2.5, 1.0),
    ("zipf s=3.5", 3.5, 1.0),
)
#: 4096 x 1024 x 32000 (the issue's) and a sliced Llama-3 (its hidden size and a quarter
#: of its vocabulary, 2048 tokens).
SHAPES = ((4096, 1024, 32000), (2048, 4096, 32064))


def inputs(n, d, v, s, sigma, dtype, seed=0):
    """``(x, w, labels)`` of the stated distribution, and its entropy and label probability."""
    kh, kw, ky = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(kh, (n, d - 1), jnp.float32)
    x = jnp.concatenate([jnp.ones((n, 1), jnp.float32), h], axis=1)
    prior = -s * jnp.log1p(jnp.arange(v, dtype=jnp.float32))
    w = jnp.concatenate(
        [prior[None, :], jax.random.normal(kw, (d - 1, v), jnp.float32) * (sigma / math.sqrt(d))]
    )
    x, w = x.astype(dtype), w.astype(dtype)
    z = jnp.dot(x, w, preferred_element_type=jnp.float32)
    labels = jax.random.categorical(ky, z)
    log_p = jax.nn.log_softmax(z)
    entropy = float(jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=1)))
    p_label = float(jnp.mean(jnp.exp(jnp.take_along_axis(log_p, labels[:, None], 1))))
    return x, w, labels, z, entropy, p_label


def blocks(n, d, v, dtype):
    """The CPU plan's blocks for a mean loss: ``(token order, token block, column order,
    column chunk, single pass)``, the orders listing rows and columns block by block (a
    grouped block takes the same run of every group: ``jxent._fused.blocks``)."""
    plans, single = plan.plans(n, d, v, "mean", None, 4, float32=jnp.dtype(dtype) == jnp.float32)
    p = dict(plans)["cpu"]

    def order(total, block, groups):
        run, length = block // groups, total // groups
        starts = range(0, length, run)
        return np.concatenate(
            [
                np.arange(g * length + s, g * length + min(s + run, length))
                for s in starts
                for g in range(groups)
            ]
        )

    rows = order(n, p.token_block, p.token_groups)
    if single:
        return rows, p.token_block, np.arange(v), filtering.SINGLE_PASS_CHUNK, True
    return rows, p.token_block, order(v, p.vocab_block, p.vocab_groups), p.vocab_block, False


def skipped_fraction(z, labels, eps, blk) -> float:
    """The fraction of (token block, chunk) pairs the filter skips, for a mean loss."""
    rows, tb, cols, chunk, _ = blk
    n = z.shape[0]
    z, labels = z[rows][:, cols], labels[rows]
    where = jnp.argsort(jnp.asarray(cols))  # a class's position in the block order
    targets = where[labels][:, None]
    dz = (jax.nn.softmax(z) - jax.nn.one_hot(targets[:, 0], z.shape[1], dtype=z.dtype)) / n
    unit = jnp.full((n,), 2.0 / n)  # the mean's g_n = 1/N, u_n = 2 |g_n|
    skipped = [
        filtering.skipped_blocks(
            dz[t0 : t0 + tb], targets[t0 : t0 + tb], unit[t0 : t0 + tb], eps, chunk
        )
        for t0 in range(0, n, tb)
    ]
    return float(jnp.mean(jnp.concatenate(skipped).astype(jnp.float32)))


def contenders(labels, eps_values):
    def unfused(x, w):
        z = jnp.dot(x, w)
        return optax.losses.softmax_cross_entropy_with_integer_labels(z, labels).mean()

    out = {"x @ w + optax": unfused}
    for eps in (None, *eps_values):
        name = "jxent" if eps is None else f"jxent filter_eps={eps}"
        out[name] = lambda x, w, eps=eps: jxent.linear_softmax_cross_entropy(
            x, w, labels, filter_eps=eps
        )
    return {k: jax.value_and_grad(f, argnums=(0, 1)) for k, f in out.items()}


def run(shapes, dtypes, distributions, eps_values, repeats, timed=True, progress=None):
    rows = []
    for n, d, v in shapes:
        for dtype in dtypes:
            blk = blocks(n, d, v, dtype)
            tb, chunk, single = blk[1], blk[3], blk[4]
            for name, s, sigma in distributions:
                x, w, labels, z, entropy, p_label = inputs(n, d, v, s, sigma, dtype)
                fractions = {}
                for eps in eps_values:
                    e = filtering.auto_eps(dtype) if eps == "auto" else float(eps)
                    fractions[str(eps)] = skipped_fraction(z, labels, e, blk)
                row = {
                    "shape": f"{n}x{d}x{v}",
                    "dtype": jnp.dtype(dtype).name,
                    "distribution": name,
                    "entropy_nats": round(entropy, 3),
                    "mean_p_label": round(p_label, 4),
                    "schedule": "single pass" if single else "streaming",
                    "blocks": [tb, chunk],
                    "skipped_fraction": fractions,
                }
                if timed:
                    fns = contenders(labels, eps_values)
                    times = median_times(fns, (x, w), repeats=repeats, warmup=1)
                    row["ms"] = {k: round(1e3 * t, 1) for k, t in times.items()}
                    base = times["x @ w + optax"]
                    row["speedup_vs_unfused"] = {k: round(base / t, 3) for k, t in times.items()}
                rows.append(row)
                eprint(json.dumps(row))
                if progress is not None:
                    progress()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--eps", default="auto", help="filter_eps values besides None")
    p.add_argument("--distributions", default=",".join(d[0] for d in DISTRIBUTIONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-time", action="store_true", help="skipped fractions only")
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_filtering.json"
    )
    p.add_argument("--append", action="store_true", help="add the rows to --out's record")
    args = p.parse_args(argv)
    shapes = [tuple(int(a) for a in s.split(",")) for s in args.shapes.split(";")]
    dtypes = [jnp.dtype(t) for t in args.dtypes.split(",")]
    eps_values = [e if e == "auto" else float(e) for e in args.eps.split(",")]
    wanted = args.distributions.split(",")
    dists = [d for d in DISTRIBUTIONS if d[0] in wanted]
    config = {
        "shapes": shapes,
        "dtypes": [t.name for t in dtypes],
        "eps": eps_values,
        "distributions": dists,
        "repeats": args.repeats,
        "timed": not args.no_time,
    }
    record = start_record(
        command_line("benchmarks.bench_filtering", sys.argv[1:] if argv is None else argv),
        "filtering",
        config,
    )
    started = time.perf_counter()
    record["rows"] = run(shapes, dtypes, dists, eps_values, args.repeats, timed=not args.no_time)
    finish_record(record, started)
    if args.append and args.out.exists():
        # One record of several runs: each run's command, configuration and load beside
        # its rows.
        earlier = json.loads(args.out.read_text())
        runs = earlier.pop("runs", [{k: earlier[k] for k in ("command", "config", "load")}])
        runs.append({k: record[k] for k in ("command", "config", "load")})
        record = {**earlier, "rows": earlier["rows"] + record["rows"], "runs": runs}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(tables.filtering(record))


if __name__ == "__main__":
    main()
