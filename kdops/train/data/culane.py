"""CULane lane-segmentation reader (ERFNet / SAD style, segmentation labels w16)."""
from __future__ import annotations

import os
from typing import Callable

import torch

from kdops.train.data._base import SegmentationFolder, require_dir, require_file

__all__ = ["CULane", "CULANE_CLASSES"]

CULANE_CLASSES = ("background", "lane1", "lane2", "lane3", "lane4")

_LIST_FILES = {"train": "train_gt.txt", "val": "val_gt.txt", "test": "test.txt"}


class CULane(SegmentationFolder):
    """CULane, 5 classes: 0 background, 1..4 lane slot from left to right.

    Layout::

        root/list/train_gt.txt   lines "/path/img.jpg /laneseg_label_w16/path/img.png e1 e2 e3 e4"
        root/list/val_gt.txt     (same format)
        root/list/test.txt       lines "/path/img.jpg" (no labels)
        root/<path>/img.jpg, root/laneseg_label_w16/<path>/img.png (values 0..4)

    Paths in the lists are relative to ``root`` (their leading "/" is dropped).  Items:
    ``(image float32 (3, H, W), label int64 (H, W))``; for the test split, whose lists carry
    no label, the label is all ``ignore_index``.

    Attributes: ``num_classes`` (5), ``ignore_index`` (255), ``class_names``, ``mean``,
    ``std``, ``root``, ``split``, ``samples``, ``existence`` (float32 ``(N, 4)``: the
    e1..e4 lane-existence flags of each line; zeros when the list has none).
    """

    num_classes = 5
    ignore_index = 255
    class_names = CULANE_CLASSES
    num_lanes = 4

    def __init__(self, root: str, split: str = "train", transform: Callable | None = None) -> None:
        if split not in _LIST_FILES:
            raise ValueError(f"split must be one of {sorted(_LIST_FILES)}, got {split!r}")
        self.root = require_dir(os.fspath(root), "CULane root")
        self.split = split
        list_file = require_file(
            os.path.join(self.root, "list", _LIST_FILES[split]),
            "CULane list (expected root/list/{train_gt,val_gt,test}.txt)",
        )
        samples, existence = [], []
        with open(list_file) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                image = os.path.join(self.root, parts[0].lstrip("/"))
                label = os.path.join(self.root, parts[1].lstrip("/")) if len(parts) > 1 else None
                flags = parts[2:6]
                if flags and len(flags) != 4:
                    raise ValueError(
                        f"{list_file}:{lineno}: expected 4 lane-existence flags, got {len(flags)}"
                    )
                samples.append((image, label))
                existence.append([float(e) for e in flags] if flags else [0.0] * 4)
        self.existence = torch.tensor(existence, dtype=torch.float32).reshape(-1, 4)
        super().__init__(samples, transform)
