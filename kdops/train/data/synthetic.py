"""A built-in synthetic segmentation data set that needs no download.

Two variants, both generated procedurally and deterministically from ``(seed, split, index)``:

* ``"scenes"``: a textured background with an optional sky band at the top and ground band at
  the bottom, a handful of shapes (disc, square, triangle, striped patch, ring, cross, ellipse)
  and thin clutter lines.  Colours come from one shared palette, so colour alone never tells the
  class: the shape (disc vs ring vs ellipse), the texture (striped patch vs a striped ground
  band) and the position (sky vs ground in the same colour) are needed, which is what lets a
  bigger network beat a small one.  A thin band around every class boundary is labelled
  ``ignore_index`` (255), like the VOC annotations.
* ``"lanes"``: a road seen from a car, up to four lane markings (dashed or solid, white or
  yellow, curved) in the four CULane slots, cars and shadows.  Labels: 0 background,
  1..4 lane slot from left to right (the two outer lanes and the two lanes bounding the ego
  lane).  As in CULane, a lane is labelled as a continuous line through dash gaps and under
  the cars that hide it.

Everything is drawn with vectorised numpy masks on a coordinate grid, so a 64x64 item takes
about a millisecond.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SyntheticScenes",
    "SCENE_CLASSES",
    "LANE_CLASSES",
    "SCENES_MEAN",
    "SCENES_STD",
    "LANES_MEAN",
    "LANES_STD",
]

SCENE_CLASSES = (
    "background",
    "sky",
    "ground",
    "disc",
    "square",
    "triangle",
    "stripes",
    "ring",
    "cross",
    "ellipse",
)
LANE_CLASSES = ("background", "lane1", "lane2", "lane3", "lane4")

# Per-channel statistics of the generated images in [0, 1] units, measured once over 2000
# train samples at 64x64 (they barely depend on the size).
SCENES_MEAN = (0.492, 0.468, 0.451)
SCENES_STD = (0.243, 0.204, 0.227)
LANES_MEAN = (0.491, 0.502, 0.443)
LANES_STD = (0.180, 0.170, 0.209)

IGNORE_INDEX = 255

# Different streams for the two splits make train and val disjoint for any seed.
_SPLIT_CODE = {"train": 0, "val": 1}
_VARIANT_CODE = {"scenes": 0, "lanes": 1}

# Saturated colours shared by sky, ground and all shapes; the background is kept greyish so
# that objects stay visible against it.
_PALETTE = np.array(
    [
        (200, 40, 40),
        (40, 170, 60),
        (50, 80, 210),
        (220, 200, 50),
        (40, 190, 200),
        (190, 50, 180),
        (230, 120, 30),
        (225, 225, 225),
    ],
    dtype=np.float32,
)


class SyntheticScenes(Dataset):
    """Procedurally generated segmentation samples.

    Args:
        num_samples: length of the data set.
        size: ``(H, W)`` of every image (or one int for a square).
        num_classes: ``"scenes"``: 2..10 (default 8), the first ``num_classes`` entries of
            :data:`SCENE_CLASSES` are drawn; ``"lanes"``: must be 5 (the default).
        seed: non-negative base seed; item ``i`` depends only on ``(seed, split, variant, i)``.
        split: ``"train"`` or ``"val"`` (independent random streams).
        variant: ``"scenes"`` or ``"lanes"``.
        boundary_width: width in pixels of the ignore band drawn on class boundaries in
            ``"scenes"`` (0 disables it); ``"lanes"`` never has ignore pixels.
        transform: optional callable ``transform(image, label) -> (image, label)`` applied to
            the raw sample (image uint8 tensor ``(3, H, W)``, label int64 tensor ``(H, W)``),
            e.g. from :mod:`kdops.train.data.transforms`; it must also normalise.  When None the
            image is only normalised with :attr:`mean` / :attr:`std`.

    Items are ``(image, label)``: image float32 ``(3, H, W)`` normalised, label int64 ``(H, W)``
    with values in ``[0, num_classes)`` or ``ignore_index``.

    Attributes: ``num_classes``, ``ignore_index`` (255), ``class_names``, ``mean``, ``std``
    (per channel, [0, 1] units), ``size``, ``variant``, ``split``, ``seed``.
    """

    def __init__(
        self,
        num_samples: int,
        size: int | Sequence[int] = (64, 64),
        num_classes: int | None = None,
        seed: int = 0,
        split: str = "train",
        variant: str = "scenes",
        boundary_width: int = 1,
        transform: Callable | None = None,
    ) -> None:
        if int(num_samples) < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
        if variant not in _VARIANT_CODE:
            raise ValueError(f"variant must be one of {sorted(_VARIANT_CODE)}, got {variant!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"size must be (H, W) with H, W >= 8, got {size}")
        if variant == "scenes":
            num_classes = 8 if num_classes is None else int(num_classes)
            if not 2 <= num_classes <= len(SCENE_CLASSES):
                raise ValueError(
                    f"num_classes must be in [2, {len(SCENE_CLASSES)}] for variant 'scenes', "
                    f"got {num_classes}"
                )
            self.class_names = SCENE_CLASSES[:num_classes]
            self.mean, self.std = SCENES_MEAN, SCENES_STD
        else:
            num_classes = 5 if num_classes is None else int(num_classes)
            if num_classes != 5:
                raise ValueError(f"num_classes must be 5 for variant 'lanes', got {num_classes}")
            self.class_names = LANE_CLASSES
            self.mean, self.std = LANES_MEAN, LANES_STD
        if int(boundary_width) < 0:
            raise ValueError(f"boundary_width must be >= 0, got {boundary_width}")

        self.num_samples = int(num_samples)
        self.size = size
        self.num_classes = num_classes
        self.ignore_index = IGNORE_INDEX
        self.seed = int(seed)
        self.split = split
        self.variant = variant
        self.boundary_width = int(boundary_width)
        self.transform = transform
        self._grid = None  # built lazily so that pickling to workers stays cheap

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(num_samples={self.num_samples}, size={self.size}, "
            f"num_classes={self.num_classes}, seed={self.seed}, split={self.split!r}, "
            f"variant={self.variant!r})"
        )

    def _coords(self):
        if self._grid is None:
            h, w = self.size
            # Pixel centres, so shapes are symmetric about their centre.
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
            self._grid = (yy, xx)
        return self._grid

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw sample ``index``: image uint8 ``(H, W, 3)`` and label uint8 ``(H, W)``."""
        index = self._check_index(index)
        rng = np.random.default_rng(
            [self.seed, _SPLIT_CODE[self.split], _VARIANT_CODE[self.variant], index]
        )
        yy, xx = self._coords()
        if self.variant == "scenes":
            img, lbl = _draw_scene(rng, yy, xx, self.num_classes)
            if self.boundary_width > 0:
                lbl[_boundary_mask(lbl, self.boundary_width)] = self.ignore_index
        else:
            img, lbl = _draw_lanes(rng, yy, xx)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8), lbl

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lbl = self.generate(index)
        image = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        label = torch.from_numpy(lbl.astype(np.int64))
        if self.transform is not None:
            return self.transform(image, label)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (image.float() / 255.0 - mean) / std, label

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return index


