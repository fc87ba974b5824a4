"""The blocked engine: any fused loss of ``z = x @ w (+ bias)`` without the logits array,
and the seam where its implementations plug in.

A loss is written once, to the contract (:mod:`jxent._fused.contract`); the engine
produces the logits one ``[token_block, vocab_block]`` block at a time, in float32
(float64 for float64 inputs), keeps the per-token numbers the loss asked for with an
online log-sum-exp, and runs the backward pass block by block from the loss's
``dloss/dlogits``. Two schedules, under a ``jax.custom_vjp``
(:mod:`jxent._fused.rules`):

* **streaming** (:mod:`jxent._fused.streaming`; vocabulary blocks narrower than the
  vocabulary, Cut Cross-Entropy's schedule): the forward pass saves only per-token
  numbers, the backward pass recomputes the logits. Four matrix products of the size
  of ``x @ w`` (five with a second pass). It alone runs split over a mesh axis
  (``Spec.axis_name``).
* **single pass** (:mod:`jxent._fused.single_pass`; a block spans the whole
  vocabulary, the loss summed over tokens; Liger Kernel's schedule): the gradients are
  computed with the loss, into a float32 ``[D, V]`` accumulator. Three products.

**Implementations** (``Spec.implementation``, the public ``implementation=``): a name
of :data:`IMPLEMENTATIONS`, each an :class:`Implementation` giving both schedules'
differentiable functions for the same contract. ``"xla"`` is the blocked loops of
this package, which XLA compiles on every platform; ``"pallas_tpu"``
(:mod:`jxent._fused.pallas_tpu`) runs the cross-entropy as Pallas Mosaic-TPU kernels
(Pallas' interpreter elsewhere). A kernel (a backward pass that skips blocks) joins by
adding an entry: it receives the same
:class:`~jxent._fused.contract.Spec` (the loss object, its plans, soft cap,
temperature, padding and layout) and :class:`~jxent._fused.contract.Inputs`, says
which calls it can run (:attr:`Implementation.supports`), and is tested against the
same float64 references as ``"xla"`` (``tests/test_fused_engine.py`` runs every
registered implementation). :func:`choose` turns the caller's choice (``None`` or
``"auto"``: the first registered implementation that supports the call) into a name,
with a clear error for an unknown or unsupported one. ``"xla"`` comes first: a kernel
goes before it once it is timed faster on its hardware (``"pallas_tpu"`` has not been
run on a TPU yet; compiled for v5e it needs no temporary memory, against ``"xla"``'s
72.5 MiB at Gemma 2's shape, for five matrix products to ``"xla"``'s four).

Internal API: :class:`Implementation`, :data:`IMPLEMENTATIONS`, :data:`AUTO`,
:func:`choose`, :func:`per_token_loss`, :func:`summed_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from jxent._fused import pallas_tpu, rules
from jxent._fused.contract import Spec


class Implementation(NamedTuple):
    """One implementation of the fused schedules (see the module docstring)."""

    # (spec, x, w, bias, rows, columns, real_columns, teacher) -> per-token loss(es) [N]
    per_token_loss: Callable
    # the same arguments -> the loss summed over the tokens (the single pass)
    summed_loss: Callable
    # (spec) -> whether this implementation runs the call (its loss, options, schedule)
    supports: Callable[[Spec], bool] = lambda spec: True  # noqa: E731


#: Every implementation, in the order ``"auto"`` tries them.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(rules.per_token_loss, rules.summed_loss),
    "pallas_tpu": Implementation(
        pallas_tpu.per_token_loss, pallas_tpu.summed_loss, pallas_tpu.supports
    ),
}

#: The caller's choice that lets the engine pick (``None`` means the same).
AUTO = "auto"


def choose(implementation: str | None, spec: Spec | None = None) -> str:
    """The implementation's name for ``implementation`` (a name of
    :data:`IMPLEMENTATIONS`, ``"auto"`` or ``None``), checked: a ``TypeError`` or
    ``ValueError`` that names the argument. With ``spec``, the implementation must
    support the call (``"auto"``: the first one that does)."""
    names = tuple(IMPLEMENTATIONS)
    if implementation is None:
        implementation = AUTO
    if not isinstance(implementation, str):
        raise TypeError(
            f"implementation must be a string (one of {(AUTO, *names)}) or None, got "
            f"{implementation!r}."
        )
    if implementation == AUTO:
        if spec is None:
            return names[0]
        for name in names:
            if IMPLEMENTATIONS[name].supports(spec):
                return name
        raise ValueError(f"no implementation of {names} supports this call")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {(AUTO, *names)} or None, got {implementation!r}."
        )
    if spec is not None and not IMPLEMENTATIONS[implementation].supports(spec):
        raise ValueError(
            f"implementation={implementation!r} does not support this call "
            f"({type(spec.loss).__name__}); implementation='auto' picks one that does."
        )
    return implementation


def per_token_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """Per-token losses ``[N]`` of ``x [N, D] @ w [D, V] (+ bias [V])``, streaming schedule.

    ``rows``/``columns``: the loss's per-token / per-column inputs (pytrees of ``[N]`` /
    ``[V]`` arrays, constants); ``real_columns``: bool ``[V]``, False on padding columns
    (with ``spec.num_classes``), or None; ``teacher``: ``(x_t [N, D_t], w_t, bias_t)``
    (``w_t`` in ``w``'s layout, ``bias_t`` or None), a second logits stream, or None.
    Differentiable in ``x``, ``w`` and ``bias`` (the teacher is a constant).
    """
    impl = IMPLEMENTATIONS[spec.implementation]
    return impl.per_token_loss(spec, x, w, bias, rows, columns, real_columns, teacher)


def summed_loss(
    spec: Spec, x, w, bias, rows, columns, real_columns=None, teacher=None
) -> jax.Array:
    """``sum_n loss_n`` with the single-pass schedule (every plan's ``vocab_block >= V``;
    one device's whole vocabulary)."""
    impl = IMPLEMENTATIONS[spec.implementation]
    return impl.summed_loss(spec, x, w, bias, rows, columns, real_columns, teacher)
