"""Tiny models and data for the training-layer tests (fast on two CPU cores)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from kdops.models import build_model

NUM_CLASSES = 4
SIZE = 32


class TinySegmentation(Dataset):
    """``num_samples`` random images with blocky labels (a 4x4 grid of classes), plus some
    ignored pixels when ``ignore`` is set; deterministic from ``seed``."""

    num_classes = NUM_CLASSES
    ignore_index = 255

    def __init__(self, num_samples: int = 8, size: int = SIZE, seed: int = 0, ignore: bool = True):
        g = torch.Generator().manual_seed(seed)
        cells = torch.randint(0, NUM_CLASSES, (num_samples, 4, 4), generator=g)
        self.labels = cells.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2)
        if ignore:
            self.labels[:, :2, :3] = 255
        colours = torch.randn(NUM_CLASSES + 1, 3, generator=g)
        index = self.labels.clamp(max=NUM_CLASSES)
        self.images = colours[index].permute(0, 3, 1, 2) + 0.5 * torch.randn(num_samples, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def student(seed: int = 0):
    """DeepLabV3/ResNet-18: fusion 256 channels, unlike the teacher's 512 (adapters needed)."""
    torch.manual_seed(seed)
    return build_model("deeplabv3", NUM_CLASSES, backbone="resnet18")


def teacher(seed: int = 100, kind: str = "model"):
    torch.manual_seed(seed)
    if kind == "labels":
        return build_model("label_teacher", NUM_CLASSES, channels=(8, 16, 16, 32))
    return build_model("pspnet", NUM_CLASSES, backbone="resnet18")
