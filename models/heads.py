"""Segmentation heads: PSPNet pyramid pooling, DeepLabV3 ASPP, FCN auxiliary head.

Every head maps a feature (N, C_in, h, w) to ``(fusion, logits)``: ``fusion`` (N, channels,
h, w) is the output of the head's last 3x3 conv/BN/ReLU, and ``logits`` (N, K, h, w) is
``classifier(dropout(fusion))`` with ``classifier`` a 1x1 ``nn.Conv2d(channels, K)``. Nothing
is upsampled to the input size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._layers import conv_bn_act, init_classifier, init_weights


class _Head(nn.Module):
    """Shared tail: ``fusion = body(x)``, ``logits = classifier(dropout(fusion))``."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.channels = channels
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def _finish(self) -> None:
        init_weights(self)
        init_classifier(self.classifier)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fusion = self.body(x)
        return fusion, self.classifier(self.dropout(fusion))


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling module.

    For each bin size b: adaptive average pool to b x b, 1x1 conv to C/4, BN, ReLU, bilinear
    upsampling back to (h, w). Output: concat of the input and the branches,
    (N, C, h, w) -> (N, C + len(bins) * (C // 4), h, w).
    """

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        reduced = in_channels // 4
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_act(in_channels, reduced, 1)) for b in bins
        )
        self.out_channels = in_channels + len(bins) * reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(_Head):
    """Pyramid pooling, 3x3 conv to 512, BN, ReLU (= fusion), dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512,
                 bins: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.pyramid = PyramidPooling(in_channels, bins)
        self.bottleneck = conv_bn_act(self.pyramid.out_channels, channels, 3)
        self._finish()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.pyramid(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3).

    Branches: 1x1 conv, three 3x3 convs with dilations ``rates`` (12/24/36 at output stride 8),
    and image pooling (global average, 1x1 conv, broadcast back), each to ``channels`` with
    BN + ReLU; concatenated and projected by 1x1 conv + BN + ReLU + dropout 0.5.
    (N, C_in, h, w) -> (N, channels, h, w).
    """

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (12, 24, 36)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_act(in_channels, channels, 1)])
        self.branches.extend(conv_bn_act(in_channels, channels, 3, dilation=r) for r in rates)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_act(in_channels, channels, 1))
        self.project = nn.Sequential(
            *conv_bn_act((len(rates) + 2) * channels, channels, 1),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.image_pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class ASPPHead(_Head):
    """ASPP, 3x3 conv 256, BN, ReLU (= fusion), dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256,
                 rates: tuple[int, ...] = (12, 24, 36), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.aspp = ASPP(in_channels, channels, rates)
        self.bottleneck = conv_bn_act(channels, channels, 3)
        self._finish()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.aspp(x))


class FCNHead(_Head):
    """Auxiliary FCN head: 3x3 conv 256, BN, ReLU (= fusion), dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.bottleneck = conv_bn_act(in_channels, channels, 3)
        self._finish()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(x)
