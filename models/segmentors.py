"""PSPNet and DeepLabV3: an output-stride-8 backbone plus a head (and an optional aux head)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .heads import ASPPHead, FCNHead, PSPHead
from .mobilenetv2 import mobilenetv2
from .resnet import resnet18, resnet34, resnet50, resnet101

BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "mobilenetv2": mobilenetv2,
}
BACKBONE_NAMES = tuple(BACKBONES)


def build_backbone(name: str) -> nn.Module:
    """A freshly initialised backbone by name (see ``BACKBONE_NAMES``).

    Raises ``ValueError`` naming ``backbone`` when ``name`` is unknown.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone: unknown backbone {name!r}; valid choices: {', '.join(BACKBONE_NAMES)}")
    return BACKBONES[name]()


class _Segmentor(nn.Module):
    """Backbone -> head on layer4, optional FCN aux head on layer3 (training mode only).

    ``forward(x)`` with x (N, 3, H, W) returns a dict: ``layer1`` (N, C1, H/4, W/4),
    ``layer2``..``layer4`` (N, Ci, H/8, W/8), ``fusion`` (N, C_fusion, H/8, W/8),
    ``logits`` (N, K, H/8, W/8) and, when ``aux`` and ``self.training``, ``aux_logits``
    (N, K, H/8, W/8). "/k" rounds up. Channels are in :attr:`feature_channels`.
    """

    head_type: type[nn.Module]

    def __init__(self, num_classes: int, backbone: str = "resnet18", aux: bool = True):
        super().__init__()
        self.backbone = build_backbone(backbone)
        stages = self.backbone.stage_channels
        self.head = self.head_type(stages["layer4"], num_classes)
        self.aux_head = FCNHead(stages["layer3"], num_classes) if aux else None
        self.num_classes = num_classes
        self.feature_channels = {**stages, "fusion": self.head.channels, "logits": num_classes}
        if aux:
            self.feature_channels["aux_logits"] = num_classes

    @property
    def classifier(self) -> nn.Conv2d:
        """The final 1x1 ``Conv2d(C_fusion, K)``; a view of ``head.classifier`` so that the
        state dict holds it once."""
        return self.head.classifier

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.backbone(x)
        out["fusion"], out["logits"] = self.head(out["layer4"])
        if self.aux_head is not None and self.training:
            out["aux_logits"] = self.aux_head(out["layer3"])[1]
        return out


class PSPNet(_Segmentor):
    """PSPNet (pyramid pooling head); ``feature_channels["fusion"] == 512``."""

    head_type = PSPHead


class DeepLabV3(_Segmentor):
    """DeepLabV3 (ASPP head, rates 12/24/36); ``feature_channels["fusion"] == 256``."""

    head_type = ASPPHead
