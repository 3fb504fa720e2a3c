"""Joint image/label transforms for semantic segmentation (no torchvision needed).

Every transform is a callable ``t(image, label, generator=None) -> (image, label)``:

* ``image`` may be a PIL image, a numpy array ``(H, W, 3)`` or a tensor ``(3, H, W)``, all in
  pixel units [0, 255]; ``label`` a PIL image (mode "L"/"P"/"I"), a numpy array or a tensor
  ``(H, W)`` of class indices.  The first transform converts them to tensors (image float32
  ``(3, H, W)`` in [0, 255], label int64 ``(H, W)``) and every later one keeps that form;
  :class:`Normalize` (last) produces the normalised float32 image.
* ``generator`` is a ``torch.Generator`` or an int seed; random transforms draw only from it,
  so a given generator state gives the same augmentation.  ``None`` uses torch's global RNG,
  which the DataLoader seeds differently per worker and per epoch.

Horizontal flips and lanes: flipping a lane image mirrors the road, so the lane left of the
ego lane becomes the one on its right.  :class:`RandomHorizontalFlip` therefore takes a
``label_map``; :func:`lane_train_transform` uses :data:`LANE_FLIP_MAP` (1<->4, 2<->3), which
is the correct relabelling for the CULane slot convention (the four slots are symmetric about
the ego vehicle).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Compose",
    "ToTensor",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "Resize",
    "PadToSize",
    "Normalize",
    "LANE_FLIP_MAP",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "train_transform",
    "val_transform",
    "lane_train_transform",
    "lane_val_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LANE_FLIP_MAP = {1: 4, 2: 3, 3: 2, 4: 1}


def _pair(size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be an int or (H, W) with positive entries, got {size}")
    return size


def _generator(generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator)}")


def _uniform(lo: float, hi: float, generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _to_tensors(image, label) -> tuple[torch.Tensor, torch.Tensor]:
    """image -> float32 (3, H, W) in [0, 255]; label -> int64 (H, W). No-op if already so."""
    if not isinstance(image, torch.Tensor):
        if hasattr(image, "convert"):  # PIL
            image = image.convert("RGB")
        arr = np.array(image)  # a copy: PIL/numpy buffers may be read-only or shared
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3) when given as array, got {arr.shape}")
        image = torch.from_numpy(arr).permute(2, 0, 1)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a (3, H, W) tensor, got shape {tuple(image.shape)}")
    if image.dtype != torch.float32:
        image = image.float()
    if not isinstance(label, torch.Tensor):
        label = torch.from_numpy(np.array(label, dtype=np.int64, copy=True))
    if label.dtype != torch.int64:
        label = label.long()
    if label.dim() != 2 or tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"label must be (H, W) matching image {tuple(image.shape[1:])}, got {tuple(label.shape)}"
        )
    return image, label


def _resize(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]):
    if tuple(image.shape[1:]) == size:
        return image, label
    down = size[0] < image.shape[1] or size[1] < image.shape[2]
    # Antialias only when shrinking, where plain bilinear would alias fine textures.
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=down)[0]
    # nearest-exact samples pixel centres, matching bilinear with align_corners=False, so the
    # label stays aligned with the image.
    label = F.interpolate(label[None, None].double(), size=size, mode="nearest-exact")[0, 0].long()
    return image, label


def _pad(image, label, top, bottom, left, right, fill, ignore_index):
    if top == bottom == left == right == 0:
        return image, label
    c, h, w = image.shape
    out = torch.empty((c, h + top + bottom, w + left + right), dtype=image.dtype)
    out[:] = torch.as_tensor(fill, dtype=image.dtype).view(-1, 1, 1)
    out[:, top : top + h, left : left + w] = image
    lab = torch.full((h + top + bottom, w + left + right), ignore_index, dtype=label.dtype)
    lab[top : top + h, left : left + w] = label
    return out, lab


def _default_fill(mean: Sequence[float]) -> tuple[float, ...]:
    # Pad with the mean colour so padding becomes exactly 0 after Normalize.
    return tuple(255.0 * m for m in mean)


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, label, generator=None):
        generator = _generator(generator)
        for t in self.transforms:
            image, label = t(image, label, generator=generator)
        return image, label

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ToTensor:
    """Convert to image float32 ``(3, H, W)`` in [0, 255] and label int64 ``(H, W)``."""

    def __call__(self, image, label, generator=None):
        return _to_tensors(image, label)

    def __repr__(self) -> str:
        return "ToTensor()"


class RandomScale:
    """Resize by a factor drawn uniformly from ``scale_range`` (bilinear image, nearest label)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.scale_range = (lo, hi)

    def __call__(self, image, label, generator=None):
        image, label = _to_tensors(image, label)
        s = _uniform(*self.scale_range, _generator(generator))
        h, w = image.shape[1:]
        return _resize(image, label, (max(1, round(h * s)), max(1, round(w * s))))

    def __repr__(self) -> str:
        return f"RandomScale(scale_range={self.scale_range})"


