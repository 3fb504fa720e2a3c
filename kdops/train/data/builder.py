"""``build_dataset``: one entry point for every data set, with the usual transforms."""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from kdops.train.data import transforms as T
from kdops.train.data.cityscapes import Cityscapes
from kdops.train.data.culane import CULane
from kdops.train.data.synthetic import SyntheticScenes
from kdops.train.data.voc import VOCSegmentation

__all__ = ["build_dataset", "DATASET_NAMES"]

DATASET_NAMES = ("synthetic", "synthetic_lanes", "voc", "cityscapes", "culane")

_DEFAULT_CROP = {"voc": (512, 512), "cityscapes": (512, 1024), "culane": (288, 800)}
_SYNTHETIC_SAMPLES = {"train": 2000, "val": 200}
_TRANSFORM_KW = ("scale_range", "flip", "jitter")


def build_dataset(name: str, split: str, *, root: str | None = None, crop_size=None, **kw) -> Dataset:
    """Build data set ``name`` for ``split`` with its standard transforms.

    Args:
        name: one of :data:`DATASET_NAMES` (case-insensitive).
        split: "train" or "val" ("test" too for cityscapes/culane; any list name for voc).
        root: data folder; required for the real data sets, ignored by the synthetic ones.
        crop_size: int or ``(H, W)``.
            synthetic*: the generated image size (default 64x64).
            voc / cityscapes: train crop (defaults 512x512 / 512x1024, after random scale
            0.5-2 and flip); for val, voc centre-pads and cityscapes resizes to it
            (None: full-resolution evaluation).
            culane: the resize target for every split (default 288x800; lanes are not
            cropped, train flips swap lane ids).
        **kw: synthetic*: any :class:`SyntheticScenes` argument (``num_samples`` defaults to
            2000 train / 200 val; ``seed``, ``num_classes``, ``boundary_width``, ``transform``).
            Real data sets: ``transform`` (replaces the default pipeline) and the train
            pipeline options ``scale_range``, ``flip``, ``jitter``.

    Every returned data set has ``num_classes`` and ``ignore_index`` attributes and yields
    ``(image float32 (3, H, W), label int64 (H, W))``.

    Raises:
        ValueError: unknown ``name`` (lists the choices), or ``root`` missing for a real set.
        FileNotFoundError: ``root`` (or an expected sub-folder/list) does not exist.
    """
    key = str(name).lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASET_NAMES)}")

    if key in ("synthetic", "synthetic_lanes"):
        if root is not None:
            raise ValueError(f"dataset {key!r} is generated and takes no `root` (got {root!r})")
        if split not in _SYNTHETIC_SAMPLES:
            raise ValueError(f"split must be 'train' or 'val' for {key!r}, got {split!r}")
        kw.setdefault("num_samples", _SYNTHETIC_SAMPLES[split])
        if crop_size is not None:
            kw["size"] = crop_size
        return SyntheticScenes(split=split, variant="lanes" if key == "synthetic_lanes" else "scenes", **kw)

    if root is None:
        raise ValueError(f"`root` is required for dataset {key!r} (the folder holding the data)")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset {key!r}: root folder {root!r} does not exist")

    transform = kw.pop("transform", None)
    aug = {k: kw.pop(k) for k in _TRANSFORM_KW if k in kw}
    if kw:
        raise TypeError(f"build_dataset({key!r}) got unexpected keyword argument(s) {sorted(kw)}")

    if transform is None:
        if key == "culane":
            size = crop_size if crop_size is not None else _DEFAULT_CROP["culane"]
            if split == "train":
                transform = T.lane_train_transform(size, flip=aug.get("flip", True), jitter=aug.get("jitter", True))
            else:
                transform = T.lane_val_transform(size)
        elif split == "train":
            transform = T.train_transform(
                crop_size if crop_size is not None else _DEFAULT_CROP[key],
                scale_range=aug.get("scale_range", (0.5, 2.0)),
                flip=aug.get("flip", True),
                jitter=aug.get("jitter", False),
            )
        else:
            transform = T.val_transform(size=crop_size, mode="pad" if key == "voc" else "resize")

    cls = {"voc": VOCSegmentation, "cityscapes": Cityscapes, "culane": CULane}[key]
    return cls(root, split=split, transform=transform)