# --------------------------------------------------------------------------------------------
# drawing helpers (all operate on whole (H, W) grids)


def _boundary_mask(lbl: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within ``width`` px of a class change (one-sided for width 1)."""
    edge = np.zeros(lbl.shape, dtype=bool)
    # Mark only the lower/right pixel of each differing pair so width 1 gives a 1-px band.
    edge[1:, :] |= lbl[1:, :] != lbl[:-1, :]
    edge[:, 1:] |= lbl[:, 1:] != lbl[:, :-1]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def _jitter(rng, colour: np.ndarray, amount: float = 25.0) -> np.ndarray:
    return colour + rng.uniform(-amount, amount, size=3).astype(np.float32)


def _rotated(xx, yy, cx, cy, theta):
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = xx - cx, yy - cy
    return dx * c + dy * s, -dx * s + dy * c


def _draw_scene(rng, yy, xx, num_classes):
    h, w = yy.shape
    s = float(min(h, w))

    # Background: a two-colour linear gradient with a low-frequency sinusoidal texture.
    grey = rng.uniform(70, 150, size=2)
    c0 = grey[0] + rng.uniform(-20, 20, size=3)
    c1 = grey[1] + rng.uniform(-20, 20, size=3)
    phi = rng.uniform(0, 2 * math.pi)
    t = ((xx - w / 2) * math.cos(phi) + (yy - h / 2) * math.sin(phi)) / s + 0.5
    tex = np.zeros_like(xx)
    for _ in range(2):
        f = rng.uniform(2, 6) * 2 * math.pi / s
        a = rng.uniform(0, 2 * math.pi)
        tex += rng.uniform(5, 12) * np.sin(f * (xx * math.cos(a) + yy * math.sin(a)) + rng.uniform(0, 6.3))
    img = (c0 + (c1 - c0) * t[..., None] + tex[..., None]).astype(np.float32)
    lbl = np.zeros((h, w), dtype=np.uint8)

    colours = list(range(len(_PALETTE)))
    rng.shuffle(colours)

    # Sky and ground take two different palette colours; shapes avoid those, so a shape never
    # vanishes into a band, yet across images every colour is used by every class.
    if num_classes > 1 and rng.random() < 0.7:
        edge = rng.uniform(0.12, 0.3) * h + rng.uniform(0, 0.04) * h * np.sin(
            rng.uniform(1, 3) * 2 * math.pi * xx / w + rng.uniform(0, 6.3)
        )
        mask = yy < edge
        col = _jitter(rng, _PALETTE[colours.pop()])
        shade = 35.0 * (1.0 - yy / np.maximum(edge, 1.0))
        img[mask] = col + shade[mask][:, None]
        lbl[mask] = 1
    if num_classes > 2 and rng.random() < 0.7:
        edge = h - rng.uniform(0.12, 0.3) * h + rng.uniform(0, 0.04) * h * np.sin(
            rng.uniform(1, 3) * 2 * math.pi * xx / w + rng.uniform(0, 6.3)
        )
        mask = yy > edge
        col = _jitter(rng, _PALETTE[colours.pop()])
        if rng.random() < 0.5:
            # Horizontal stripes: locally the same texture as the "stripes" class, only the
            # position and extent tell them apart.
            period = rng.uniform(3, 6)
            dark = np.floor(yy / period) % 2 == 1
            fill = np.where(dark[..., None], col * 0.45, col)
        else:
            fill = col + rng.normal(0, 12, size=(h, w, 1)).astype(np.float32)
        img[mask] = fill[mask]
        lbl[mask] = 2

    shape_classes = list(range(3, num_classes))
    if shape_classes:
        for _ in range(int(rng.integers(2, 6))):
            cls = int(rng.choice(shape_classes))
            r = rng.uniform(0.09, 0.18) * s
            cx = rng.uniform(r, w - r)
            cy = rng.uniform(r, h - r)
            theta = rng.uniform(0, math.pi)
            col = _jitter(rng, _PALETTE[colours[int(rng.integers(len(colours)))]])
            mask, fill = _shape(rng, cls, xx, yy, cx, cy, r, theta, col)
            # A mild linear shading keeps flat-colour thresholding from being enough.
            sa = rng.uniform(0, 2 * math.pi)
            shade = ((xx - cx) * math.cos(sa) + (yy - cy) * math.sin(sa))[mask] * (15.0 / r)
            img[mask] = (fill[mask] if fill.ndim == 3 else fill) + shade[:, None]
            lbl[mask] = cls

    # Clutter: thin lines in random colours, labelled background (like unlabelled objects in
    # VOC); they cut through shapes and bands.
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        ang = rng.uniform(0, math.pi)
        length = rng.uniform(0.2, 0.6) * s
        u, v = _rotated(xx, yy, x0, y0, ang)
        mask = (np.abs(v) <= rng.uniform(0.5, 1.0)) & (np.abs(u) <= length / 2)
        img[mask] = _jitter(rng, _PALETTE[int(rng.integers(len(_PALETTE)))], 40)
        lbl[mask] = 0

    img += rng.normal(0, rng.uniform(3, 10), size=img.shape).astype(np.float32)
    return img, lbl


def _shape(rng, cls, xx, yy, cx, cy, r, theta, col):
    """Mask ``(H, W)`` bool and fill (colour ``(3,)`` or per-pixel ``(H, W, 3)``) of one shape."""
    name = SCENE_CLASSES[cls]
    u, v = _rotated(xx, yy, cx, cy, theta)
    if name == "disc":
        return u * u + v * v <= r * r, col
    if name == "square":
        a = 0.85 * r
        return (np.abs(u) <= a) & (np.abs(v) <= a), col
    if name == "triangle":
        rr = 1.15 * r
        angles = theta + np.array([0.0, 2.0, 4.0]) * math.pi / 3
        px, py = cx + rr * np.cos(angles), cy + rr * np.sin(angles)
        inside = np.ones(xx.shape, dtype=bool)
        for k in range(3):
            j = (k + 1) % 3
            # Vertices go counter-clockwise in image coordinates, so inside is one sign.
            cross = (px[j] - px[k]) * (yy - py[k]) - (py[j] - py[k]) * (xx - px[k])
            inside &= cross >= 0
        return inside, col
    if name == "stripes":
        a, b = 1.2 * r, 0.8 * r
        period = rng.uniform(2.5, 4.5)
        dark = np.floor(u / period) % 2 == 1
        mask = (np.abs(u) <= a) & (np.abs(v) <= b)
        return mask, np.where(dark[..., None], col * 0.45, col).astype(np.float32)
    if name == "ring":
        ro = 1.15 * r
        ri = rng.uniform(0.45, 0.65) * ro
        d2 = u * u + v * v
        return (d2 <= ro * ro) & (d2 >= ri * ri), col
    if name == "cross":
        a, b = 1.1 * r, rng.uniform(0.25, 0.4) * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= a) & (av <= b)) | ((au <= b) & (av <= a)), col
    if name == "ellipse":
        a = 1.3 * r
        b = a / rng.uniform(1.8, 2.8)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0, col
    raise AssertionError(name)


def _draw_lanes(rng, yy, xx):
    h, w = yy.shape
    horizon = rng.uniform(0.3, 0.42) * h
    vx = w / 2 + rng.uniform(-0.12, 0.12) * w
    # t: 0 at the horizon, 1 at the bottom row; perspective scales widths by t.
    t = np.clip((yy - horizon) / (h - horizon), 0.0, 1.0)
    below = yy > horizon

    sky_top = rng.uniform(150, 220) + rng.uniform(-20, 20, size=3)
    sky = sky_top - 40.0 * (yy / horizon)[..., None]
    side = np.array([rng.uniform(60, 110), rng.uniform(90, 140), rng.uniform(40, 80)])
    if rng.random() < 0.4:  # dry verge instead of grass
        side = side[[1, 1, 2]] * np.array([1.1, 0.95, 0.9])
    img = np.where(below[..., None], side + rng.normal(0, 8, size=(h, w, 1)), sky).astype(np.float32)

    spacing = rng.uniform(0.3, 0.42) * w
    ego = w / 2 + rng.uniform(-0.08, 0.08) * w
    curv = rng.uniform(-0.6, 0.6) * w
    xb = ego + (np.arange(4) - 1.5) * spacing
    # Lane k: x_k(t) = vx + (xb_k - vx) t + curv t (1 - t)^2, so all lanes meet at the
    # vanishing point and bend together.
    bend = curv * t * (1 - t) ** 2
    dbend = curv * ((1 - t) ** 2 - 2 * t * (1 - t))
    lane_x = [vx + (xb[k] - vx) * t + bend for k in range(4)]

    margin = 0.3 * spacing * t
    road = below & (xx > lane_x[0] - margin) & (xx < lane_x[3] + margin)
    grey = rng.uniform(70, 125)
    img[road] = grey + rng.uniform(-8, 8, size=3) + rng.normal(0, 5, size=(int(road.sum()), 1))

    # Shadows across the road (trees, bridges): darker bands, a CULane failure case.
    for _ in range(int(rng.integers(0, 3))):
        y0 = rng.uniform(horizon, h)
        band = road & (np.abs(yy - y0 - rng.uniform(-0.3, 0.3) * (xx - w / 2)) < rng.uniform(1, 0.12 * h))
        img[band] *= rng.uniform(0.45, 0.7)

    lbl = np.zeros((h, w), dtype=np.uint8)
    presence = rng.random(4) < np.array([0.75, 0.95, 0.95, 0.75])
    labelled = below & (t > 0.08)  # lanes merge into one blob right at the horizon
    dy = h - horizon
    for k in range(4):
        if not presence[k]:
            continue
        slope = ((xb[k] - vx) + dbend) / dy
        # Horizontal distance times cos(slant) = perpendicular distance to the curve.
        dist = np.abs(xx - lane_x[k]) / np.sqrt(1.0 + slope * slope)
        paint_w = 0.3 + 0.022 * w * t
        paint = labelled & (dist <= paint_w)
        if rng.random() < 0.5:
            phase = rng.uniform(2.5, 4.0) / (t + 0.08) + rng.uniform(0, 1)
            paint &= (phase % 1.0) < rng.uniform(0.4, 0.6)
        colour = np.array([230.0, 230.0, 225.0]) if rng.random() < 0.8 else np.array([220.0, 190.0, 60.0])
        wear = rng.uniform(0.55, 1.0)
        img[paint] = wear * colour + (1 - wear) * img[paint]
        lbl[labelled & (dist <= paint_w + 0.8)] = k + 1

    # Cars hide paint but not labels (CULane annotates occluded lanes by inference).
    n_cars = int(rng.integers(0, 3))
    for tc in np.sort(rng.uniform(0.3, 0.85, size=n_cars)):
        gap = int(rng.integers(0, 3))
        yc = horizon + tc * dy
        bend_c = curv * tc * (1 - tc) ** 2
        left = vx + (ego + (gap - 1.5) * spacing - vx) * tc + bend_c
        # Off-centre cars straddle a marking, which is what makes occlusion happen.
        cxc = left + rng.uniform(0.2, 0.8) * spacing * tc
        cw = rng.uniform(0.55, 0.85) * spacing * tc
        ch = cw * rng.uniform(0.6, 0.9)
        body = (np.abs(xx - cxc) <= cw / 2) & (yy <= yc) & (yy >= yc - ch)
        img[body] = _jitter(rng, _PALETTE[int(rng.integers(len(_PALETTE)))], 30) * 0.8
        window = body & (yy <= yc - 0.6 * ch) & (np.abs(xx - cxc) <= 0.4 * cw)
        img[window] = rng.uniform(20, 50)

    img += rng.normal(0, rng.uniform(2, 8), size=img.shape).astype(np.float32)
    return img, lbl
