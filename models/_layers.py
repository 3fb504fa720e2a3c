"""Small building blocks shared by the heads and the non-torchvision networks."""
from __future__ import annotations

import torch.nn as nn


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """``Conv2d -> BatchNorm2d -> act`` as a Sequential indexed 0, 1, 2.

    The indices match torchvision's ``Conv2dNormActivation`` so that MobileNetV2 checkpoints
    load. "Same" padding: (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
        nn.BatchNorm2d(out_channels),
        act(inplace=True),
    )


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions, unit BatchNorm; biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_classifier(conv: nn.Conv2d) -> None:
    """N(0, 0.01) weights and zero bias, so that initial logits are near uniform."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
