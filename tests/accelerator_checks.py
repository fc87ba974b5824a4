"""Compiles the fused loss for a TPU without a device and prints its memory as JSON.

Run by ``tests/test_accelerators.py`` in a subprocess: only one process at a time may
hold libtpu (a lock file), so every TPU compilation of the suite happens here, in one
process. ``python tests/accelerator_checks.py [v5e|v6e]``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent._fused import plan

MiB = 2**20
#: Gemma 2's output layer: 8192 tokens, hidden size 2304, vocabulary 256000.
N, D, V = 8192, 2304, 256000


def main(target: str) -> None:
    topo = topologies.get_topology_desc(f"{target}=1x1", "tpu", chips_per_host_bounds=(1, 1, 1))
    mesh = topologies.make_mesh(topo, (1,), ("d",))
    spec = NamedSharding(mesh, P())

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

    def fused(x, w, y):
        return jxent.linear_softmax_cross_entropy(x, w, y)

    def unfused(x, w, y):
        logits = (x @ w).astype(jnp.float32)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def compiled_program(fn, dtype):
        args = (struct((N, D), dtype), struct((D, V), dtype), struct((N,), jnp.int32))
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()

    def compiled(fn, dtype):
        return compiled_program(fn, dtype).memory_analysis()

    out = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        name = jnp.dtype(dtype).name
        program = compiled_program(fused, dtype)
        mem = program.memory_analysis()
        tpu = dict(plan.plans(N, D, V, "mean", None, 4, float32=dtype == jnp.float32)[0])["tpu"]
        out[name] = {
            "temp_mib": mem.temp_size_in_bytes / MiB,
            "output_mib": mem.output_size_in_bytes / MiB,
            # The floor: a float32 dx accumulator and one float32 logits block.
            "floor_mib": (N * D * 4 + tpu.token_block * tpu.vocab_block * 4) / MiB,
            # A bfloat16 copy of the whole of w (XLA:TPU's at the default precision).
            "whole_bf16_w": f"bf16[{D},{V}]" in program.as_text(),
        }
    # precision= reaches every matrix product of the TPU program, forward and backward
    # (issue 24): each dot_general of the lowering carries the caller's precision.
    for precision in ("highest", "high"):

        def asked(x, w, y, precision=precision):
            return jxent.linear_softmax_cross_entropy(x, w, y, precision=precision)

        args = (struct((N, D), jnp.float32), struct((D, V), jnp.float32), struct((N,), jnp.int32))
        text = jax.jit(jax.value_and_grad(asked, argnums=(0, 1))).lower(*args).as_text()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        tag = f"precision = [{precision.upper()}, {precision.upper()}]"
        out["float32"][f"dots_{precision}"] = [len(dots), sum(tag in line for line in dots)]
    out["bfloat16"]["unfused_temp_mib"] = compiled(unfused, jnp.bfloat16).temp_size_in_bytes / MiB
    # The distillation KL from a teacher's top-64 (issue 14): it scatters into dz's blocks.
    k = 64
    top = (struct((N, k), jnp.int32), struct((N, k), jnp.float32))

    def kl(x, w, i, lp):
        return jxent.linear_softmax_kl_divergence(x, w, (i, lp), temperature=2.0)

    args = (struct((N, D), jnp.bfloat16), struct((D, V), jnp.bfloat16), *top)
    mem = jax.jit(jax.value_and_grad(kl, argnums=(0, 1))).lower(*args).compile()
    out["bfloat16"]["kl_temp_mib"] = mem.memory_analysis().temp_size_in_bytes / MiB
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v5e")
