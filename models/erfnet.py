"""ERFNet (Romera et al., "ERFNet: Efficient Residual Factorized ConvNet for Real-time
Semantic Segmentation", T-ITS 2018).

Encoder: downsampler 3->16, downsampler 16->64, 5 x non-bottleneck-1d (64), downsampler
64->128, 2 x non-bottleneck-1d (128) with dilations 2, 4, 8, 16. Decoder: upsampler 128->64,
2 x non-bottleneck-1d (64), upsampler 64->16, 2 x non-bottleneck-1d (16).

Two deviations from the paper, both needed by the kdops model contract:

* the paper's output layer (a 2x2 transposed conv 16->K) is replaced by an upsampler 16->16
  (the ``fusion`` feature, at full resolution) followed by a 1x1 ``classifier``;
* upsamplers take the size of the matching encoder feature, so odd input sizes give logits
  of exactly the input size (the paper's network needs sizes divisible by 8).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._layers import init_classifier, init_weights

STAGES = ("layer1", "layer2", "layer3", "layer4")


class DownsamplerBlock(nn.Module):
    """Concat(3x3 stride-2 conv to C_out - C_in, 2x2 max-pool) -> BN -> ReLU.

    (N, C_in, H, W) -> (N, C_out, ceil(H/2), ceil(W/2)); ``ceil_mode`` pooling keeps the two
    branches the same size for odd H, W.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class NonBottleneck1d(nn.Module):
    """Residual block of two factorised 3x3 convs (3x1 then 1x3), the second pair dilated.

    (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, channels: int, dropout: float, dilation: int):
        super().__init__()
        self.conv3x1_1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))
        self.conv1x3_1 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(channels, eps=1e-3)
        self.conv3x1_2 = nn.Conv2d(channels, channels, (3, 1), padding=(dilation, 0), dilation=(dilation, 1))
        self.conv1x3_2 = nn.Conv2d(channels, channels, (1, 3), padding=(0, dilation), dilation=(1, dilation))
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-3)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv3x1_1(x))
        out = F.relu(self.bn1(self.conv1x3_1(out)))
        out = F.relu(self.conv3x1_2(out))
        out = self.dropout(self.bn2(self.conv1x3_2(out)))
        return F.relu(out + x)


class UpsamplerBlock(nn.Module):
    """3x3 stride-2 transposed conv -> BN -> ReLU to an explicit output size.

    (N, C_in, h, w) -> (N, C_out, H, W) for (H, W) = ``size`` with H in {2h - 1, 2h}.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x, output_size=list(size))))


class ERFNet(nn.Module):
    """ERFNet with named features.

    ``forward(x)`` with x (N, 3, H, W) returns ``layer1`` (N, 16, H/2, W/2), ``layer2``
    (N, 64, H/4, W/4), ``layer3`` (N, 128, H/8, W/8; after the first dilation group),
    ``layer4`` (N, 128, H/8, W/8; end of the encoder), ``fusion`` (N, 16, H, W) and ``logits``
    (N, K, H, W). "/k" rounds up.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.initial_block = DownsamplerBlock(3, 16)
        self.stage2 = nn.Sequential(DownsamplerBlock(16, 64), *(NonBottleneck1d(64, 0.03, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(DownsamplerBlock(64, 128), *(NonBottleneck1d(128, 0.3, d) for d in (2, 4, 8, 16)))
        self.stage4 = nn.Sequential(*(NonBottleneck1d(128, 0.3, d) for d in (2, 4, 8, 16)))
        self.up1 = UpsamplerBlock(128, 64)
        self.dec1 = nn.Sequential(NonBottleneck1d(64, 0.0, 1), NonBottleneck1d(64, 0.0, 1))
        self.up2 = UpsamplerBlock(64, 16)
        self.dec2 = nn.Sequential(NonBottleneck1d(16, 0.0, 1), NonBottleneck1d(16, 0.0, 1))
        self.up3 = UpsamplerBlock(16, 16)
        self.classifier = nn.Conv2d(16, num_classes, 1)
        self.num_classes = num_classes
        self.feature_channels = {"layer1": 16, "layer2": 64, "layer3": 128, "layer4": 128,
                                 "fusion": 16, "logits": num_classes}
        init_weights(self)
        init_classifier(self.classifier)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"layer1": self.initial_block(x)}
        out["layer2"] = self.stage2(out["layer1"])
        out["layer3"] = self.stage3(out["layer2"])
        out["layer4"] = self.stage4(out["layer3"])
        y = self.dec1(self.up1(out["layer4"], out["layer2"].shape[-2:]))
        y = self.dec2(self.up2(y, out["layer1"].shape[-2:]))
        out["fusion"] = self.up3(y, x.shape[-2:])
        out["logits"] = self.classifier(out["fusion"])
        return out
