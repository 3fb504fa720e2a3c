"""Tests for kdops.train.data: synthetic data, folder readers, transforms, builder."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from kdops.train.data import (
    DATASET_NAMES,
    LABEL_TO_TRAIN_ID,
    CULane,
    Cityscapes,
    SyntheticScenes,
    VOCSegmentation,
    build_dataset,
)
from kdops.train.data import transforms as T

# ------------------------------------------------------------------------------------------
# synthetic


@pytest.mark.parametrize("variant", ["scenes", "lanes"])
def test_synthetic_deterministic(variant):
    a = SyntheticScenes(10, size=(48, 64), variant=variant, seed=3)
    b = SyntheticScenes(10, size=(48, 64), variant=variant, seed=3)
    x1, y1 = a[7]
    x2, y2 = a[7]
    # Out of order and from a second instance: item 7 depends only on (seed, split, 7).
    _ = b[2], b[9]
    x3, y3 = b[7]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1, x3) and torch.equal(y1, y3)
    assert torch.equal(a[-1][0], a[9][0])


@pytest.mark.parametrize("variant", ["scenes", "lanes"])
def test_synthetic_seeds_and_splits_differ(variant):
    base = SyntheticScenes(4, variant=variant, seed=0)
    other_seed = SyntheticScenes(4, variant=variant, seed=1)
    val = SyntheticScenes(4, variant=variant, seed=0, split="val")
    for i in range(4):
        assert not torch.equal(base[i][0], other_seed[i][0])
        assert not torch.equal(base[i][0], val[i][0])
    # Distinct items within one split too.
    assert not torch.equal(base[0][0], base[1][0])


def test_synthetic_no_train_val_overlap():
    train = SyntheticScenes(64, size=(32, 32), split="train")
    val = SyntheticScenes(64, size=(32, 32), split="val")
    seen = {train.generate(i)[0].tobytes() for i in range(len(train))}
    assert not any(val.generate(i)[0].tobytes() in seen for i in range(len(val)))


@pytest.mark.parametrize("variant,k", [("scenes", 8), ("lanes", 5)])
def test_synthetic_shapes_dtypes_ranges(variant, k):
    ds = SyntheticScenes(6, size=(40, 56), variant=variant)
    assert len(ds) == 6
    assert ds.num_classes == k and ds.ignore_index == 255
    assert len(ds.class_names) == k
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 40, 56) and x.dtype == torch.float32
        assert y.shape == (40, 56) and y.dtype == torch.int64
        assert torch.isfinite(x).all()
        vals = set(y.unique().tolist())
        assert vals <= set(range(k)) | {255}
    with pytest.raises(IndexError):
        ds[6]


def test_synthetic_normalisation_roughly_standard():
    ds = SyntheticScenes(40, size=(64, 64))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    assert mean.abs().max() < 0.25
    assert ((std - 1).abs() < 0.25).all()


def test_synthetic_scenes_every_class_and_ignore_band():
    ds = SyntheticScenes(50, size=(64, 64), seed=0)
    counts = torch.zeros(256, dtype=torch.int64)
    for i in range(len(ds)):
        counts += torch.bincount(ds[i][1].reshape(-1), minlength=256)
    assert (counts[: ds.num_classes] > 0).all(), counts[: ds.num_classes]
    frac_ignore = counts[255].item() / counts.sum().item()
    assert 0.005 < frac_ignore < 0.2
    # boundary_width=0 disables the ignore band.
    plain = SyntheticScenes(5, size=(64, 64), boundary_width=0)
    assert all((plain[i][1] != 255).all() for i in range(5))


def test_synthetic_num_classes_subset():
    ds = SyntheticScenes(20, size=(32, 32), num_classes=4)
    labels = torch.cat([ds[i][1].reshape(-1) for i in range(len(ds))])
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenes(2, num_classes=11)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenes(2, variant="lanes", num_classes=3)
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes(2, split="test")


def test_synthetic_lanes_labels():
    ds = SyntheticScenes(30, size=(64, 64), variant="lanes")
    counts = torch.zeros(256, dtype=torch.int64)
    for i in range(len(ds)):
        y = ds[i][1]
        counts += torch.bincount(y.reshape(-1), minlength=256)
        # Lane ids go left to right: at the bottom row, present lanes appear in id order.
        row = y[-1]
        ids = row[row > 0]
        if ids.numel():
            first_pos = [int((row == k).nonzero()[0]) for k in ids.unique().tolist()]
            assert first_pos == sorted(first_pos)
        # Nothing above the horizon (top 30 % of the image is always sky).
        assert (y[: int(0.3 * 64)] == 0).all()
    assert (counts[:5] > 0).all()
    assert counts[5:].sum() == 0  # no ignore pixels, no other ids
    lane_frac = counts[1:5].sum().item() / counts.sum().item()
    assert 0.01 < lane_frac < 0.3


def test_synthetic_generation_speed():
    ds = SyntheticScenes(200, size=(64, 64))
    lanes = SyntheticScenes(200, size=(64, 64), variant="lanes")
    ds[0], lanes[0]  # warm-up (coordinate grid)
    t0 = time.perf_counter()
    for i in range(50):
        ds[i]
        lanes[i]
    per_item = (time.perf_counter() - t0) / 100
    assert per_item < 0.02, f"{per_item * 1e3:.1f} ms per 64x64 item"


def test_synthetic_works_with_dataloader_workers():
    ds = SyntheticScenes(8, size=(32, 32))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(xs), torch.stack([ds[i][0] for i in range(8)]))
    assert torch.equal(torch.cat(ys), torch.stack([ds[i][1] for i in range(8)]))


def test_synthetic_with_transform():
    tf = T.train_transform(24, SyntheticScenes(1).mean, SyntheticScenes(1).std)
    ds = SyntheticScenes(4, size=(32, 32), transform=tf)
    x, y = ds[0]
    assert x.shape == (3, 24, 24) and y.shape == (24, 24) and y.dtype == torch.int64


# ------------------------------------------------------------------------------------------
# folder readers

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 * 3 - 12)
VOC_PALETTE[255 * 3 : 256 * 3] = [224, 224, 192]


def _write_voc(root, ids=("a", "b"), split_ids=None):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for n, i in enumerate(ids):
        Image.new("RGB", (12, 10), (10 * n, 20, 30)).save(os.path.join(root, "JPEGImages", f"{i}.jpg"))
        lab = np.zeros((10, 12), dtype=np.uint8)
        lab[2:5, 3:6] = 15  # person
        lab[5, :] = 255  # object border
        lab[7:, 8:] = n + 1
        im = Image.fromarray(lab, mode="P")
        im.putpalette(VOC_PALETTE)
        im.save(os.path.join(root, "SegmentationClass", f"{i}.png"))
    split_ids = split_ids or {"train": ids[:1], "val": ids[1:]}
    for split, names in split_ids.items():
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")


def test_voc_reader(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    _write_voc(str(root))
    # The label really is a palette PNG whose stored values are the class indices.
    assert Image.open(root / "SegmentationClass" / "a.png").mode == "P"
    for given in (root, tmp_path / "VOCdevkit", tmp_path):
        ds = VOCSegmentation(str(given), split="train")
        assert len(ds) == 1 and ds.num_classes == 21 and ds.ignore_index == 255
    ds = VOCSegmentation(str(tmp_path / "VOCdevkit"), split="val")
    x, y = ds[0]
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32
    assert y.shape == (10, 12) and y.dtype == torch.int64
    assert y[3, 4] == 15 and y[5, 0] == 255 and y[8, 10] == 2 and y[0, 0] == 0


def test_voc_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        VOCSegmentation(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCSegmentation(str(empty))
    _write_voc(str(tmp_path / "voc"))
    with pytest.raises(FileNotFoundError, match="trainaug.txt"):
        VOCSegmentation(str(tmp_path / "voc"), split="trainaug")


def _write_cityscapes(root, split="val"):
    for city in ("aachen", "bonn"):
        os.makedirs(os.path.join(root, "leftImg8bit", split, city), exist_ok=True)
        os.makedirs(os.path.join(root, "gtFine", split, city), exist_ok=True)
        stem = f"{city}_000000_000019"
        Image.new("RGB", (8, 4), (50, 60, 70)).save(
            os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png")
        )
        ids = np.array(
            [[0, 7, 8, 11, 12, 13, 17, 19], [20, 21, 22, 23, 24, 25, 26, 27], [28, 31, 32, 33, 1, 6, 9, 10], [14, 15, 16, 18, 29, 30, 34, 255]],
            dtype=np.uint8,
        )
        Image.fromarray(ids, mode="L").save(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"))
        # Other gtFine files must not be picked up as labels.
        Image.fromarray(ids, mode="L").save(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_color.png"))


def test_cityscapes_reader(tmp_path):
    _write_cityscapes(str(tmp_path))
    ds = Cityscapes(str(tmp_path), split="val")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.ignore_index == 255
    x, y = ds[0]
    assert x.shape == (3, 4, 8) and y.shape == (4, 8) and y.dtype == torch.int64
    assert y[0].tolist() == [255, 0, 1, 2, 3, 4, 5, 6]
    assert y[1].tolist() == [7, 8, 9, 10, 11, 12, 13, 14]
    assert y[2].tolist() == [15, 16, 17, 18, 255, 255, 255, 255]
    assert (y[3] == 255).all()  # 14, 15, 16, 18, 29, 30, 34 are void in the 19-class table
    assert int(LABEL_TO_TRAIN_ID[26]) == 13 and int(LABEL_TO_TRAIN_ID[-1]) == 255
    with pytest.raises(FileNotFoundError, match=os.path.join("leftImg8bit", "train")):
        Cityscapes(str(tmp_path), split="train")
    with pytest.raises(FileNotFoundError, match="missing_city"):
        Cityscapes(str(tmp_path / "missing_city"))


def _write_culane(root):
    rel = "driver_23_30frame/05151649_0422.MP4"
    os.makedirs(os.path.join(root, rel), exist_ok=True)
    os.makedirs(os.path.join(root, "laneseg_label_w16", rel), exist_ok=True)
    os.makedirs(os.path.join(root, "list"), exist_ok=True)
    lines, test_lines = [], []
    for k in range(3):
        name = f"{k:05d}"
        Image.new("RGB", (16, 6), (90, 90, 90)).save(os.path.join(root, rel, f"{name}.jpg"))
        lab = np.zeros((6, 16), dtype=np.uint8)
        lab[:, 2] = 1
        lab[:, 6] = 2
        lab[:, 10] = 3 if k != 1 else 0
        lab[:, 14] = 4
        Image.fromarray(lab, mode="L").save(os.path.join(root, "laneseg_label_w16", rel, f"{name}.png"))
        flags = "1 1 0 1" if k == 1 else "1 1 1 1"
        lines.append(f"/{rel}/{name}.jpg /laneseg_label_w16/{rel}/{name}.png {flags}")
        test_lines.append(f"/{rel}/{name}.jpg")
    for fname, content in (("train_gt.txt", lines[:2]), ("val_gt.txt", lines[2:]), ("test.txt", test_lines)):
        with open(os.path.join(root, "list", fname), "w") as f:
            f.write("\n".join(content) + "\n")


def test_culane_reader(tmp_path):
    _write_culane(str(tmp_path))
    ds = CULane(str(tmp_path), split="train")
    assert len(ds) == 2 and ds.num_classes == 5 and ds.ignore_index == 255
    assert ds.existence.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    x, y = ds[1]
    assert x.shape == (3, 6, 16) and y.dtype == torch.int64
    assert y[0].tolist() == [0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4, 0]
    assert len(CULane(str(tmp_path), split="val")) == 1
    test = CULane(str(tmp_path), split="test")
    assert len(test) == 3
    _, y = test[0]
    assert (y == 255).all()  # the test list carries no labels
    os.remove(os.path.join(tmp_path, "list", "val_gt.txt"))
    with pytest.raises(FileNotFoundError, match="val_gt.txt"):
        CULane(str(tmp_path), split="val")
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        CULane(str(tmp_path / "no_such_root"))


def test_reader_missing_image_file_named(tmp_path):
    _write_voc(str(tmp_path))
    os.remove(tmp_path / "JPEGImages" / "a.jpg")
    ds = VOCSegmentation(str(tmp_path), split="train")
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        ds[0]


# ------------------------------------------------------------------------------------------
# transforms


def _ramp_pair(h=6, w=8):
    """Image whose red channel is the column index, label = column index."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.arange(w)[None, :]
    img[..., 1] = np.arange(h)[:, None]
    lab = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    return Image.fromarray(img), Image.fromarray(lab, mode="L")


