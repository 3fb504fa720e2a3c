"""kdops.models: segmentation networks that return named features.

Every model's ``forward`` returns a ``dict[str, Tensor]`` with ``layer1``..``layer4`` (backbone
or encoder stages, shallow to deep), ``fusion`` (the feature the final 1x1 classifier reads,
before dropout), ``logits`` (at the head's resolution, never upsampled to the input) and, for
models with an aux head in training mode, ``aux_logits``. Each model has ``num_classes``,
``feature_channels`` (channels of every key) and ``classifier`` (the final 1x1 ``Conv2d``).

Build models with :func:`build_model`; load local files with :func:`load_weights`.
"""
from __future__ import annotations

import os

import torch.nn as nn

from .erfnet import ERFNet
from .heads import ASPP, ASPPHead, FCNHead, PSPHead, PyramidPooling
from .label_teacher import LabelTeacher
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101
from .segmentors import BACKBONE_NAMES, DeepLabV3, PSPNet, build_backbone
from .weights import LoadResult, load_weights

MODEL_NAMES = ("pspnet", "deeplabv3", "erfnet", "label_teacher")
_WITH_BACKBONE = {"pspnet": PSPNet, "deeplabv3": DeepLabV3}
_WITHOUT_BACKBONE = {"erfnet": ERFNet, "label_teacher": LabelTeacher}


def build_model(name: str, num_classes: int, *, backbone: str | None = None, aux: bool = True,
                weights: str | os.PathLike | None = None,
                backbone_weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build a model by name (see ``MODEL_NAMES``).

    ``backbone`` (``BACKBONE_NAMES``, default ``"resnet18"``) and ``aux`` (FCN head on layer3)
    apply to ``"pspnet"``/``"deeplabv3"``; ``aux`` is ignored by the others, which have no
    aux head. ``backbone_weights``: a torchvision-format file loaded into ``model.backbone``.
    ``weights``: a full-model file, loaded last (strict). ``kwargs`` go to the model class
    (e.g. ``ignore_index`` for the label teacher).

    Raises ``ValueError`` naming the argument for an unknown ``name``/``backbone``, a bad
    ``num_classes``, or ``backbone``/``backbone_weights`` given to a model without backbone.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name: unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if name in _WITH_BACKBONE:
        model = _WITH_BACKBONE[name](num_classes, backbone=backbone or "resnet18", aux=aux, **kwargs)
        if backbone_weights is not None:
            load_weights(model.backbone, backbone_weights)
    else:
        for arg, value in (("backbone", backbone), ("backbone_weights", backbone_weights)):
            if value is not None:
                raise ValueError(f"{arg}: {name!r} has a fixed encoder; {arg} only applies to "
                                 f"{', '.join(_WITH_BACKBONE)}")
        model = _WITHOUT_BACKBONE[name](num_classes, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


__all__ = [
    "ASPP",
    "ASPPHead",
    "BACKBONE_NAMES",
    "DeepLabV3",
    "ERFNet",
    "FCNHead",
    "LabelTeacher",
    "LoadResult",
    "MODEL_NAMES",
    "MobileNetV2",
    "PSPHead",
    "PSPNet",
    "PyramidPooling",
    "ResNet",
    "build_backbone",
    "build_model",
    "load_weights",
    "mobilenetv2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]
