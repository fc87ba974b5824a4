"""Any fused loss of arrays typed with ``Explicit`` mesh axes.

A loop over vocabulary blocks of a ``w`` sharded over its columns has no typed sharded
form, so the loss runs under ``shard_map`` over the arrays' mesh: tokens split as
``x``'s batch dimensions are (over the axes that do not split the vocabulary),
vocabulary columns as ``w``'s are. Each device then runs the same loss on a call whose
options say so: the vocabulary split over ``w``'s axes (``Options.split``, the engine's
combine across them) or none, and the tokens' axes as ``batch_axis_name`` (the mean's
sums across them). Every array of the call, and a teacher's, is resharded to those
specs first (``jax.sharding.reshard``), so a call with no mesh set works too.

Internal API: :func:`sharded`, :func:`run`, :data:`TOKENS`, :data:`SCALAR`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jxent._fused.options import Call
from jxent._split import vocab_layout

#: ``run``'s ``outputs`` markers: an output per token, or one number.
TOKENS, SCALAR = "tokens", "scalar"


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec(a: jax.Array) -> tuple:
    """The array's PartitionSpec entries (one per dimension) when typed with Explicit axes."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    if spec is None:
        return (None,) * a.ndim
    return tuple(spec) + (None,) * (a.ndim - len(spec))


def _typed(a) -> bool:
    return a is not None and any(_names(e) for e in _spec(a))


def sharded(call: Call) -> bool:
    """Whether the call's arrays are typed with Explicit mesh axes (outside shard_map;
    a call already split over a mesh axis runs as it is)."""
    opts = call.options
    if opts.split is not None or opts.batch_axis_name is not None:
        return False
    return any(_typed(a) for a in (call.x, call.w, call.labels))


def run(body: Callable, call: Call, teacher=None, outputs=SCALAR):
    """``body(local_call, local_teacher)`` on every device of the arrays' mesh under
    ``shard_map`` (see the module docstring). ``teacher``: None, a top-k ``(indices,
    log_probs)`` (split as the tokens) or hidden states ``(x_t, w_t[, bias_t])`` (``x_t``
    as the tokens, ``w_t`` and ``bias_t`` as ``w`` and ``bias``); ``outputs``: a pytree of
    :data:`TOKENS` / :data:`SCALAR`, the body's outputs."""
    opts = call.options
    vocab_dim = 1 if opts.w_layout == "dv" else 0
    vocab = _names(_spec(call.w)[vocab_dim])
    batch = tuple(tuple(n for n in _names(e) if n not in vocab) or None for e in _spec(call.x)[:-1])
    batch_names = tuple(n for e in batch for n in _names(e)) or None
    mesh = jax.typeof(next(a for a in (call.w, call.x, call.labels) if _typed(a))).sharding.mesh
    vocab_entry = (vocab if len(vocab) > 1 else vocab[0]) if vocab else None
    tokens = P(*batch)
    rows = P(*batch, None)  # [..., D] or [..., k]: split as the tokens, last axis whole
    columns = P(vocab_entry)
    w_spec = P(None, vocab_entry) if vocab_dim == 1 else P(vocab_entry, None)
    arrays = {
        "x": (call.x, rows),
        "w": (call.w, w_spec),
        "bias": (call.bias, columns),
        "labels": (call.labels, tokens),
        "class_weights": (call.class_weights, columns),
        "row_mask": (call.row_mask, tokens),
        "token_weights": (call.token_weights, tokens),
        "normalizer": (call.normalizer, P()),
    }
    if teacher is not None:
        hidden = len(teacher) == 3 or jax.numpy.issubdtype(teacher[0].dtype, jax.numpy.floating)
        parts = (rows, w_spec, columns) if hidden else (rows, rows)
        for i, (a, spec) in enumerate(zip(teacher, parts, strict=False)):
            arrays[f"teacher{i}"] = (a, spec)
    arrays = {k: a for k, a in arrays.items() if a[0] is not None}
    specs = {k: spec for k, (_, spec) in arrays.items()}
    local_arrays = {
        k: jax.sharding.reshard(a, NamedSharding(mesh, spec)) for k, (a, spec) in arrays.items()
    }

    def local(arrays):
        split = None
        if vocab:
            w = arrays["w"]
            split = vocab_layout(vocab_entry, w.shape[vocab_dim], opts.num_classes)
        fields = {k: arrays.get(k) for k in Call._fields if k not in ("options", "acc")}
        local_call = Call(
            opts._replace(split=split, batch_axis_name=batch_names), **fields, acc=call.acc
        )
        local_teacher = None
        if teacher is not None:
            local_teacher = tuple(arrays.get(f"teacher{i}") for i in range(len(teacher)))
        return body(local_call, local_teacher)

    out_specs = jax.tree.map(lambda o: tokens if o == TOKENS else P(), outputs)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs)(local_arrays)
