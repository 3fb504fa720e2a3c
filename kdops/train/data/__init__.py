"""Data sets and transforms for the training layer.

* :class:`SyntheticScenes`: built-in procedural data ("scenes": 8 classes by default with a
  255 ignore band on boundaries; "lanes": 5 classes, CULane-like), no download needed.
* :class:`VOCSegmentation`, :class:`Cityscapes`, :class:`CULane`: readers for the usual
  folder layouts.
* :mod:`kdops.train.data.transforms`: joint image/label augmentations.
* :func:`build_dataset`: name -> data set with the standard transforms.

Every data set yields ``(image float32 (3, H, W) normalised, label int64 (H, W))`` and has
``num_classes`` and ``ignore_index`` attributes.
"""
from kdops.train.data import transforms
from kdops.train.data.builder import DATASET_NAMES, build_dataset
from kdops.train.data.cityscapes import CITYSCAPES_CLASSES, LABEL_TO_TRAIN_ID, Cityscapes
from kdops.train.data.culane import CULANE_CLASSES, CULane
from kdops.train.data.synthetic import LANE_CLASSES, SCENE_CLASSES, SyntheticScenes
from kdops.train.data.voc import VOC_CLASSES, VOCSegmentation

__all__ = [
    "DATASET_NAMES",
    "build_dataset",
    "SyntheticScenes",
    "VOCSegmentation",
    "Cityscapes",
    "CULane",
    "SCENE_CLASSES",
    "LANE_CLASSES",
    "VOC_CLASSES",
    "CITYSCAPES_CLASSES",
    "CULANE_CLASSES",
    "LABEL_TO_TRAIN_ID",
    "transforms",
]
