"""The drop-in tests run tiny tensors: one intra-op thread is faster than several contending
for two shared cores (and keeps the CI budget)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
