"""One intra-op thread for the training-layer tests: their models and batches are tiny, and
two OpenMP threads on two shared cores slow down many times when other processes run."""
import torch

torch.set_num_threads(1)
