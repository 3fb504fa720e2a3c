"""Hypothesis profiles of the fuzz suite.

``KDOPS_FUZZ_EXAMPLES`` sets the examples per test (one test is one op on one backend): CI runs
the default, a fast profile; ``KDOPS_FUZZ_EXAMPLES=10000 pytest tests/fuzz`` is the deep run.
The draws are derandomised (the same examples every run), so CI never turns red by chance;
``KDOPS_FUZZ_SEED=random`` draws fresh examples instead (for hunting, not for CI).
``KDOPS_FUZZ_SHRINK=0`` reports the first failing example as found, unshrunk: on a time-limited
machine the shrinking of a large example can outlast the lease and leave no report at all.
"""
import os

from hypothesis import HealthCheck, Phase, settings

_fresh = os.environ.get("KDOPS_FUZZ_SEED") == "random"
settings.register_profile(
    "kdops-fuzz",
    deadline=None,
    derandomize=not _fresh,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[phase for phase in Phase
            if phase != Phase.shrink or os.environ.get("KDOPS_FUZZ_SHRINK", "1") != "0"],
)
settings.load_profile("kdops-fuzz")
