"""PASCAL VOC 2012 segmentation reader."""
from __future__ import annotations

import os
from typing import Callable

from kdops.train.data._base import SegmentationFolder, require_dir, require_file

__all__ = ["VOCSegmentation", "VOC_CLASSES"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


def _resolve_root(root: str) -> str:
    """Accept the VOC2012 folder itself, the VOCdevkit folder, or the folder containing it."""
    require_dir(root, "VOCSegmentation root")
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    raise FileNotFoundError(
        f"VOCSegmentation: no JPEGImages/ found in {root!r} (nor in {root!r}/VOC2012 or "
        f"{root!r}/VOCdevkit/VOC2012); expected JPEGImages/, SegmentationClass/ and "
        "ImageSets/Segmentation/"
    )


class VOCSegmentation(SegmentationFolder):
    """PASCAL VOC 2012 segmentation (21 classes, 255 = ignore on object borders).

    Layout (``root`` = VOC2012, or the VOCdevkit folder containing it)::

        root/JPEGImages/{id}.jpg
        root/SegmentationClass/{id}.png      palette PNG whose pixel values are class indices
        root/ImageSets/Segmentation/{split}.txt

    ``split`` is any list present in ``ImageSets/Segmentation`` ("train", "val", "trainval",
    ...).  Items: ``(image float32 (3, H, W), label int64 (H, W))``; variable sizes unless the
    transform crops/pads.

    Attributes: ``num_classes`` (21), ``ignore_index`` (255), ``class_names``, ``mean``,
    ``std``, ``root`` (resolved VOC2012 folder), ``split``, ``ids``, ``samples``.
    """

    num_classes = 21
    ignore_index = 255
    class_names = VOC_CLASSES

    def __init__(self, root: str, split: str = "train", transform: Callable | None = None) -> None:
        self.root = _resolve_root(os.fspath(root))
        self.split = split
        image_dir = os.path.join(self.root, "JPEGImages")
        label_dir = require_dir(
            os.path.join(self.root, "SegmentationClass"),
            "VOCSegmentation labels (palette PNGs SegmentationClass/{id}.png)",
        )
        list_dir = os.path.join(self.root, "ImageSets", "Segmentation")
        list_file = os.path.join(list_dir, f"{split}.txt")
        if not os.path.isfile(list_file):
            available = (
                sorted(f[:-4] for f in os.listdir(list_dir) if f.endswith(".txt"))
                if os.path.isdir(list_dir)
                else []
            )
            require_file(list_file, f"VOCSegmentation split list (one image id per line; available splits: {available})")
        with open(list_file) as f:
            self.ids = [line.strip() for line in f if line.strip()]
        samples = [
            (os.path.join(image_dir, f"{i}.jpg"), os.path.join(label_dir, f"{i}.png")) for i in self.ids
        ]
        super().__init__(samples, transform)
