"""Confusion-matrix metrics accumulated over a whole split, then divided.

The competition scores the mean IoU over classes 1-4 and ignores background. Here
"ignores background" means what the competition's Keras ``MeanIoU(ignore_class=0)``
does: pixels *labelled* background are left out, so predicting soil on the sky costs
nothing, while missing soil (predicting background on soil) is a false negative.
The background IoU itself is reported (computed the ordinary way) but never averaged.

Course notebooks print Keras' number, which differs in one case: Keras still averages
class 0 (with IoU 0) whenever a terrain pixel is predicted background, dividing by one
more class. ``miou_keras`` is that number; ``miou`` stays the headline.

Every result says which classes entered the mean (``scored``) and why each other one was
left out (``left_out``): id 0 is "not labelled"; a class neither labelled nor predicted in
the images has no IoU; a class the training labels never held is never predicted (the
model leaves it out), and is scored only where these images label it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .classes import NUM_CLASSES
from .losses import IGNORE_INDEX


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true class t predicted as p (int64, on any device)."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: str | torch.device = "cpu", absent=()) -> None:
        self.num_classes = num_classes
        self.absent = tuple(absent)  # classes the model leaves out (not in its training labels)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        n = self.num_classes
        target = target.reshape(-1)
        pred = pred.reshape(-1).to(target.device)
        if target.dtype == torch.uint8:  # masks as stored: 255 (ignored) is the only value >= n
            keep = target < n
        else:
            keep = (target >= 0) & (target < n) & (target != IGNORE_INDEX)
        # Ignored pixels go to an extra bin (no boolean compaction: 10x faster on CPU).
        idx = torch.where(keep, target.to(torch.int32) * n + pred.to(torch.int32), n * n)
        counts = torch.bincount(idx, minlength=n * n + 1)[: n * n]
        self.matrix += counts.reshape(n, n).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the counts of every process (DistributedDataParallel)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self) -> dict:
        return metrics_from_confusion(self.matrix.cpu().tolist(), self.absent)


NOT_LABELLED = 'id 0 is "not labelled": its pixels are left out, as the competition\'s metric does'
NOT_IN_TRAINING = "not in the training labels: never predicted"
NOT_IN_IMAGES = "neither labelled nor predicted in these images"


def metrics_from_confusion(confusion: list[list[int]], absent=()) -> dict:
    """Per-class IoU (NaN for classes absent from labels and predictions), mIoU over
    classes 1..K-1 with pixels labelled 0 ignored, and pixel accuracy over those pixels;
    ``scored`` (the ids in the mean) and ``left_out`` (id -> why). ``absent``: the
    classes the model leaves out (not in its training labels)."""
    n = len(confusion)
    cm = torch.tensor(confusion, dtype=torch.float64)
    iou = []
    for c in range(n):
        tp = cm[c, c]
        fn = cm[c, :].sum() - tp
        # Background class: ordinary IoU. Others: rows labelled background don't count.
        rows = slice(0, n) if c == 0 else slice(1, n)
        fp = cm[rows, c].sum() - tp
        denom = tp + fp + fn
        iou.append(float(tp / denom) if denom > 0 else math.nan)
    scored_ids = [c for c in range(1, n) if not math.isnan(iou[c])]
    left_out = {0: NOT_LABELLED} if n else {}
    for c in range(1, n):
        if math.isnan(iou[c]):
            left_out[c] = NOT_IN_TRAINING if c in absent else NOT_IN_IMAGES
    scored = [iou[c] for c in scored_ids]
    miou = sum(scored) / len(scored) if scored else math.nan
    # Keras MeanIoU(num_classes, ignore_class=0) drops the pixels labelled 0 but keeps
    # class 0 in the average: terrain predicted as background gives it IoU 0 (no true
    # positive can exist), which then counts as one more class in the mean.
    predicted_background = float(cm[1:, 0].sum()) > 0
    keras_n = len(scored) + int(predicted_background)
    miou_keras = sum(scored) / keras_n if keras_n else math.nan
    fg = cm[1:, :]
    total = fg.sum()
    accuracy = float(torch.diagonal(cm)[1:].sum() / total) if total > 0 else math.nan
    return {
        "iou": iou,
        "miou": miou,
        "miou_keras": miou_keras,
        "pixel_accuracy": accuracy,
        "confusion": [[int(x) for x in row] for row in confusion],
        "scored": scored_ids,
        "left_out": left_out,
        "absent": sorted(int(c) for c in absent),
    }


def nan_to_none(values):
    """JSON has no NaN: NaN becomes null."""
    if isinstance(values, float):
        return None if math.isnan(values) else values
    if isinstance(values, list):
        return [nan_to_none(v) for v in values]
    if isinstance(values, dict):
        return {k: nan_to_none(v) for k, v in values.items()}
    return values


def per_image_miou(pred: np.ndarray, target: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """mIoU of each image under the competition's convention (background-labelled pixels
    ignored, mean over classes 1-4 present in the label or the prediction); NaN for an
    image labelled entirely background."""
    n = len(target)
    t = target.reshape(n, -1).astype(np.int64)
    p = pred.reshape(n, -1).astype(np.int64)
    keys = (np.arange(n)[:, None] * num_classes + t) * num_classes + p
    cm = np.bincount(keys.ravel(), minlength=n * num_classes * num_classes).reshape(
        n, num_classes, num_classes
    )
    tp = np.diagonal(cm, axis1=1, axis2=2)[:, 1:].astype(np.float64)
    fn = cm[:, 1:, :].sum(axis=2) - tp
    fp = cm[:, 1:, 1:].sum(axis=1) - tp  # predictions on background-labelled pixels are ignored
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: images of background only
        iou = np.where(denom > 0, tp / denom, np.nan)
        return np.nanmean(iou, axis=1) if n else np.zeros(0)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``matrix[t, p]`` over whole arrays of masks (numpy counterpart of :class:`ConfusionMatrix`)."""
    keys = target.astype(np.int64).reshape(-1) * num_classes + pred.reshape(-1)
    return np.bincount(keys, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def worst_first(miou: np.ndarray) -> np.ndarray:
    """Image indices from the lowest per-image mIoU up; images with nothing to score last."""
    return np.argsort(np.where(np.isnan(miou), np.inf, miou), kind="stable")
