"""Cityscapes (fine annotations) reader with the official labelId -> trainId mapping."""
from __future__ import annotations

import glob
import os
from typing import Callable

import numpy as np

from kdops.train.data._base import SegmentationFolder, require_dir

__all__ = ["Cityscapes", "CITYSCAPES_CLASSES", "LABEL_TO_TRAIN_ID"]

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Official cityscapesScripts table restricted to the 19 evaluated classes; every other id
# (void, rarely-annotated classes, license plate) is ignored.
_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_TO_TRAIN_ID = np.full(256, 255, dtype=np.uint8)
for _id, _train_id in _ID_TO_TRAIN_ID.items():
    LABEL_TO_TRAIN_ID[_id] = _train_id
LABEL_TO_TRAIN_ID.setflags(write=False)


class Cityscapes(SegmentationFolder):
    """Cityscapes fine segmentation, 19 train classes (255 = ignore).

    Layout::

        root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png
        root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png

    Label ids are mapped to train ids with :data:`LABEL_TO_TRAIN_ID` (a 256-entry lookup
    array).  Items: ``(image float32 (3, H, W), label int64 (H, W))``.

    Attributes: ``num_classes`` (19), ``ignore_index`` (255), ``class_names``, ``mean``,
    ``std``, ``root``, ``split``, ``samples``.
    """

    num_classes = 19
    ignore_index = 255
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str, split: str = "train", transform: Callable | None = None) -> None:
        self.root = require_dir(os.fspath(root), "Cityscapes root")
        self.split = split
        image_dir = require_dir(
            os.path.join(self.root, "leftImg8bit", split),
            "Cityscapes images (expected leftImg8bit/{split}/{city}/*_leftImg8bit.png)",
        )
        label_dir = require_dir(
            os.path.join(self.root, "gtFine", split),
            "Cityscapes labels (expected gtFine/{split}/{city}/*_gtFine_labelIds.png)",
        )
        suffix = "_leftImg8bit.png"
        images = sorted(glob.glob(os.path.join(image_dir, "*", f"*{suffix}")))
        if not images:
            raise FileNotFoundError(
                f"Cityscapes: no '*{suffix}' images under {image_dir!r}/{{city}}/"
            )
        samples = []
        for path in images:
            city = os.path.basename(os.path.dirname(path))
            stem = os.path.basename(path)[: -len(suffix)]
            samples.append((path, os.path.join(label_dir, city, f"{stem}_gtFine_labelIds.png")))
        super().__init__(samples, transform)

    def map_label(self, label: np.ndarray) -> np.ndarray:
        if label.dtype != np.uint8:
            # 16-bit or int PNGs: ids >= 256 do not exist in Cityscapes, clip them to void.
            label = np.where((label >= 0) & (label < 256), label, 0).astype(np.uint8)
        return LABEL_TO_TRAIN_ID[label]
