"""Shared pieces of the folder readers (VOC, Cityscapes, CULane)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdops.train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory {path!r} does not exist")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file {path!r} does not exist")
    return path


def load_label(path: str) -> np.ndarray:
    """(H, W) integer array of the stored values (palette indices for mode "P", not colours)."""
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA"):
            raise ValueError(
                f"label {path!r} is an {im.mode} image; expected single-channel class indices "
                "(a palette 'P' or grey 'L' PNG)"
            )
        return np.array(im)


class SegmentationFolder(Dataset):
    """Base class: ``samples`` is a list of ``(image_path, label_path | None)``.

    Items are ``(image float32 (3, H, W), label int64 (H, W))`` after ``transform``; the
    default transform only normalises with :attr:`mean` / :attr:`std` (ImageNet statistics,
    as the usual pretrained backbones expect).  A missing label (unlabelled test split) gives a
    label filled with ``ignore_index``.
    """

    num_classes: int
    ignore_index: int = 255
    class_names: Sequence[str] = ()
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, samples: list[tuple[str, str | None]], transform: Callable | None) -> None:
        self.samples = samples
        self.transform = transform if transform is not None else Normalize(self.mean, self.std)

    def __len__(self) -> int:
        return len(self.samples)

    def map_label(self, label: np.ndarray) -> np.ndarray:
        """Hook for datasets whose stored ids are not train ids (Cityscapes)."""
        return label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, lbl_path = self.samples[index]
        require_file(img_path, f"{type(self).__name__} image")
        with Image.open(img_path) as im:
            image = im.convert("RGB")
        if lbl_path is None:
            label = np.full((image.height, image.width), self.ignore_index, dtype=np.int64)
        else:
            require_file(lbl_path, f"{type(self).__name__} label")
            label = self.map_label(load_label(lbl_path))
            if label.shape != (image.height, image.width):
                raise ValueError(
                    f"label {lbl_path!r} has shape {label.shape} but image {img_path!r} is "
                    f"{(image.height, image.width)}"
                )
        return self.transform(image, label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={getattr(self, 'root', None)!r}, split={getattr(self, 'split', None)!r}, n={len(self)})"
