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


def x64_off():
    """Context in which JAX runs as users train: x64 disabled, float32 the default dtype."""
    return jax.enable_x64(False)


def float_tolerance(dtype, terms: int = 1, cond: float = 1.0) -> float:
    """Relative tolerance of a float computation with rounding ``eps(dtype)`` whose result is
    a sum of ``terms`` values, with condition number ``cond``: ``8 * eps * cond * log2(terms)``.

    Accurate (pairwise or blocked) sums have a relative error bound that grows with
    ``log2(terms)``, not with ``terms``; the factor 8 covers the handful of roundings
    around the sum (an exp, a log, a product) and nothing else.
    """
    eps = float(jax.numpy.finfo(dtype).eps)
    return 8 * eps * cond * max(math.log2(max(terms, 2)), 1.0)


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
