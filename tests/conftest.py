"""Test configuration: Triton's interpreter on GPU-less machines, and the CUDA skip."""
import os
import tempfile

# Inductor caches compiled graphs on disk keyed by the graph, not by the custom ops' fake
# kernels: after a kernel's output shape changes (channel_kl's row statistics did), a cache left
# by an earlier build replays the old shapes. Each test session compiles into a fresh cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kdops-inductor-"))

import torch  # noqa: E402

# Triton reads this when it is first imported: set it before any test module imports it, so
# the Triton kernels are tested on CPU tensors where there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: runs only on a machine with a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)
