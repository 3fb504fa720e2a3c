"""Hypothesis profiles of the fuzz suite.

``KDOPS_FUZZ_EXAMPLES`` sets the examples per test (one test is one op on one backend): CI runs
the default, a fast profile; ``KDOPS_FUZZ_EXAMPLES=10000 pytest tests/fuzz`` is the deep run.
The draws are derandomised (the same examples every run), so CI never turns red by chance;
``KDOPS_FUZZ_SEED=random`` draws fresh examples instead (for hunting, not for CI).
"""
import os

from hypothesis import HealthCheck, settings

_fresh = os.environ.get("KDOPS_FUZZ_SEED") == "random"
settings.register_profile(
    "kdops-fuzz",
    deadline=None,
    derandomize=not _fresh,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kdops-fuzz")