class RandomCrop:
    """Random ``size`` crop; smaller inputs are first padded at the bottom/right.

    Padding uses ``fill`` for the image (pixel units, default the mean colour, i.e. 0 after
    normalisation) and ``ignore_index`` for the label, so padded pixels never count as a class.
    """

    def __init__(
        self,
        size,
        fill: Sequence[float] | float = _default_fill(IMAGENET_MEAN),
        ignore_index: int = 255,
    ) -> None:
        self.size = _pair(size)
        self.fill = fill
        self.ignore_index = int(ignore_index)

    def __call__(self, image, label, generator=None):
        image, label = _to_tensors(image, label)
        gen = _generator(generator)
        ch, cw = self.size
        h, w = image.shape[1:]
        image, label = _pad(image, label, 0, max(0, ch - h), 0, max(0, cw - w), self.fill, self.ignore_index)
        h, w = image.shape[1:]
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        return image[:, top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, ignore_index={self.ignore_index})"


class RandomHorizontalFlip:
    """Mirror left/right with probability ``p``.

    ``label_map`` ({old: new}) relabels after flipping, for classes tied to a side (lanes:
    :data:`LANE_FLIP_MAP`); ids not in it are kept.
    """

    def __init__(self, p: float = 0.5, label_map: Mapping[int, int] | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.label_map = dict(label_map) if label_map else None
        self._lut = None
        if self.label_map:
            size = max(256, max(max(self.label_map), max(self.label_map.values())) + 1)
            lut = torch.arange(size, dtype=torch.int64)
            for k, v in self.label_map.items():
                lut[int(k)] = int(v)
            self._lut = lut

    def __call__(self, image, label, generator=None):
        image, label = _to_tensors(image, label)
        # Draw even when p is 0 or 1 so the generator advances the same way for any p.
        if float(torch.rand((), generator=_generator(generator))) >= self.p:
            return image, label
        image, label = image.flip(-1), label.flip(-1)
        if self._lut is not None:
            in_range = (label >= 0) & (label < self._lut.numel())
            label = torch.where(in_range, self._lut[label.clamp(0, self._lut.numel() - 1)], label)
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p}, label_map={self.label_map})"


class ColorJitter:
    """Random brightness, contrast and saturation factors in ``[1 - x, 1 + x]`` (image only)."""

    def __init__(self, brightness: float = 0.25, contrast: float = 0.25, saturation: float = 0.25) -> None:
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)

    def __call__(self, image, label, generator=None):
        image, label = _to_tensors(image, label)
        gen = _generator(generator)
        b = _uniform(1 - self.brightness, 1 + self.brightness, gen)
        c = _uniform(1 - self.contrast, 1 + self.contrast, gen)
        s = _uniform(1 - self.saturation, 1 + self.saturation, gen)
        image = image * b
        grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        image = (image - grey.mean()) * c + grey.mean()
        grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        image = (image - grey) * s + grey
        return image.clamp_(0.0, 255.0), label

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


