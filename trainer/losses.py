"""Segmentation losses for (B, C, H, W) logits and (B, H, W) integer targets.

Conventions shared by every loss here:

* ``class_weights`` (length C) weighs classes; a class of weight 0 is left out entirely:
  its pixels do not count (cross-entropy, focal) and its overlap term is not averaged
  (Dice, Tversky, Lovasz). Background weight 0 reproduces the competition metric, which
  ignores background.
* Target value ``IGNORE_INDEX`` (255) marks pixels outside the image after augmentation.
* A batch with no pixel that counts gives a loss of 0, not NaN.

Each loss is a pure function plus a thin ``nn.Module`` that checks its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


def _safe_pow(x: torch.Tensor, gamma: float, floor: float = 1e-6) -> torch.Tensor:
    """``x^gamma`` for x >= 0 whose gradient stays finite at 0 when gamma < 1 (the exact
    derivative is infinite there, and infinity times a zero weight is NaN): values up to
    ``floor`` give 0 with gradient 0."""
    return torch.where(x > floor, x.clamp_min(floor) ** gamma, torch.zeros_like(x))


def _weights(class_weights, num_classes: int, device) -> torch.Tensor:
    if class_weights is None:
        return torch.ones(num_classes, device=device)
    w = torch.as_tensor(class_weights, dtype=torch.float32, device=device)
    if w.shape != (num_classes,):
        raise ValueError(f"class_weights has {w.numel()} entries; expected {num_classes}")
    return w


def _pixel_weights(target: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel weight (0 for ignored pixels) and the target with ignored pixels set to 0."""
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return w[safe] * valid, safe


def cross_entropy(logits, target, class_weights=None) -> torch.Tensor:
    """Class-weighted cross-entropy averaged over the weight of the pixels that count."""
    w = _weights(class_weights, logits.shape[1], logits.device)
    pw, safe = _pixel_weights(target, w)
    nll = F.cross_entropy(logits.float(), safe, reduction="none")
    return (nll * pw).sum() / pw.sum().clamp_min(1e-6)


