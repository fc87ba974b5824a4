"""The fused losses beyond cross-entropy (issue 14): compiled memory and CPU time.

    python -m benchmarks.bench_fused_losses [--target cpu|tpu-v5e] [--quick] [--out DIR]

* **Memory** at Gemma-2's output layer (8192 tokens x 2304 x 256000, bfloat16, a teacher's
  top-64, or a teacher given as hidden states of the same shape):
  ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` compiled (nothing runs) for each
  fused loss (the KL, distillation and Jensen-Shannon divergence from either teacher),
  beside the fused cross-entropy and the unfused compositions as an optax user writes
  them (``x @ w``, then optax's KL against the teacher's distribution, given dense or as
  ``x_t @ w_t``). ``--target tpu-v5e`` compiles for a TPU without a device
  (libtpu, from the test extra); only one process may hold libtpu at a time.
* **Time** (CPU only) at 4096 x 1024 x 32000, bfloat16 and float32: the fused top-64
  distillation KL against ``x @ w`` + ``optax.losses.kl_divergence`` on the teacher's
  dense probabilities, and the fused KL from the teacher's hidden states against ``x @ w``,
  ``x_t @ w_t`` + optax's KL; medians after warm-up, interleaved.

Writes ``<out>/<target>_fused_losses.json`` (``<out>``: ``benchmarks/results``), which
``python -m benchmarks.tables`` turns into the README's table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jxent
from benchmarks.common import (
    command_line,
    compiled_memory,
    eprint,
    finish_record,
    median_times,
    row,
    start_record,
)

ROOT = Path(__file__).resolve().parents[1]
GEMMA2 = (8192, 2304, 256000)
TIMED = (4096, 1024, 32000)
TOP_K = 64
TEMPERATURE = 2.0


def _losses():
    """name -> loss of (x, w, labels, indices, log_probs, dense teacher, x_t, w_t)."""
    t = TEMPERATURE

    def unfused(x, w, y, i, lp, p, xt, wt):
        logits = (x @ w).astype(jnp.float32) / t
        return t * t * optax.losses.kl_divergence(jax.nn.log_softmax(logits), p).mean()

    def unfused_hidden(x, w, y, i, lp, p, xt, wt):
        logits = (x @ w).astype(jnp.float32) / t
        teacher = jax.nn.softmax((xt @ wt).astype(jnp.float32) / t)
        return t * t * optax.losses.kl_divergence(jax.nn.log_softmax(logits), teacher).mean()

    return {
        "jxent cross-entropy": lambda x, w, y, i, lp, p, *_: jxent.linear_softmax_cross_entropy(
            x, w, y
        ),
        "jxent cross-entropy, w_layout='vd'": "vd",
        "jxent log-probs + entropy": lambda x, w, y, i, lp, p, *_: sum(
            jnp.mean(o) for o in jxent.linear_log_probs(x, w, y, return_entropy=True)
        ),
        "jxent KL (top-64)": lambda x, w, y, i, lp, p, *_: jxent.linear_softmax_kl_divergence(
            x, w, (i, lp), temperature=t
        ),
        "jxent distillation, alpha 0.5 (top-64)": lambda x, w, y, i, lp, p, *_: (
            jxent.linear_distillation_loss(x, w, y, (i, lp), temperature=t)
        ),
        "jxent Jensen-Shannon, beta 0.5 (top-64)": lambda x, w, y, i, lp, p, *_: (
            jxent.linear_softmax_jensen_shannon_divergence(x, w, (i, lp), temperature=t)
        ),
        "jxent KL (teacher hidden states)": lambda x, w, y, i, lp, p, xt, wt: (
            jxent.linear_softmax_kl_divergence(x, w, (xt, wt), temperature=t)
        ),
        "jxent distillation, alpha 0.5 (teacher hidden states)": (
            lambda x, w, y, i, lp, p, xt, wt: jxent.linear_distillation_loss(
                x, w, y, (xt, wt), temperature=t
            )
        ),
        # Two forward passes (the mixture needs both log-sum-exps at every class).
        "jxent Jensen-Shannon, beta 0.5 (teacher hidden states)": (
            lambda x, w, y, i, lp, p, xt, wt: jxent.linear_softmax_jensen_shannon_divergence(
                x, w, (xt, wt), temperature=t
            )
        ),
        "x @ w + optax KL (dense teacher)": unfused,
        "x @ w, x_t @ w_t + optax KL": unfused_hidden,
    }


def _specs(shape, dtype, sharding=None):
    n, d, v = shape
    kw = {} if sharding is None else {"sharding": sharding}
    s = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, **kw)  # noqa: E731
    return {
        "x": s((n, d), dtype),
        "w": s((d, v), dtype),
        "wt": s((v, d), dtype),
        "y": s((n,), jnp.int32),
        "i": s((n, TOP_K), jnp.int32),
        "lp": s((n, TOP_K), jnp.float32),
        "p": s((n, v), jnp.float32),
        "xt": s((n, d), dtype),
    }


def memory(target: str) -> list[dict]:
    sharding = None
    if target != "cpu":
        from jax.experimental import topologies
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        topo = topologies.get_topology_desc(
            target.split("-")[1] + "=1x1", "tpu", chips_per_host_bounds=(1, 1, 1)
        )
        sharding = NamedSharding(topologies.make_mesh(topo, (1,), ("d",)), P())
    rows = []
    for dtype in (jnp.bfloat16,):
        sp = _specs(GEMMA2, dtype, sharding)
        contenders = {}
        for name, fn in _losses().items():
            # The teacher's hidden states and weight: the student's shapes.
            args = (sp["x"], sp["w"], sp["y"], sp["i"], sp["lp"], sp["p"], sp["xt"], sp["w"])
            if fn == "vd":
                fn = lambda x, w, y, *_: jxent.linear_softmax_cross_entropy(  # noqa: E731
                    x, w, y, w_layout="vd"
                )
                args = (sp["x"], sp["wt"], *args[2:])
            grad = jax.value_and_grad(fn, argnums=(0, 1))
            try:
                contenders[name] = compiled_memory(grad, *args)
            except jax.errors.JaxRuntimeError as e:  # e.g. more than the chip's HBM
                contenders[name] = {"error": str(e).splitlines()[0][:200]}
            eprint(f"{target} {name}: {contenders[name]}")
        rows.append(row("gemma2", dtype, GEMMA2, contenders, "x @ w + optax KL (dense teacher)"))
    return rows


def timing(repeats: int) -> list[dict]:
    rows = []
    n, d, v = TIMED
    losses = _losses()
    pairs = {
        "kl-time": ("jxent KL (top-64)", "x @ w + optax KL (dense teacher)"),
        "kl-hidden-time": ("jxent KL (teacher hidden states)", "x @ w, x_t @ w_t + optax KL"),
    }
    for dtype in (jnp.bfloat16, jnp.float32):
        k = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(k[0], (n, d)).astype(dtype)
        w = (jax.random.normal(k[1], (d, v)) / jnp.sqrt(d)).astype(dtype)
        y = jax.random.randint(k[2], (n,), 0, v)
        t_logp = jax.nn.log_softmax(jax.random.normal(k[2], (n, v)) * 2 / TEMPERATURE)
        lp, i = jax.lax.top_k(t_logp, TOP_K)
        xt = jax.random.normal(k[3], (n, d)).astype(dtype)
        wt = (2 * jax.random.normal(k[4], (d, v)) / jnp.sqrt(d)).astype(dtype)
        args = (x, w, y, i, lp, jnp.exp(t_logp), xt, wt)
        for case, names in pairs.items():
            fns = {name: jax.value_and_grad(losses[name], argnums=(0, 1)) for name in names}
            times = median_times(fns, args, repeats=repeats, warmup=1)
            contenders = {
                name: {"ms": 1e3 * times[name], **compiled_memory(fns[name], *args)}
                for name in names
            }
            eprint(f"cpu {case} {jnp.dtype(dtype).name}: {contenders}")
            rows.append(row(case, dtype, TIMED, contenders, names[1]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu", choices=["cpu", "tpu-v5e", "tpu-v6e"])
    parser.add_argument("--quick", action="store_true", help="3 timed repeats, not 5")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    record = start_record(
        command_line("benchmarks.bench_fused_losses", sys.argv[1:] if argv is None else argv),
        "fused_losses",
        {"target": args.target, "memory_shape": GEMMA2, "timed_shape": TIMED, "top_k": TOP_K},
    )
    record["rows"] = memory(args.target)
    if args.target == "cpu":
        record["rows"] += timing(3 if args.quick else 5)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.target}_fused_losses.json"
    path.write_text(json.dumps(finish_record(record, started), indent=1) + "\n")
    eprint(f"wrote {path}")


if __name__ == "__main__":
    main()
