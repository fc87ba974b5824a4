import os

# The suite runs on CPU (multi-device checks simulate devices there). The test extra
# installs libtpu on Linux for tests/test_accelerators.py, which compiles for a TPU in its
# own subprocess; without this, JAX would try to start a TPU backend in every process and
# log the failure on a machine without one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# float64 checks against the NumPy reference need x64; strict promotion and rank promotion
# errors make sure the library never relies on implicit dtype/rank promotion. Tests of the
# precision users train in (float32, bfloat16) turn x64 off with ``checks.x64_off()``.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# parallel_checks.py is a script run in a subprocess with 8 simulated devices: importing it
# here (doctest collection) would set XLA_FLAGS for this process.
# accelerator_checks.py takes libtpu's lock when run: only its subprocess may run it.
collect_ignore = ["parallel_checks.py", "accelerator_checks.py", "multiprocess_checks.py"]

_COMMON = {
    "deadline": None,
    "suppress_health_check": (HealthCheck.too_slow, HealthCheck.data_too_large),
    "print_blob": True,
}
# "ci" (the default): derandomized, so that a CI run is reproducible and a failure seen once
# is seen again. "dev": random and four times longer, for local hunting:
#   JXENT_HYPOTHESIS_PROFILE=dev pytest
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=100, **_COMMON)
settings.load_profile(os.environ.get("JXENT_HYPOTHESIS_PROFILE", "ci"))


def _identity_transform(fn):
    return fn


@pytest.fixture(scope="session", params=[False, True], ids=["eager", "jit"])
def jit_mode(request):
    """Wraps a function in ``jax.jit`` (param "jit") or leaves it as is (param "eager").

    Session-scoped so that it can be used together with hypothesis' ``@given``.
    """
    return jax.jit if request.param else _identity_transform
