"""Dilated ResNet-18/34/50/101 at output stride 8.

Module and parameter names are those of torchvision's ``ResNet`` (``conv1``, ``bn1``,
``layer1``..``layer4``, ``layerX.Y.downsample.0/1``), so a torchvision ImageNet state dict
loads with strict key matching once its ``fc.*`` entries are dropped (``load_weights`` does
that through :attr:`ResNet.ignored_checkpoint_prefixes`). There is no ``fc``.

Strides: stem 2, max-pool 2, layer2 2; the strides of layer3 and layer4 are replaced by
dilation 2 and 4. As in torchvision's ``replace_stride_with_dilation``, the first block of a
dilated stage keeps the previous stage's dilation (1 for layer3, 2 for layer4).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import init_weights

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _conv3x3(in_channels: int, out_channels: int, stride: int, dilation: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with identity shortcut (ResNet-18/34).

    (N, C_in, H, W) -> (N, planes, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, dilated) -> 1x1 block (ResNet-50/101, torchvision "v1.5").

    (N, C_in, H, W) -> (N, 4 * planes, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Dilated ResNet backbone, output stride 8.

    ``forward(x)`` with x (N, 3, H, W) returns ``{"layer1": (N, C1, H/4, W/4),
    "layer2": (N, C2, H/8, W/8), "layer3": (N, C3, H/8, W/8), "layer4": (N, C4, H/8, W/8)}``
    (each "/k" rounds up), with channels given by :attr:`stage_channels`.
    """

    # Keys of a torchvision checkpoint that have no counterpart here (the ImageNet classifier).
    ignored_checkpoint_prefixes = ("fc.",)

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int]):
        super().__init__()
        self._in_channels = 64
        self._dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=1, dilation=4)
        self.stage_channels = {name: c * block.expansion for name, c in zip(STAGES, (64, 128, 256, 512))}
        init_weights(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        # The first block keeps the previous dilation: it is where the stride used to be, and
        # dilating it already would skip input pixels that the undilated network sees.
        layers = [block(self._in_channels, planes, stride, self._dilation, downsample)]
        layers += [block(out_channels, planes, 1, dilation) for _ in range(1, blocks)]
        self._in_channels = out_channels
        self._dilation = dilation
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in STAGES:
            x = getattr(self, name)(x)
            out[name] = x
        return out


def resnet18() -> ResNet:
    """ResNet-18, stage channels 64/128/256/512."""
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet34() -> ResNet:
    """ResNet-34, stage channels 64/128/256/512."""
    return ResNet(BasicBlock, (3, 4, 6, 3))


def resnet50() -> ResNet:
    """ResNet-50, stage channels 256/512/1024/2048."""
    return ResNet(Bottleneck, (3, 4, 6, 3))


def resnet101() -> ResNet:
    """ResNet-101, stage channels 256/512/1024/2048."""
    return ResNet(Bottleneck, (3, 4, 23, 3))
