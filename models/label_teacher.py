"""LGAD's label teacher: an encoder-decoder that reads the one-hot ground truth and is
trained (cross-entropy) to reproduce it; its features then serve as distillation targets.

Encoder: 4 stages, each a stride-2 3x3 conv + BN + ReLU and a 3x3 conv + BN + ReLU, with
channels 32/64/128/256 (strides 2/4/8/16). Decoder: without skip connections (a skip would
let the label bypass the deep features that are distilled), 4 steps of bilinear upsampling
to the size of the next shallower feature followed by 3x3 conv + BN + ReLU, ending at full
resolution with ``channels[0]`` channels (``fusion``), then a 1x1 ``classifier``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._layers import conv_bn_act, init_classifier, init_weights

STAGES = ("layer1", "layer2", "layer3", "layer4")


class LabelTeacher(nn.Module):
    """Label encoder-decoder.

    ``forward(labels)`` takes labels (N, H, W) int64 with values in [0, K) or
    ``ignore_index``, or an already one-hot float tensor (N, K, H, W). It returns
    ``layer1``..``layer4`` (N, channels[i], H / 2^(i+1), W / 2^(i+1); rounded up),
    ``fusion`` (N, channels[0], H, W) and ``logits`` (N, K, H, W).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 channels: tuple[int, int, int, int] = (32, 64, 128, 256)):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        ins = (num_classes, *channels[:-1])
        self.encoder = nn.ModuleList(
            nn.Sequential(conv_bn_act(cin, cout, 3, stride=2), conv_bn_act(cout, cout, 3))
            for cin, cout in zip(ins, channels)
        )
        # decoder[i] maps the feature at stride 2^(4-i) to the resolution and width one level up.
        outs = (*channels[-2::-1], channels[0])
        self.decoder = nn.ModuleList(conv_bn_act(cin, cout, 3) for cin, cout in zip(channels[::-1], outs))
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)
        self.feature_channels = {**dict(zip(STAGES, channels)), "fusion": channels[0], "logits": num_classes}
        init_weights(self)
        init_classifier(self.classifier)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, H, W) int labels -> (N, K, H, W) one-hot in the classifier's dtype.

        ``ignore_index`` pixels are all-zero; other labels outside [0, K) raise ``ValueError``.
        """
        if labels.dim() != 3 or labels.dtype.is_floating_point:
            raise ValueError(f"labels: expected an integer tensor (N, H, W), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        valid = labels != self.ignore_index
        index = torch.where(valid, labels, torch.zeros_like(labels)).long()
        # Checked eagerly: an out-of-range index is a device-side assert on CUDA, with no hint.
        if bool(((index < 0) | (index >= self.num_classes)).any()):
            raise ValueError(f"labels: values must lie in [0, {self.num_classes}) or equal "
                             f"ignore_index={self.ignore_index}")
        out = torch.zeros(labels.shape[0], self.num_classes, *labels.shape[1:],
                          dtype=self.classifier.weight.dtype, device=labels.device)
        return out.scatter_(1, index.unsqueeze(1), valid.unsqueeze(1).to(out.dtype))

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if labels.dtype.is_floating_point:
            if labels.dim() != 4 or labels.shape[1] != self.num_classes:
                raise ValueError(f"labels: a float input must be one-hot (N, {self.num_classes}, H, W), "
                                 f"got {tuple(labels.shape)}")
            x = labels
        else:
            x = self.one_hot(labels)
        sizes = [x.shape[-2:]]
        out = {}
        for name, stage in zip(STAGES, self.encoder):
            x = stage(x)
            out[name] = x
            sizes.append(x.shape[-2:])
        for block, size in zip(self.decoder, sizes[-2::-1]):
            x = block(F.interpolate(x, size, mode="bilinear", align_corners=False))
        out["fusion"] = x
        out["logits"] = self.classifier(x)
        return out
