"""jxent's losses on a mesh that spans processes: run by ``tests/test_multiprocess.py``.

    python tests/multiprocess_checks.py OUT.npz --cpu-devices 4
    python tests/multiprocess_checks.py OUT.npz --cpu-devices 2 \\
        --num-processes 2 --process-id I --coordinator localhost:PORT   # I = 0, 1

Either way the devices form the same logical ``("data", "model")`` mesh of 2 x 2: the
devices listed process by process, cut into 2 consecutive groups, one per model index.
With 2 processes the ``"model"`` axis (the vocabulary, the columns of ``w``) spans the
processes and ``"data"`` each process's own 2 devices; with 1 process the same program
runs on 4 local devices. Every process computes the value and gradients of each case
(float32, JAX's default precision) and process 0 writes them, gathered whole, to
``OUT.npz`` as ``"<case>/value"`` and ``"<case>/d<argument>"``.
"""

from __future__ import annotations

import argparse
import sys

import jax

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--cpu-devices", type=int, required=True)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--coordinator")
args = parser.parse_args()

# Before any other JAX call: the devices of this process, then the distributed runtime.
jax.config.update("jax_num_cpu_devices", args.cpu_devices)
if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=60,
    )

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402
import jxent.parallel  # noqa: E402

ROWS, HIDDEN, VOCAB, IGNORE = 16, 8, 64, -100
assert jax.device_count() == 4 and jax.process_count() == args.num_processes


def make_mesh(axis_type=AxisType.Auto) -> Mesh:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.array(devices).reshape(2, 2).T  # [data, model]: model = the device group
    return Mesh(grid, ("data", "model"), axis_types=(axis_type,) * 2)


def put(mesh: Mesh, a: np.ndarray, *spec) -> jax.Array:
    """A global array from the same host data in every process (each takes its shards)."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, P(*spec)), lambda i: a[i])


def gathered(tree):
    """Every output, whole, on the host of every process."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


rng = np.random.default_rng(0)
logits = (3.0 * rng.standard_normal((ROWS, VOCAB))).astype(np.float32)
labels = rng.integers(0, VOCAB, ROWS).astype(np.int32)
labels[[3, ROWS - 2]] = IGNORE
x = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
w = (0.7 * rng.standard_normal((HIDDEN, VOCAB))).astype(np.float32)
bias = (0.3 * rng.standard_normal(VOCAB)).astype(np.float32)

results: dict[str, np.ndarray] = {}


def record(case: str, names: tuple[str, ...], value, grads) -> None:
    value, grads = gathered((value, grads))
    results[f"{case}/value"] = value
    for name, g in zip(names, grads, strict=True):
        results[f"{case}/d{name}"] = g


# The logits losses under jit: logits split over tokens ("data") and vocabulary ("model").
mesh = make_mesh()
for case, options in {
    "integer_labels": dict(ignore_index=IGNORE),
    "integer_labels_smoothing": dict(ignore_index=IGNORE, label_smoothing=0.1),
}.items():

    def loss(z, y, options=options):
        return jxent.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean", **options)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0,)))(
        put(mesh, logits, "data", "model"), put(mesh, labels, "data")
    )
    record(case, ("logits",), value, grads)


# The fused loss under jit, w split over the vocabulary: on Auto axes (GSPMD) and on
# Explicit axes (where the library runs its shard_map form).
def linear_loss(x, w, b, y):
    return jxent.linear_softmax_cross_entropy(
        x, w, y, bias=b, ignore_index=IGNORE, z_loss=1e-3, label_smoothing=0.05, reduction="mean"
    )


for case, axis_type in {"linear_auto": AxisType.Auto, "linear_explicit": AxisType.Explicit}.items():
    mesh = make_mesh(axis_type)
    inputs = (
        put(mesh, x, "data", None),
        put(mesh, w, None, "model"),
        put(mesh, bias, "model"),
        put(mesh, labels, "data"),
    )
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(linear_loss, argnums=(0, 1, 2)))(*inputs)
    record(case, ("x", "w", "bias"), value, grads)


# jxent.parallel under shard_map: each device holds its columns and the mesh axis names.
mesh = make_mesh()


def parallel_logits(z, y):
    return jxent.parallel.softmax_cross_entropy_with_integer_labels(
        z,
        y,
        axis_name="model",
        batch_axis_name="data",
        ignore_index=IGNORE,
        label_smoothing=0.1,
        z_loss=1e-3,
        reduction="mean",
    )


sharded = jax.shard_map(
    parallel_logits, mesh=mesh, in_specs=(P("data", "model"), P("data")), out_specs=P()
)
value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0,)))(
    put(mesh, logits, "data", "model"), put(mesh, labels, "data")
)
record("parallel_logits", ("logits",), value, grads)

# The fused form with a vocabulary that does not split evenly: V = 63, w padded to 64.
V = VOCAB - 1
labels_v = np.where(labels == V, 0, labels).astype(np.int32)


def parallel_linear(x, w, b, y):
    return jxent.parallel.linear_softmax_cross_entropy(
        x,
        w,
        y,
        axis_name="model",
        batch_axis_name="data",
        bias=b,
        num_classes=V,
        ignore_index=IGNORE,
        z_loss=1e-3,
        reduction="mean",
    )


sharded = jax.shard_map(
    parallel_linear,
    mesh=mesh,
    in_specs=(P("data", None), P(None, "model"), P("model"), P("data")),
    out_specs=P(),
)
w_pad = w.copy()
w_pad[:, V:] = 0.5  # padding columns: any values
value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(
    put(mesh, x, "data", None),
    put(mesh, w_pad, None, "model"),
    put(mesh, bias, "model"),
    put(mesh, labels_v, "data"),
)
record("parallel_linear", ("x", "w", "bias"), value, grads)

if jax.process_index() == 0:
    np.savez(args.out, **results)
print(f"process {jax.process_index()}: {len(results)} results", file=sys.stderr)
