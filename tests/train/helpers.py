"""Tiny models and data for the training-layer tests (fast on two CPU cores)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
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


class TinySegmenter(nn.Module):
    """A few-thousand-parameter model with the kdops.models contract: ``layer1``..``layer4``
    (strides 2, 4, 4, 4), ``fusion`` and ``logits`` at stride 4, ``aux_logits`` from layer3
    in training mode; ``feature_channels``, ``num_classes``, ``classifier`` (1x1 conv)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.layer1, self.layer2 = block(3, w, 2), block(w, 2 * w, 2)
        self.layer3, self.layer4 = block(2 * w, 2 * w, 1), block(2 * w, 4 * w, 1)
        self.head = block(4 * w, 3 * w, 1)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(3 * w, num_classes, 1)
        self.aux_classifier = nn.Conv2d(2 * w, num_classes, 1)
        self.num_classes = num_classes
        self.feature_channels = {"layer1": w, "layer2": 2 * w, "layer3": 2 * w, "layer4": 4 * w,
                                 "fusion": 3 * w, "logits": num_classes, "aux_logits": num_classes}

    def forward(self, x):
        out = {"layer1": self.layer1(x)}
        for name, prev in (("layer2", "layer1"), ("layer3", "layer2"), ("layer4", "layer3")):
            out[name] = getattr(self, name)(out[prev])
        out["fusion"] = self.head(out["layer4"])
        out["logits"] = self.classifier(self.dropout(out["fusion"]))
        if self.training:
            out["aux_logits"] = self.aux_classifier(out["layer3"])
        return out


def student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinySegmenter(width=8)


def teacher(seed: int = 100, kind: str = "model") -> nn.Module:
    """A wider tiny model (fusion 48 channels vs the student's 24: adapters needed), or
    LGAD's label teacher (``kind="labels"``) with small widths."""
    torch.manual_seed(seed)
    if kind == "labels":
        return build_model("label_teacher", NUM_CLASSES, channels=(8, 16, 16, 32))
    return TinySegmenter(width=16)
