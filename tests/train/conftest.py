"""One intra-op thread for the training-layer tests: their models and batches are tiny, and
two OpenMP threads on two shared cores slow down many times when other processes run."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
