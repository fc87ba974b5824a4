"""Assertions shared by the test modules: values against float64 references, residuals."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest

# The list behind the public jax.ad_checkpoint.print_saved_residuals.
from jax._src.ad_checkpoint import saved_residuals

#: Default tolerance of a float64 computation against the float64 NumPy reference.
F64 = {"rtol": 1e-9, "atol": 1e-12}


def assert_close(actual, expected, **tol):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), **{**F64, **tol}
    )


def assert_finite(*arrays):
    for a in arrays:
        assert np.all(np.isfinite(np.asarray(a, np.float64))), a


def assert_no_nan(*arrays):
    for a in arrays:
        assert not np.any(np.isnan(np.asarray(a, np.float64))), a


def standard_promotion():
    """For optax and hand-written baselines: they are not strict-promotion clean."""
    return jax.numpy_dtype_promotion("standard")


def large_residuals(fn, x, *args, allowed: tuple[str, ...] = ()) -> list:
    """Residuals of ``fn``'s reverse mode at least as large as ``x`` that are not
    the caller's own arguments (nor described by one of ``allowed``)."""
    return [
        (aval, desc)
        for aval, desc in saved_residuals(fn, x, *args)
        if math.prod(aval.shape) >= x.size
        and "from the argument" not in desc
        and not any(a in desc for a in allowed)
    ]


def assert_raises_naming(exc, fn, args, kwargs, words):
    """``fn(*args, **kwargs)`` raises ``exc`` whose message contains every one of ``words``,
    eagerly and under ``jit`` (the checks run at trace time)."""
    eager = functools.partial(fn, **kwargs)
    for call in (eager, jax.jit(eager)):
        with pytest.raises(exc) as info:
            call(*args)
        for w in words:
            assert w in str(info.value), (w, str(info.value))