class Resize:
    """Resize to a fixed ``(H, W)`` (bilinear image, nearest label)."""

    def __init__(self, size) -> None:
        self.size = _pair(size)

    def __call__(self, image, label, generator=None):
        image, label = _to_tensors(image, label)
        return _resize(image, label, self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class PadToSize:
    """Pad to at least ``(H, W)``, centred (or at the bottom/right with ``center=False``).

    Inputs already larger are left unchanged (nothing is cropped, so evaluation sees every
    pixel).  Image padding uses ``fill``, label padding ``ignore_index``.
    """

    def __init__(
        self,
        size,
        fill: Sequence[float] | float = _default_fill(IMAGENET_MEAN),
        ignore_index: int = 255,
        center: bool = True,
    ) -> None:
        self.size = _pair(size)
        self.fill = fill
        self.ignore_index = int(ignore_index)
        self.center = bool(center)

    def __call__(self, image, label, generator=None):
        image, label = _to_tensors(image, label)
        h, w = image.shape[1:]
        ph, pw = max(0, self.size[0] - h), max(0, self.size[1] - w)
        top, left = (ph // 2, pw // 2) if self.center else (0, 0)
        return _pad(image, label, top, ph - top, left, pw - left, self.fill, self.ignore_index)

    def __repr__(self) -> str:
        return f"PadToSize(size={self.size}, center={self.center}, ignore_index={self.ignore_index})"


class Normalize:
    """``(image / 255 - mean) / std`` per channel; mean/std in [0, 1] units."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 entries, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)

    def __call__(self, image, label, generator=None):
        image, label = _to_tensors(image, label)
        return image * self._scale - self._shift, label

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------------------------
# standard pipelines


def train_transform(
    crop_size,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    flip_label_map: Mapping[int, int] | None = None,
    jitter: bool = False,
    ignore_index: int = 255,
) -> Compose:
    """Random scale -> random crop (mean/ignore padding) -> flip -> [jitter] -> normalise."""
    ts: list[Callable] = [ToTensor()]
    if scale_range is not None:
        ts.append(RandomScale(scale_range))
    ts.append(RandomCrop(crop_size, fill=_default_fill(mean), ignore_index=ignore_index))
    if flip:
        ts.append(RandomHorizontalFlip(0.5, label_map=flip_label_map))
    if jitter:
        ts.append(ColorJitter())
    ts.append(Normalize(mean, std))
    return Compose(ts)


def val_transform(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    size=None,
    mode: str = "pad",
    ignore_index: int = 255,
) -> Compose:
    """Deterministic evaluation pipeline.

    ``size=None``: only normalise (full-resolution evaluation).  Otherwise ``mode="pad"``
    centre-pads to ``size`` (label padding = ignore, so scores are unaffected) and
    ``mode="resize"`` resizes to ``size``.
    """
    ts: list[Callable] = [ToTensor()]
    if size is not None:
        if mode == "pad":
            ts.append(PadToSize(size, fill=_default_fill(mean), ignore_index=ignore_index))
        elif mode == "resize":
            ts.append(Resize(size))
        else:
            raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")
    ts.append(Normalize(mean, std))
    return Compose(ts)


def lane_train_transform(
    size,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    flip: bool = True,
    jitter: bool = True,
) -> Compose:
    """Lane training pipeline: resize to ``size`` (no scale/crop, which would move lanes out
    of their slots) -> flip with lane-id swap (:data:`LANE_FLIP_MAP`) -> [jitter] -> normalise."""
    ts: list[Callable] = [ToTensor(), Resize(size)]
    if flip:
        ts.append(RandomHorizontalFlip(0.5, label_map=LANE_FLIP_MAP))
    if jitter:
        ts.append(ColorJitter())
    ts.append(Normalize(mean, std))
    return Compose(ts)


def lane_val_transform(size=None, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """Lane evaluation pipeline: [resize to ``size``] -> normalise."""
    return val_transform(mean, std, size=size, mode="resize")
