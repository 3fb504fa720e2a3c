"""Evaluation metrics: confusion-matrix mIoU for segmentation, mask-based F1 for lanes.

Both accumulate integer counts on the device of their inputs (no host sync per batch beyond
the input-range checks) and can be summed across processes with :meth:`reduce_` before
:meth:`compute`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["ConfusionMatrix", "LaneF1"]


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(x)
    except Exception as e:  # pragma: no cover - message only
        raise ValueError(f"`{name}` must be a tensor or array, got {type(x)}") from e


def _labels_from(pred: torch.Tensor, target: torch.Tensor, num_channels: int, channel_name: str) -> torch.Tensor:
    """Turn ``pred`` (labels shaped like ``target``, or scores ``(N, C, ...)``) into labels."""
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"`target` must hold integer class indices, got dtype {target.dtype}")
    if pred.dim() == target.dim() + 1:
        if pred.shape[1] != num_channels:
            raise ValueError(
                f"`pred` looks like scores of shape {tuple(pred.shape)} but dim 1 must equal "
                f"{channel_name}={num_channels}"
            )
        if pred.shape[:1] + pred.shape[2:] != target.shape:
            raise ValueError(
                f"`pred` scores {tuple(pred.shape)} do not match `target` {tuple(target.shape)} "
                "(expected (N, C, *target.shape[1:]))"
            )
        return pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` must have the shape of `target` {tuple(target.shape)} (labels) or "
            f"(N, {num_channels}, ...) (scores), got {tuple(pred.shape)}"
        )
    if pred.is_floating_point() or pred.is_complex():
        raise ValueError(
            f"`pred` with the shape of `target` must hold integer labels, got dtype {pred.dtype}"
        )
    return pred.long()


def _check_range(x: torch.Tensor, hi: int, name: str) -> None:
    if x.numel() == 0:
        return
    lo_v, hi_v = torch.aminmax(x)
    if int(lo_v) < 0 or int(hi_v) >= hi:
        raise ValueError(
            f"`{name}` values must be in [0, {hi}) outside ignored pixels, got min {int(lo_v)} "
            f"max {int(hi_v)}"
        )


def _all_reduce_sum(t: torch.Tensor, group) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


class ConfusionMatrix:
    """Accumulated ``K x K`` confusion matrix (rows: ground truth, columns: prediction).

    Args:
        num_classes: K.
        ignore_index: target value whose pixels are skipped.

    Attributes: ``num_classes``, ``ignore_index``, ``matrix`` (int64 ``(K, K)``; moves to the
    device of the first update).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred, target) -> None:
        """Add one batch.

        Args:
            pred: labels ``(N, H, W)`` (integer) or scores/logits ``(N, K, H, W)`` (argmax is
                taken over dim 1).  Any spatial rank works as long as it matches ``target``.
            target: integer labels ``(N, H, W)`` in ``[0, K)`` or ``ignore_index``.

        Raises:
            ValueError: shape/num_classes mismatch, non-integer labels, or values out of range.
        """
        target = _as_tensor(target, "target")
        pred = _labels_from(_as_tensor(pred, "pred"), target, self.num_classes, "num_classes")
        k = self.num_classes
        pred = pred.reshape(-1)
        target = target.reshape(-1).long()
        valid = target != self.ignore_index
        t, p = target[valid], pred[valid].to(target.device)
        _check_range(t, k, "target")
        _check_range(p, k, "pred")
        counts = torch.bincount(t * k + p, minlength=k * k).view(k, k)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def reduce_(self, group=None) -> "ConfusionMatrix":
        """Sum the matrix over all processes of ``group`` (no-op unless torch.distributed is
        initialised).  Call once, right before :meth:`compute`; calling twice double counts."""
        _all_reduce_sum(self.matrix, group)
        return self

    def compute(self) -> dict:
        """Scores from the accumulated matrix.

        Returns a dict with
            ``"miou"``: mean IoU over classes that occur in the target or the prediction,
            ``"iou"``: per-class IoU list (NaN for a class absent from both),
            ``"pixel_acc"``: correct / labelled pixels,
            ``"mean_acc"``: mean per-class recall over classes present in the target,
            ``"acc"``: per-class recall list (NaN for a class absent from the target).
        All NaN when nothing was accumulated.
        """
        m = self.matrix.detach().to("cpu", torch.float64)
        tp = m.diagonal()
        gt = m.sum(1)
        union = gt + m.sum(0) - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = m.sum()
        return {
            "miou": float(torch.nanmean(iou)),
            "iou": iou.tolist(),
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": float(torch.nanmean(acc)),
            "acc": acc.tolist(),
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index})"


