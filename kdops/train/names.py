"""The names the command line accepts, importable without torch.

The CLI parses and checks its arguments before it imports torch (seconds on a small machine),
so that a typo costs a fraction of a second. These tuples mirror the registries they name;
``tests/train/test_cli.py`` holds each one equal to its source (``kdops.backend.BACKENDS``,
``kdops.models.MODEL_NAMES`` / ``BACKBONE_NAMES``, ``kdops.train.data.DATASET_NAMES``, the
built-in recipes of ``kdops.train.recipes``).
"""
from __future__ import annotations

BACKENDS = ("reference", "triton", "cuda", "cpu")
MODEL_NAMES = ("pspnet", "deeplabv3", "erfnet", "label_teacher")
BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenetv2")
MODELS_WITHOUT_BACKBONE = ("erfnet", "label_teacher")
DATASET_NAMES = ("synthetic", "synthetic_lanes", "voc", "cityscapes", "culane")
SYNTHETIC_DATASETS = ("synthetic", "synthetic_lanes")
LANE_DATASETS = ("synthetic_lanes", "culane")
RECIPE_NAMES = ("acfd", "apd", "at", "camd", "cwd", "ickd", "ifvd", "kd", "lgad", "lgad-upstream", "mad",
                "mad-upstream", "sad", "sad-upstream", "skd")
# Recipes whose usual setting is lane detection (ERFNet on synthetic_lanes / CULane).
LANE_RECIPES = ("lgad", "lgad-upstream", "mad", "mad-upstream", "sad", "sad-upstream")
