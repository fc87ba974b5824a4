"""Whether a refactor of the fused losses changed the programs XLA runs.

    python -m benchmarks.same_program --save FILE      # before the change
    python -m benchmarks.same_program --compare FILE   # after: exit 1 if any differs

Compiles ``jax.value_and_grad`` of every fused loss (one device: both schedules, the
options that change the program; ``jxent.parallel`` under ``shard_map`` on 4 simulated
CPU devices) and records, per case, XLA's compiled temporary memory and a hash of the
optimised HLO with its names and metadata taken out. Equal hashes mean the same
instructions on the same shapes in the same order: the change cannot have cost time or
memory, on this machine's compiler. A case whose hash differs prints the first lines
that differ, to read before trusting a timing.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import difflib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402

N, D, V, K = 256, 128, 2048, 8
STREAM = 512  # chunk_size: vocabulary blocks narrower than V (the streaming schedule)


def _inputs(dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (N, D), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (D, V), jnp.float32) / 10).astype(dtype)
    y = jax.random.randint(keys[2], (N,), 0, V)
    idx = jax.random.randint(keys[3], (N, K), 0, V)
    lp = jax.nn.log_softmax(jax.random.normal(keys[4], (N, K), jnp.float32), axis=-1)
    xt = jax.random.normal(keys[5], (N, D), jnp.float32).astype(dtype)
    return x, w, y, (idx, lp), xt


def one_device_cases():
    """name -> (loss of (x, w), dtype)."""
    cases = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        dn = jnp.dtype(dtype).name
        x, w, y, topk, xt = _inputs(dtype)
        cw = jnp.linspace(0.5, 1.5, V, dtype=jnp.float32)
        tw = jnp.linspace(0.0, 1.0, N, dtype=jnp.float32)
        for chunk in (None, STREAM):
            sched = "single" if chunk is None else "stream"
            opts = {
                "plain": {},
                "options": dict(
                    label_smoothing=0.1,
                    z_loss=1e-4,
                    logit_soft_cap=30.0,
                    class_weights=cw,
                    token_weights=tw,
                    num_classes=V - 5,
                ),
                "vd": dict(w_layout="vd"),
                "lse": dict(return_lse=True),
            }
            for name, kw in opts.items():

                def xent(x, w, kw=kw, chunk=chunk, y=y):
                    ww = w.T if kw.get("w_layout") == "vd" else w
                    out = jxent.linear_softmax_cross_entropy(x, ww, y, chunk_size=chunk, **kw)
                    return (out[0] + out[1].sum()) if kw.get("return_lse") else out

                cases[f"xent/{name}/{sched}/{dn}"] = (xent, dtype)
            cases[f"entropy/{sched}/{dn}"] = (
                lambda x, w, c=chunk: jxent.linear_entropy(x, w, chunk_size=c),
                dtype,
            )
            cases[f"kl_topk/{sched}/{dn}"] = (
                lambda x, w, c=chunk, topk=topk: jxent.linear_softmax_kl_divergence(
                    x, w, topk, temperature=2.0, chunk_size=c
                ),
                dtype,
            )
            cases[f"distill_topk/{sched}/{dn}"] = (
                lambda x, w, c=chunk, y=y, topk=topk: jxent.linear_distillation_loss(
                    x, w, y, topk, alpha=0.5, chunk_size=c
                ),
                dtype,
            )
            cases[f"kl_hidden/{sched}/{dn}"] = (
                lambda x, w, c=chunk, xt=xt: jxent.linear_softmax_kl_divergence(
                    x, w, (xt, w), chunk_size=c
                ),
                dtype,
            )
            cases[f"jsd_hidden/{sched}/{dn}"] = (
                lambda x, w, c=chunk, xt=xt: jxent.linear_softmax_jensen_shannon_divergence(
                    x, w, (xt, w), beta=0.5, chunk_size=c
                ),
                dtype,
            )
        cases[f"log_probs/{dn}"] = (
            lambda x, w, y=y: jxent.linear_log_probs(x, w, y).sum(),
            dtype,
        )
    return cases


def parallel_cases():
    """name -> (loss of (x, w) under shard_map over a (data 2, model 2) mesh, dtype)."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, w, y, topk, xt = _inputs(jnp.float32)
    par = jxent.parallel

    def sharded(local):
        fn = jax.shard_map(
            local, mesh=mesh, in_specs=(P("data", None), P(None, "model")), out_specs=P()
        )
        return fn

    def on_tokens(a):
        return jax.lax.dynamic_slice_in_dim(
            a, jax.lax.axis_index("data") * (N // 2), N // 2, axis=0
        )

    common = dict(axis_name="model", batch_axis_name="data", chunk_size=STREAM)
    locals_ = {
        "xent": lambda xl, wl: par.linear_softmax_cross_entropy(
            xl, wl, on_tokens(y), label_smoothing=0.1, **common
        ),
        "entropy": lambda xl, wl: par.linear_entropy(xl, wl, **common),
        "kl_topk": lambda xl, wl: par.linear_distillation_loss(
            xl, wl, None, (on_tokens(topk[0]), on_tokens(topk[1])), alpha=0.0, **common
        ),
        "jsd_hidden": lambda xl, wl: par.linear_softmax_jensen_shannon_divergence(
            xl, wl, (on_tokens(xt), wl), beta=0.5, **common
        ),
    }
    return {f"parallel/{k}/float32": (sharded(f), jnp.float32) for k, f in locals_.items()}


_NAME = re.compile(r"%?[A-Za-z_][\w\-]*(\.\d+)+")


def canonical_hlo(text: str) -> str:
    """The optimised HLO without metadata, names numbered in order of appearance."""
    # The source-location tables (file and function names, stack frames) say where the
    # code lives, not what it computes: a moved function must not count as a change.
    tables = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
    text = "\n\n".join(b for b in text.split("\n\n") if not b.startswith(tables))
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
    text = re.sub(r",?\s*stack_frame_id=\d+", "", text)
    text = re.sub(r",?\s*frontend_attributes=\{[^}]*\}", "", text)
    text = re.sub(r"HloModule \S+", "HloModule m", text)
    names: dict[str, str] = {}

    def rename(m):
        return names.setdefault(m.group(0), f"n{len(names)}")

    return _NAME.sub(rename, text)


def _instructions(record: dict) -> collections.Counter:
    """The program's lines with every name taken out, as a multiset."""
    unnamed = (
        re.sub(r"%?[A-Za-z_][\w\-]*(\.\d+)*", "N", line) for line in record["hlo"].splitlines()
    )
    return collections.Counter(unnamed)


def measure(fn, dtype) -> dict:
    x, w, *_ = _inputs(dtype)
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    compiled = step.lower(x, w).compile()
    text = canonical_hlo(compiled.as_text())
    return {
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "hlo_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "hlo": text,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path)
    group.add_argument("--compare", type=Path)
    args = parser.parse_args(argv)
    cases = {**one_device_cases(), **parallel_cases()}
    got = {}
    for name, (fn, dtype) in cases.items():
        got[name] = measure(fn, dtype)
        print(f"{name:32s} temp {got[name]['temp_bytes']:>10d}  {got[name]['hlo_sha256'][:12]}")
    if args.save:
        args.save.write_text(json.dumps(got, indent=1))
        return 0
    before = json.loads(args.compare.read_text())
    changed = reordered = 0
    for name, now in got.items():
        old = before.get(name)
        if old is None:
            print(f"NEW   {name}")
            continue
        if old["hlo_sha256"] == now["hlo_sha256"] and old["temp_bytes"] == now["temp_bytes"]:
            continue
        if old["temp_bytes"] == now["temp_bytes"] and _instructions(old) == _instructions(now):
            # The same instructions on the same shapes, listed in another order (e.g. the
            # constants a loss captures, traced in another order): nothing runs differently.
            reordered += 1
            print(f"ORDER {name}: the same instructions in another order")
            continue
        changed += 1
        print(f"DIFF  {name}: temp {old['temp_bytes']} -> {now['temp_bytes']}")
        diff = difflib.unified_diff(
            old["hlo"].splitlines(), now["hlo"].splitlines(), lineterm="", n=0
        )
        for line in list(diff)[:12]:
            print("      " + line[:160])
    print(
        f"{len(got) - changed} of {len(got)} cases compile to the same program"
        + (f" ({reordered} with its instructions in another order)" if reordered else "")
    )
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
