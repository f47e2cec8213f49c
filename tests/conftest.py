"""Test set-up: Numba's CUDA simulator and Hypothesis profiles.

The simulator must be switched on before numba is first imported, which is why this happens at
the top of conftest.py. Set ``MINIPAGED_GPU=1`` to run the kernel tests on a real CUDA GPU.
"""

import os

if os.environ.get("MINIPAGED_GPU", "0") != "1":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" is Hypothesis's built-in profile, loaded automatically when the CI variable is set.
settings.register_profile("dev", deadline=None)
settings.register_profile(
    "explore",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
if "HYPOTHESIS_PROFILE" in os.environ:
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif not os.environ.get("CI"):
    settings.load_profile("dev")


def pytest_addoption(parser):
    """``--runslow`` runs the tests marked ``slow`` (skipped by default: they take minutes)."""
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    import pytest

    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
