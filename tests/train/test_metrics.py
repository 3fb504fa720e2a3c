"""Tests for kdops.train.metrics against hand-computed values."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdops.train.metrics import ConfusionMatrix, LaneF1

# A 3-class example, one 3x4 image (rows = ground truth, columns = prediction):
#
#   target        pred
#   0 0 0 1       0 0 1 1
#   0 1 1 1       0 1 1 2
#   2 2 2 255     2 0 2 1      (the 255 pixel is ignored, whatever is predicted there)
#
# counted pairs (t, p): (0,0)x3 (0,1)x1 (1,1)x3 (1,2)x1 (2,2)x2 (2,0)x1
TARGET = torch.tensor([[[0, 0, 0, 1], [0, 1, 1, 1], [2, 2, 2, 255]]])
PRED = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 2], [2, 0, 2, 1]]])
EXPECTED = [
    [3, 1, 0],
    [0, 3, 1],
    [1, 0, 2],
]
# IoU_c = TP / (row sum + column sum - TP)
#   class 0: 3 / (4 + 4 - 3) = 3/5
#   class 1: 3 / (4 + 4 - 3) = 3/5
#   class 2: 2 / (3 + 3 - 2) = 2/4
IOU = [3 / 5, 3 / 5, 2 / 4]
ACC = [3 / 4, 3 / 4, 2 / 3]  # TP / row sum


def test_confusion_matrix_hand_example():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == EXPECTED
    out = cm.compute()
    assert out["iou"] == pytest.approx(IOU)
    assert out["miou"] == pytest.approx(sum(IOU) / 3)
    assert out["pixel_acc"] == pytest.approx(8 / 11)
    assert out["acc"] == pytest.approx(ACC)
    assert out["mean_acc"] == pytest.approx(sum(ACC) / 3)


def test_confusion_matrix_accumulates_and_resets():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == [[2 * v for v in row] for row in EXPECTED]
    assert cm.compute()["miou"] == pytest.approx(sum(IOU) / 3)  # ratios unchanged
    cm.reset()
    assert cm.matrix.sum() == 0
    assert math.isnan(cm.compute()["miou"]) and math.isnan(cm.compute()["pixel_acc"])


def test_confusion_matrix_ignore_index():
    # Every pixel ignored except one: wrong predictions under 255 (even out-of-range) vanish.
    target = torch.full((1, 2, 2), 255)
    target[0, 0, 0] = 1
    pred = torch.tensor([[[1, 7], [7, 7]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    # A custom ignore value.
    cm = ConfusionMatrix(3, ignore_index=-1)
    cm.update(torch.tensor([[0, 2]]), torch.tensor([[-1, 2]]))
    assert cm.matrix.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_confusion_matrix_absent_class_is_nan_and_excluded():
    # Class 2 neither in target nor prediction; class 3 only predicted (IoU 0, counts).
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 3, 1, 1]]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    out = cm.compute()
    iou = out["iou"]
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == pytest.approx(1.0)
    assert math.isnan(iou[2]) and iou[3] == 0.0
    assert out["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # mean_acc averages over classes present in the target only.
    assert out["mean_acc"] == pytest.approx((1 / 2 + 1) / 2)


def test_confusion_matrix_logits_and_errors():
    logits = torch.nn.functional.one_hot(PRED, 3).permute(0, 3, 1, 2).float() * 4 - 1
    cm = ConfusionMatrix(3)
    cm.update(logits, TARGET)
    assert cm.matrix.tolist() == EXPECTED
    with pytest.raises(ValueError, match="num_classes"):
        cm.update(torch.randn(1, 4, 3, 4), TARGET)
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.zeros(1, 3, 5, dtype=torch.long), TARGET)
    with pytest.raises(ValueError, match="target"):
        cm.update(PRED, torch.full((1, 3, 4), 3))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.full((1, 3, 4), -1), TARGET)
    with pytest.raises(ValueError, match="target"):
        cm.update(PRED, TARGET.float())
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)


def test_confusion_matrix_matches_naive_count():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 7, 9), generator=g)
    target[target == 4] = 255
    pred = torch.randint(0, 5, (3, 7, 9), generator=g)
    cm = ConfusionMatrix(5)
    cm.update(pred, target)
    naive = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in zip(target.reshape(-1).tolist(), pred.reshape(-1).tolist()):
        if t != 255:
            naive[t, p] += 1
    assert torch.equal(cm.matrix, naive)


def _reduce_worker(rank, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        cm.update(PRED, TARGET)
        lane = LaneF1(num_lanes=2)
        lane.update(torch.tensor([[[1, 0, 2]]]), torch.tensor([[[1, 0, 0]]]))
        cm.reduce_()
        lane.reduce_()
        torch.save({"cm": cm.matrix, "lane": lane.counts}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reduce_sums_across_processes(tmp_path):
    # Without an initialised process group reduce_ is a no-op.
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.reduce_().matrix.tolist() == EXPECTED
    # fork: the children reuse the already imported modules (spawn would re-import torch).
    mp.start_processes(
        _reduce_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["cm"].tolist() == [[2 * v for v in row] for row in EXPECTED]
        assert got["lane"].tolist() == [2, 2, 0]  # per rank: lane 1 TP, lane 2 FP


# ------------------------------------------------------------------------------------------
# LaneF1


def _lane_masks():
    """One 1x8x8 image with three ground-truth lanes (ids 1, 2, 3) as vertical lines."""
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :, 1] = 1
    target[0, :, 4] = 2
    target[0, :, 7] = 3
    return target


def test_lane_f1_hand_example():
    target = _lane_masks()
    pred = torch.zeros_like(target)
    pred[0, :, 1] = 1  # exact: IoU 1 -> TP
    pred[0, :4, 4] = 2  # half the lane: IoU 4/8 = 0.5 -> TP at threshold 0.5
    pred[0, :3, 7] = 3  # IoU 3/8 < 0.5 -> FP and FN
    pred[0, :, 3] = 4  # lane 4 not in the ground truth -> FP
    m = LaneF1(num_lanes=4, iou_threshold=0.5)
    m.update(pred, target)
    out = m.compute()
    assert (out["tp"], out["fp"], out["fn"]) == (2, 2, 1)
    assert out["precision"] == pytest.approx(2 / 4)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # Stricter threshold: lane 2 (IoU 0.5) no longer matches.
    m = LaneF1(iou_threshold=0.6)
    m.update(pred, target)
    assert (m.compute()["tp"], m.compute()["fp"], m.compute()["fn"]) == (1, 3, 2)


def test_lane_f1_dilation_tolerates_offsets():
    target = _lane_masks()
    pred = torch.roll(target, shifts=1, dims=2)  # every lane one pixel to the right
    pred[0, :, 0] = 0  # roll wrapped lane 3 to column 0: drop it, it stays a miss
    thin = LaneF1(num_lanes=3)
    thin.update(pred, target)
    assert thin.compute()["tp"] == 0  # IoU 0 without dilation
    wide = LaneF1(num_lanes=3, line_width=3)
    wide.update(pred, target)
    # 3-px lines shifted by one overlap in 2 of 4 columns -> IoU 1/2 >= 0.5 for lanes 1, 2.
    out = wide.compute()
    assert (out["tp"], out["fp"], out["fn"]) == (2, 0, 1)
    assert wide.compute()["f1"] > thin.compute()["f1"]


def test_lane_f1_batch_logits_and_empty():
    target = torch.stack([_lane_masks()[0], torch.zeros(8, 8, dtype=torch.long)])
    logits = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float()
    m = LaneF1()
    m.update(logits, target)
    out = m.compute()
    assert (out["tp"], out["fp"], out["fn"]) == (3, 0, 0) and out["f1"] == 1.0
    # Only background everywhere: nothing to score, F1 undefined.
    empty = LaneF1()
    empty.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    assert math.isnan(empty.compute()["f1"])
    # No predictions at all: recall 0, F1 0, precision undefined.
    miss = LaneF1()
    miss.update(torch.zeros_like(target), target)
    out = miss.compute()
    assert out["f1"] == 0.0 and out["recall"] == 0.0 and math.isnan(out["precision"])
    miss.reset()
    assert miss.counts.tolist() == [0, 0, 0]


def test_lane_f1_min_pixels_and_errors():
    target = _lane_masks()
    pred = target.clone()
    pred[0, 0, 5] = 4  # one stray pixel of lane 4
    m = LaneF1(min_pixels=2)
    m.update(pred, target)
    assert m.compute()["fp"] == 0
    m = LaneF1(min_pixels=1)
    m.update(pred, target)
    assert m.compute()["fp"] == 1
    with pytest.raises(ValueError, match="num_lanes"):
        LaneF1().update(torch.randn(1, 3, 8, 8), target)
    with pytest.raises(ValueError, match="target"):
        LaneF1(num_lanes=2).update(pred, target)
    with pytest.raises(ValueError, match="iou_threshold"):
        LaneF1(iou_threshold=0.0)
    with pytest.raises(ValueError, match="pred"):
        LaneF1().update(target[0], target)