class LaneF1:
    """Mask-based lane F1 (CULane style, simplified).

    For each image and lane id ``l`` in ``1..num_lanes`` the predicted mask ``pred == l`` and
    the ground-truth mask ``target == l`` are compared (after an optional square dilation to
    ``line_width`` px): the lane is a true positive when both exist and their IoU is
    ``>= iou_threshold``; otherwise an existing prediction is a false positive and an existing
    ground truth a false negative.  ``F1 = 2 TP / (2 TP + FP + FN)`` over all images.

    This approximates the official CULane metric, which fits a spline through each predicted
    lane, draws predictions and ground truth as 30-px wide lines at 1640x590, and matches lanes
    with the Hungarian algorithm regardless of their ids.  Here lanes are matched by id (slot)
    and the masks are compared as they are, so numbers are comparable between runs of this
    code but not to published CULane scores.

    Args:
        num_lanes: number of lane ids (labels ``0`` = background, ``1..num_lanes``).
        iou_threshold: IoU needed for a true positive, in (0, 1].
        line_width: dilate both masks with a ``line_width x line_width`` square first
            (1 = no dilation); widening thin predictions makes the IoU less sensitive to
            one-pixel offsets, as the official 30-px lines do.
        min_pixels: a predicted lane exists only with at least this many pixels (suppresses
            specks; ERFNet/SAD use an existence branch instead).
        ignore_index: target pixels with this value are excluded from both masks.

    Attributes: ``tp``, ``fp``, ``fn`` (python ints via :meth:`compute`), ``counts`` (int64
    tensor ``(3,)`` = TP, FP, FN).
    """

    def __init__(
        self,
        num_lanes: int = 4,
        iou_threshold: float = 0.5,
        line_width: int = 1,
        min_pixels: int = 1,
        ignore_index: int = 255,
    ) -> None:
        if int(num_lanes) < 1:
            raise ValueError(f"`num_lanes` must be >= 1, got {num_lanes}")
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"`iou_threshold` must be in (0, 1], got {iou_threshold}")
        if int(line_width) < 1:
            raise ValueError(f"`line_width` must be >= 1, got {line_width}")
        if int(min_pixels) < 1:
            raise ValueError(f"`min_pixels` must be >= 1, got {min_pixels}")
        self.num_lanes = int(num_lanes)
        self.iou_threshold = float(iou_threshold)
        self.line_width = int(line_width)
        self.min_pixels = int(min_pixels)
        self.ignore_index = int(ignore_index)
        self.counts = torch.zeros(3, dtype=torch.int64)

    def reset(self) -> None:
        self.counts.zero_()

    def _dilate(self, masks: torch.Tensor) -> torch.Tensor:
        k = self.line_width
        if k == 1:
            return masks
        n, l, h, w = masks.shape
        x = masks.reshape(n * l, 1, h, w).float()
        # Asymmetric zero padding keeps the output size for even widths too.
        x = F.pad(x, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2))
        return (F.max_pool2d(x, k, stride=1) > 0).reshape(n, l, h, w)

    @torch.no_grad()
    def update(self, pred, target) -> None:
        """Add one batch.

        Args:
            pred: lane ids ``(N, H, W)`` in ``[0, num_lanes]`` or scores
                ``(N, num_lanes + 1, H, W)`` (argmax over dim 1).
            target: lane ids ``(N, H, W)`` in ``[0, num_lanes]`` or ``ignore_index``.
        """
        target = _as_tensor(target, "target")
        pred = _labels_from(_as_tensor(pred, "pred"), target, self.num_lanes + 1, "num_lanes + 1")
        if target.dim() != 3:
            raise ValueError(f"`target` must be (N, H, W), got shape {tuple(target.shape)}")
        target = target.long()
        pred = pred.to(target.device)
        valid = target != self.ignore_index
        _check_range(target[valid], self.num_lanes + 1, "target")
        _check_range(pred[valid], self.num_lanes + 1, "pred")

        ids = torch.arange(1, self.num_lanes + 1, device=target.device).view(1, -1, 1, 1)
        valid = valid[:, None]
        pm = (pred[:, None] == ids) & valid  # (N, L, H, W)
        gm = (target[:, None] == ids) & valid
        p_has = pm.sum((2, 3)) >= self.min_pixels  # (N, L)
        g_has = gm.any(3).any(2)
        pm, gm = self._dilate(pm) & valid, self._dilate(gm) & valid
        inter = (pm & gm).sum((2, 3))
        union = (pm | gm).sum((2, 3))
        iou = inter.double() / union.clamp(min=1).double()
        tp = p_has & g_has & (iou >= self.iou_threshold)
        batch = torch.stack([tp.sum(), (p_has & ~tp).sum(), (g_has & ~tp).sum()])
        if self.counts.device != batch.device:
            self.counts = self.counts.to(batch.device)
        self.counts += batch

    def reduce_(self, group=None) -> "LaneF1":
        """Sum TP/FP/FN over all processes of ``group`` (no-op unless distributed is
        initialised).  Call once before :meth:`compute`."""
        _all_reduce_sum(self.counts, group)
        return self

    def compute(self) -> dict:
        """``{"f1", "precision", "recall", "tp", "fp", "fn"}``; a ratio whose denominator is
        zero is NaN (e.g. precision with no predicted lanes, F1 with no lanes at all)."""
        tp, fp, fn = (int(v) for v in self.counts.cpu())

        def ratio(a: int, b: int) -> float:
            return a / b if b > 0 else math.nan

        return {
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }

    def __repr__(self) -> str:
        return (
            f"LaneF1(num_lanes={self.num_lanes}, iou_threshold={self.iou_threshold}, "
            f"line_width={self.line_width}, min_pixels={self.min_pixels})"
        )