def focal(logits, target, class_weights=None, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): ``-w_c (1 - p_t)^gamma log p_t``, weighted mean."""
    w = _weights(class_weights, logits.shape[1], logits.device)
    pw, safe = _pixel_weights(target, w)
    logp = F.log_softmax(logits.float(), dim=1).gather(1, safe[:, None]).squeeze(1)
    loss = -_safe_pow(1 - logp.exp(), gamma) * logp
    return (loss * pw).sum() / pw.sum().clamp_min(1e-6)


def _soft_counts(logits, target, w):
    """Soft true positives, false positives and false negatives per class, over the
    pixels that count (valid and of a class with positive weight)."""
    probs = F.softmax(logits.float(), dim=1)
    pw, safe = _pixel_weights(target, w)
    counts = (pw > 0).float()[:, None]  # (B, 1, H, W)
    onehot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).float()
    p, g = probs * counts, onehot * counts
    dims = (0, 2, 3)
    tp = (p * g).sum(dims)
    fp = (p * (1 - g)).sum(dims)
    fn = ((1 - p) * g).sum(dims)
    return tp, fp, fn


def tversky(
    logits,
    target,
    class_weights=None,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 1.0,
    eps: float = 1.0,
):
    """Tversky loss (Salehi et al. 2017), optionally focal (Abraham & Khan 2019).

    ``TI_c = (TP + eps) / (TP + alpha FP + beta FN + eps)`` with soft counts over the
    batch; ``alpha`` weighs false positives, ``beta`` false negatives (alpha = beta = 0.5
    is Dice). The loss is the class-weighted mean of ``(1 - TI_c)^gamma``; gamma = 1 is
    plain Tversky, the focal Tversky paper's gamma = 4/3 in its ``(1 - TI)^(1/gamma)``
    form is ``gamma = 0.75`` here. Classes with weight 0 are left out.
    """
    w = _weights(class_weights, logits.shape[1], logits.device)
    tp, fp, fn = _soft_counts(logits, target, w)
    ti = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    # Classes of weight 0 are dropped before the power rather than multiplied by 0 after it.
    counted = w > 0
    per_class = _safe_pow(1 - ti[counted], gamma)
    return (per_class * w[counted]).sum() / w.sum().clamp_min(1e-6)


def dice(logits, target, class_weights=None, eps: float = 1.0):
    """Soft Dice loss (Milletari et al. 2016): ``1 - (2 TP + eps) / (2 TP + FP + FN + eps)``."""
    return tversky(logits, target, class_weights, alpha=0.5, beta=0.5, gamma=1.0, eps=eps)


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(logits, target, class_weights=None):
    """Lovasz-softmax loss (Berman et al. 2018) over the batch's pixels that count,
    averaged over the classes present in the target (weighted)."""
    w = _weights(class_weights, logits.shape[1], logits.device)
    pw, safe = _pixel_weights(target, w)
    keep = (pw > 0).reshape(-1)
    probs = F.softmax(logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])[keep]
    labels = safe.reshape(-1)[keep]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    losses, weights = [], []
    for c in range(logits.shape[1]):
        if w[c] <= 0:
            continue
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
        weights.append(w[c])
    if not losses:
        return logits.sum() * 0.0
    ws = torch.stack(weights)
    return (torch.stack(losses) * ws).sum() / ws.sum()


class SegmentationLoss(nn.Module):
    """A weighted sum of the losses above, e.g. ``[("ce", 1.0), ("dice", 1.0)]``.

    Parameters
    ----------
    terms : sequence of (name, weight)
        Names: ce, focal, dice, tversky, focal_tversky, lovasz.
    class_weights : sequence of float, length C
        Per-class weights shared by every term (see the module docstring).
    focal_gamma, tversky_alpha, tversky_beta, focal_tversky_gamma : float
        Hyper-parameters of the focal and Tversky terms.
    """

    def __init__(
        self,
        terms: Sequence[tuple[str, float]],
        class_weights: Sequence[float],
        focal_gamma: float = 2.0,
        tversky_alpha: float = 0.3,
        tversky_beta: float = 0.7,
        focal_tversky_gamma: float = 0.75,
    ) -> None:
        super().__init__()
        known = {"ce", "focal", "dice", "tversky", "focal_tversky", "lovasz"}
        for name, weight in terms:
            if name not in known:
                raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(known))}")
            if weight < 0:
                raise ValueError(f"loss weight of {name!r} must be >= 0, got {weight}")
        if min(class_weights) < 0 or max(class_weights) <= 0:
            raise ValueError(f"class weights must be >= 0 with one positive, got {list(class_weights)}")
        self.terms = [(n, float(w)) for n, w in terms if w > 0]
        self.register_buffer("class_weights", torch.as_tensor(list(class_weights), dtype=torch.float32))
        self.focal_gamma = focal_gamma
        self.alpha, self.beta, self.ft_gamma = tversky_alpha, tversky_beta, focal_tversky_gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.class_weights
        total = logits.new_zeros((), dtype=torch.float32)
        for name, weight in self.terms:
            if name == "ce":
                value = cross_entropy(logits, target, w)
            elif name == "focal":
                value = focal(logits, target, w, self.focal_gamma)
            elif name == "dice":
                value = dice(logits, target, w)
            elif name == "tversky":
                value = tversky(logits, target, w, self.alpha, self.beta, 1.0)
            elif name == "focal_tversky":
                value = tversky(logits, target, w, self.alpha, self.beta, self.ft_gamma)
            else:
                value = lovasz_softmax(logits, target, w)
            total = total + weight * value
        return total


def frequency_class_weights(pixel_counts, background_weight: float = 0.0, scheme: str = "sqrt_inverse"):
    """Class weights: ``(1/frequency)^0.5``, 1 for the most common foreground class and
    capped at 10 (a class seen in a handful of pixels must not dominate), with the
    background weight given separately."""
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    weights = torch.ones_like(counts)
    if scheme == "sqrt_inverse":
        freq = counts / counts.sum().clamp_min(1)
        raw = (1.0 / freq.clamp_min(1e-6)).sqrt()
        fg = raw[1:]
        weights[1:] = (fg / fg.min()).clamp(max=10.0)
    elif scheme != "none":
        raise ValueError(f"unknown class weighting {scheme!r}; valid: none, sqrt_inverse")
    weights[0] = background_weight
    return [float(x) for x in weights]
