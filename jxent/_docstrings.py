"""The docstring entries the public fused losses share, written once.

The fused losses (``jxent.linear`` and their ``jxent.parallel`` forms) take the same
options, and their docstrings said the same about them in up to eleven places, each
copy to be edited alike. A shared entry lives here; a docstring holds a line with only
its marker, ``<name>``, at the entry's indentation, and :func:`fill` replaces that line
with the entry, re-indented there, when the module is imported, so ``help()``,
``inspect.getdoc`` and Sphinx read the whole text.

An entry is shared when it spans several lines and several docstrings repeat it. A
one-line entry stays in its docstring, where it reads as well as its marker would, and
an entry whose wording says something about its function alone (the cross-entropy's
``implementation``, the only loss ``"pallas_tpu"`` runs) stays local. A marker is named
after its parameter (or section): ``_teacher`` for the distillation losses' wording,
``_split`` for the ``jxent.parallel`` forms', which speak of shards and
``batch_axis_name``.

Imports nothing from jxent, so any module may use it.

Internal API: ``fill`` (the decorator), ``FRAGMENTS`` (marker name -> entry).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

_F = TypeVar("_F", bound=Callable)


def _entries(**texts: str) -> dict[str, str]:
    return {name: textwrap.dedent(text).strip("\n") for name, text in texts.items()}


FRAGMENTS = _entries(
    filter_eps="""
        filter_eps: gradient filtering. ``None`` (default): off. A number ``eps``
          in ``[0, 1]`` or ``"auto"`` (the inputs' unit roundoff: ``2**-8`` for
          bfloat16, ``2**-24`` for float32): the backward pass skips the matrix products
          of blocks whose gradient off the targets (labels, a teacher's classes) is
          negligible, losing at most ``eps`` of each token's ``L1`` gradient mass (the
          loss is unchanged). Faster where a trained model's softmax is peaked; see the
          README's "Gradient filtering".
        """,
    precision="""
        precision: the matrix products' precision, as ``jnp.dot``'s (``None``,
          ``"default"``, ``"high"``, ``"highest"``, a ``jax.lax.Precision`` or a pair).
          ``None`` (default): what ``x @ w`` would get (``jax.default_matmul_precision``
          where set; on TPU, float32 products in one bfloat16 pass, rounded block by
          block). ``"highest"`` for float32 products in float32 everywhere.
        """,
    implementation="""
        implementation: which implementation runs the loss: ``None`` or ``"auto"``
          (default: the first of the library's implementations that supports the call),
          or a name, ``"xla"`` (the blocked loops, compiled by XLA on every platform).
        """,
    schedule="""
        schedule: ``"auto"`` (default: the single pass when the loss is summed or
          averaged and its float32 ``[D, V]`` weight-gradient accumulator takes at most
          256 MiB, else streaming), ``"single_pass"`` (a summed or averaged loss in
          three matrix products instead of four, for that accumulator's ``4 D V`` bytes:
          2.2 GiB at Gemma 2's 2304 x 256000) or ``"streaming"`` (temporary memory
          that does not grow with ``V``).
        """,
    normalizer="""
        normalizer: a scalar to divide the ``"mean"``'s sum by instead (e.g. the global
          token count of the whole batch when the loss is accumulated over
          micro-batches); a constant.
        """,
    w_layout="""
        w_layout: ``"dv"`` (default, ``w`` is ``[D, V]``) or ``"vd"`` (``[V, D]``, a tied
          embedding table, read in place).
        """,
    temperature_teacher="""
        temperature: :math:`T > 0`, a static Python number: the student's logits are
          divided by it (the teacher's top-k log-probabilities are taken as given, at
          the temperature they were computed at) and the divergence scaled by
          :math:`T^2`, so that its gradient keeps its size as :math:`T` changes.
        """,
    token_weights_teacher="""
        token_weights: optional float weights of shape ``x.shape[:-1]`` (constants)
          multiplying each token's loss; ``"mean"`` divides by their sum.
        """,
    normalizer_split="""
        normalizer: a scalar to divide the ``"mean"``'s sum (over every device of
          ``batch_axis_name`` if given) by instead, e.g. the global token count of the
          whole batch; a constant. Only with ``reduction="mean"``.
        """,
    w_layout_split="""
        w_layout: ``"dv"`` (default): ``local_w`` is ``[D, V_local]``; ``"vd"``: this
          shard's ``[V_local, D]`` rows of a tied embedding table, read in place.
        """,
    w_layout_teacher_split="""
        w_layout: ``"dv"`` (default): ``local_w`` is ``[D, V_local]`` (and a teacher's
          ``local_w_t`` ``[D_t, V_local]``); ``"vd"``: this shard's ``[V_local, D]`` rows of
          a tied embedding table, read in place.
        """,
    reduction_split="""
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``; over this device's
          tokens, or over every device of ``batch_axis_name`` if given.
        """,
    token_weights_teacher_split="""
        token_weights: float per-token weights (constants); ``"mean"`` divides by their
          sum over the kept tokens.
        """,
    returns_split="""
        float32 losses (float64 for float64 inputs), per token for ``"none"``, else a
        scalar; equal on every shard of ``axis_name``.
        """,
)

# A marker is a whole line: docstrings already hold braces (``:math:``) and ``%``, and a
# line of its own carries the indentation the entry takes.
_MARKER = re.compile(r"^([ ]*)<([a-z_]+)>[ ]*$", re.MULTILINE)
_STRAY = re.compile(r"<[a-z_]+>")


def fill(fn: _F) -> _F:
    """Replace each marker line of ``fn``'s docstring with its entry; raise at import
    on a marker that names no entry, one not alone on its line, or none at all."""
    doc = fn.__doc__
    if doc is None:  # python -OO: no docstrings to fill
        return fn

    def entry(match: re.Match) -> str:
        indent, name = match.groups()
        if name not in FRAGMENTS:
            raise ValueError(
                f"{fn.__qualname__}'s docstring: no entry <{name}> in jxent._docstrings "
                f"(there are {', '.join(sorted(FRAGMENTS))})."
            )
        return textwrap.indent(FRAGMENTS[name], indent)

    filled = _MARKER.sub(entry, doc)
    if filled == doc:
        raise ValueError(f"{fn.__qualname__}'s docstring has no <name> line to fill.")
    stray = _STRAY.search(filled)
    if stray:
        raise ValueError(
            f"{fn.__qualname__}'s docstring: {stray.group()} is not alone on its line."
        )
    fn.__doc__ = filled
    return fn