def test_flip_keeps_alignment_and_swaps_lanes():
    img, lab = _ramp_pair()
    x, y = T.RandomHorizontalFlip(p=1.0)(img, lab)
    assert x.shape == (3, 6, 8) and y.dtype == torch.int64
    assert x[0, 2, 0] == 7 and y[2, 0] == 7  # the right-most column moved to the left
    assert torch.equal(x[0].long(), y)
    lanes = torch.tensor([[0, 1, 2, 0, 3, 4]])
    image = torch.zeros(3, 1, 6)
    _, y = T.RandomHorizontalFlip(p=1.0, label_map=T.LANE_FLIP_MAP)(image, lanes)
    # Mirrored positions and renumbered so ids still go left to right.
    assert y.tolist() == [[1, 2, 0, 3, 4, 0]]
    _, y = T.RandomHorizontalFlip(p=0.0)(image, lanes)
    assert torch.equal(y, lanes)


def test_crop_pads_label_with_ignore_and_image_with_mean():
    img, lab = _ramp_pair(6, 8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tf = T.Compose([T.RandomCrop((10, 12), fill=[255 * m for m in mean]), T.Normalize(mean, std)])
    x, y = tf(img, lab, generator=0)
    assert x.shape == (3, 10, 12) and y.shape == (10, 12)
    assert (y == 255).sum() == 10 * 12 - 6 * 8
    assert (y != 255).sum() == 48
    pad = y == 255
    assert torch.allclose(x[:, pad], torch.zeros(())), "padding must be the mean (0 once normalised)"
    # Pixels that were not padded stay aligned: red channel (column index) == label.
    xr = ((x[0] * 0.25 + 0.5) * 255).round().long()
    assert torch.equal(xr[~pad], y[~pad])


def test_random_transforms_deterministic_and_aligned():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    img[..., 0] = (np.arange(50) * 5)[None, :]
    lab = (np.arange(50)[None, :] // 10).repeat(40, axis=0).astype(np.uint8)
    tf = T.train_transform(32, scale_range=(0.5, 2.0), jitter=True)
    x1, y1 = tf(img, lab, generator=torch.Generator().manual_seed(5))
    x2, y2 = tf(img, lab, generator=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    outs = {tf(img, lab, generator=s)[1].sum().item() for s in range(8)}
    assert len(outs) > 1
    # Without jitter, red (column*5) and label (column//10) must agree after scale/crop/flip.
    tf = T.Compose([T.RandomScale((0.5, 2.0)), T.RandomCrop(32), T.RandomHorizontalFlip()])
    for s in range(6):
        x, y = tf(img, lab, generator=s)
        valid = y != 255
        col = x[0][valid] / 5
        # Nearest label vs bilinear image: allow the one-pixel blur at label boundaries.
        assert ((col / 10).floor().long() - y[valid]).abs().le(1).all()
        assert ((col / 10).floor().long() == y[valid]).float().mean() > 0.8


def test_scale_and_resize_shapes():
    img, lab = _ramp_pair(10, 20)
    x, y = T.Resize((5, 10))(img, lab)
    assert x.shape == (3, 5, 10) and y.shape == (5, 10)
    assert set(y.unique().tolist()) <= set(range(20))
    x, y = T.PadToSize((14, 22))(img, lab)
    assert x.shape == (3, 14, 22) and (y[:2] == 255).all() and y[2, 1] == 0 and y[2, 0] == 255
    x, y = T.val_transform(size=(12, 24), mode="resize")(img, lab)
    assert x.shape == (3, 12, 24)
    with pytest.raises(ValueError, match="label"):
        T.Normalize()(img, np.zeros((3, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------
# builder


def test_build_dataset_synthetic():
    ds = build_dataset("synthetic", "train", num_samples=5, crop_size=32)
    assert isinstance(ds, SyntheticScenes) and len(ds) == 5 and ds.num_classes == 8
    assert ds[0][0].shape == (3, 32, 32)
    lanes = build_dataset("synthetic_lanes", "val", crop_size=(32, 48))
    assert lanes.num_classes == 5 and lanes.ignore_index == 255 and lanes.split == "val"
    assert lanes[0][1].shape == (32, 48)
    assert set(DATASET_NAMES) == {"synthetic", "synthetic_lanes", "voc", "cityscapes", "culane"}


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="cityscapes"):
        build_dataset("imagenet", "train")
    for name in ("voc", "cityscapes", "culane"):
        with pytest.raises(ValueError, match="`root` is required"):
            build_dataset(name, "train")
        with pytest.raises(FileNotFoundError, match="not_here"):
            build_dataset(name, "train", root=str(tmp_path / "not_here"))


def test_build_dataset_real(tmp_path):
    _write_voc(str(tmp_path / "voc"))
    ds = build_dataset("voc", "train", root=str(tmp_path / "voc"), crop_size=16)
    assert ds.num_classes == 21 and ds.ignore_index == 255
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y.shape == (16, 16) and (y == 255).any()
    ds = build_dataset("voc", "val", root=str(tmp_path / "voc"), crop_size=16)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and (y == 255).sum() >= 16 * 16 - 10 * 12
    _write_cityscapes(str(tmp_path / "cs"), split="train")
    ds = build_dataset("cityscapes", "train", root=str(tmp_path / "cs"), crop_size=(4, 4))
    assert ds.num_classes == 19 and ds[1][0].shape == (3, 4, 4)
    _write_culane(str(tmp_path / "cu"))
    ds = build_dataset("culane", "train", root=str(tmp_path / "cu"), crop_size=(12, 32))
    x, y = ds[0]
    assert ds.num_classes == 5 and x.shape == (3, 12, 32) and y.shape == (12, 32)
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 4}
