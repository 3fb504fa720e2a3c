"""MobileNetV2 (width 1.0) at output stride 8.

Parameter names follow torchvision's ``mobilenet_v2`` (``features.0.0.weight`` ...
``features.17.conv.3.running_var``), so a torchvision state dict loads. ``features.18`` (the
320 -> 1280 1x1 convolution) and ``classifier`` are not built: segmentation heads use the 320
channels of ``features.17``; ``load_weights`` drops those checkpoint keys through
:attr:`MobileNetV2.ignored_checkpoint_prefixes`.

Output stride 8 as in mmsegmentation: the 64- and 160-channel stages lose their stride 2;
the 64/96-channel stages use dilation 2 and the 160/320-channel stages dilation 4.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import conv_bn_act, init_weights

STAGES = ("layer1", "layer2", "layer3", "layer4")

# (expansion t, output channels c, repeats n, stride s, dilation d) per stage.
_SETTINGS = (
    (1, 16, 1, 1, 1),
    (6, 24, 2, 2, 1),
    (6, 32, 3, 2, 1),
    (6, 64, 4, 1, 2),
    (6, 96, 3, 1, 2),
    (6, 160, 3, 1, 4),
    (6, 320, 1, 1, 4),
)
# One past the last ``features`` index of each named stage.
_STAGE_ENDS = (4, 7, 14, 18)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), residual when shapes allow.

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)). ``conv`` is indexed as
    in torchvision (no expansion conv when ``expand_ratio == 1``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, dilation: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, dilation, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone, output stride 8.

    ``forward(x)`` with x (N, 3, H, W) returns ``{"layer1": (N, 24, H/4, W/4),
    "layer2": (N, 32, H/8, W/8), "layer3": (N, 96, H/8, W/8), "layer4": (N, 320, H/8, W/8)}``
    (each "/k" rounds up). layer1 = features[0:4], layer2 = [4:7], layer3 = [7:14],
    layer4 = [14:18].
    """

    ignored_checkpoint_prefixes = ("features.18.", "classifier.")

    def __init__(self):
        super().__init__()
        features: list[nn.Module] = [conv_bn_act(3, 32, 3, stride=2, act=nn.ReLU6)]
        in_channels = 32
        for t, c, n, s, d in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t, d))
                in_channels = c
        self.features = nn.Sequential(*features)
        self.stage_channels = {"layer1": 24, "layer2": 32, "layer3": 96, "layer4": 320}
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        start = 0
        for name, end in zip(STAGES, _STAGE_ENDS):
            for i in range(start, end):
                x = self.features[i](x)
            out[name] = x
            start = end
        return out


def mobilenetv2() -> MobileNetV2:
    """MobileNetV2 width 1.0, stage channels 24/32/96/320."""
    return MobileNetV2()
