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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .softmax_terms import _SoftmaxTerms

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


class _Batch:
    """What the terms of a loss share on one batch, each computed at most once: the
    per-pixel weights, the softmax terms (:class:`_SoftmaxTerms`) and, for the terms
    that need every class's probability (Lovasz), log-probabilities and probabilities."""

    def __init__(
        self, logits: torch.Tensor, target: torch.Tensor, class_weights, counts: bool = True
    ) -> None:
        self.input, self.counts = logits, counts  # counts: a term will ask for soft_counts
        self.num_classes = logits.shape[1]
        self.w = _weights(class_weights, self.num_classes, logits.device)
        self.pw, self.safe = _pixel_weights(target, self.w)
        self._terms = self._logits = self._logp = self._probs = self._counted = self._logp_own = None

    @property
    def counted(self) -> torch.Tensor:
        """(B, H, W) 1 for the pixels that count (valid, of a class with positive weight)."""
        if self._counted is None:
            self._counted = (self.pw > 0).float()
        return self._counted

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.input.float()
        return self._logits

    @property
    def logp(self) -> torch.Tensor:
        if self._logp is None:
            self._logp = F.log_softmax(self.logits, dim=1)
        return self._logp

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = self.logp.exp()
        return self._probs

    def _softmax_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._terms is None:
            self._terms = _SoftmaxTerms.apply(self.input, self.safe, self.counted)
        return self._terms

    @property
    def logp_own(self) -> torch.Tensor:
        """(B, H, W) log-probability of each pixel's own class (that of class 0 for
        ignored pixels, whose weight is 0). Without overlap terms, autograd's log-softmax
        and gather are as fast (the class sums would be computed for nothing)."""
        if self.counts:
            return self._softmax_terms()[0]
        if self._logp_own is None:  # gathered once for every term: each gather's backward is a scatter
            self._logp_own = self.logp.gather(1, self.safe[:, None]).squeeze(1)
        return self._logp_own

    def weighted_mean(self, per_pixel: torch.Tensor) -> torch.Tensor:
        return (per_pixel * self.pw).sum() / self.pw.sum().clamp_min(1e-6)

    def soft_counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Soft true positives, false positives and false negatives per class over the
        pixels that count (valid and of a class with positive weight). The true positives
        are each pixel's probability of its own class (from :attr:`logp_own`): one
        (B, H, W) pass instead of a product with a one-hot (B, C, H, W) tensor, summed
        into each image row's classes first: adding every pixel into five totals at once
        made a GPU's additions wait on each other (1.7 ms a step of the gpu preset on an
        H200, 0.02 ms by rows), and it is twice as fast on a CPU too."""
        own, total_p = self._softmax_terms()
        counted = self.counted
        tp = self._class_sums(own.exp() * counted)
        pixels = self._class_sums(counted)  # not bincount: on a GPU it reads the labels' maximum back
        return tp, total_p - tp, pixels - tp

    def _class_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(C,) the sum of (B, H, W) ``values`` over each class's pixels, row by row first."""
        rows = self.safe.reshape(-1, self.safe.shape[-1])
        sums = values.new_zeros(len(rows), self.num_classes)
        return sums.scatter_add(1, rows, values.reshape(rows.shape)).sum(0)


def _ce(b: _Batch) -> torch.Tensor:
    return b.weighted_mean(-b.logp_own)


def _focal(b: _Batch, gamma: float) -> torch.Tensor:
    logp = b.logp_own
    return b.weighted_mean(-_safe_pow(1 - logp.exp(), gamma) * logp)


def _tversky(b: _Batch, alpha: float, beta: float, gamma: float, eps: float = 1.0) -> torch.Tensor:
    tp, fp, fn = b.soft_counts()
    ti = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    # Classes of weight 0 are multiplied by 0, not picked out (which would make a GPU's
    # host wait to learn how many there are): _safe_pow's gradient is finite everywhere,
    # so 0 times it is 0, not NaN.
    per_class = _safe_pow(1 - ti, gamma)
    return (per_class * b.w).sum() / b.w.sum().clamp_min(1e-6)


def cross_entropy(logits, target, class_weights=None) -> torch.Tensor:
    """Class-weighted cross-entropy averaged over the weight of the pixels that count."""
    return _ce(_Batch(logits, target, class_weights, counts=False))


def focal(logits, target, class_weights=None, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): ``-w_c (1 - p_t)^gamma log p_t``, weighted mean."""
    return _focal(_Batch(logits, target, class_weights, counts=False), gamma)


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
    return _tversky(_Batch(logits, target, class_weights), alpha, beta, gamma, eps)


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
    return _lovasz(_Batch(logits, target, class_weights, counts=False))


def _lovasz(b: _Batch) -> torch.Tensor:
    w, logits = b.w, b.logits
    keep = (b.pw > 0).reshape(-1)
    probs = b.probs.permute(0, 2, 3, 1).reshape(-1, b.num_classes)[keep]
    labels = b.safe.reshape(-1)[keep]
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


OVERLAP_TERMS = ("dice", "tversky", "focal_tversky")  # the terms that read _Batch.soft_counts


@dataclass(frozen=True)
class LossParams:
    """The hyper-parameters any term may read (the config's fields of the same names)."""

    focal_gamma: float = 2.0
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    focal_tversky_gamma: float = 0.75

    @classmethod
    def from_config(cls, cfg) -> LossParams:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


LOSSES: dict[str, Callable[[_Batch, LossParams], torch.Tensor]] = {
    "ce": lambda b, p: _ce(b),
    "focal": lambda b, p: _focal(b, p.focal_gamma),
    "dice": lambda b, p: _tversky(b, 0.5, 0.5, 1.0),
    "tversky": lambda b, p: _tversky(b, p.tversky_alpha, p.tversky_beta, 1.0),
    "focal_tversky": lambda b, p: _tversky(b, p.tversky_alpha, p.tversky_beta, p.focal_tversky_gamma),
    "lovasz": lambda b, p: _lovasz(b),
}
"""The registry: a loss's name in a config (``"ce:1,dice:1"``) to its term. Adding a loss
is one function and one line here, plus its name in ``config.LOSS_NAMES`` (which cannot
import torch; a test checks the two agree)."""


class SegmentationLoss(nn.Module):
    """A weighted sum of registered losses, e.g. ``[("ce", 1.0), ("dice", 1.0)]``.

    Parameters
    ----------
    terms : sequence of (name, weight)
        Names: the keys of :data:`LOSSES`.
    class_weights : sequence of float, length C
        Per-class weights shared by every term (see the module docstring).
    params : LossParams
        Hyper-parameters of the focal and Tversky terms.
    """

    def __init__(
        self,
        terms: Sequence[tuple[str, float]],
        class_weights: Sequence[float],
        params: LossParams | None = None,
    ) -> None:
        super().__init__()
        for name, weight in terms:
            if name not in LOSSES:
                raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
            if weight < 0:
                raise ValueError(f"loss weight of {name!r} must be >= 0, got {weight}")
        if min(class_weights) < 0 or max(class_weights) <= 0:
            raise ValueError(f"class weights must be >= 0 with one positive, got {list(class_weights)}")
        self.terms = [(n, float(w)) for n, w in terms if w > 0]
        self.register_buffer("class_weights", torch.as_tensor(list(class_weights), dtype=torch.float32))
        self.params = params or LossParams()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # One shared batch: softmax, log-softmax and pixel weights are computed once for
        # all terms (cross-entropy + Dice used to compute them twice).
        b = _Batch(logits, target, self.class_weights, counts=any(n in OVERLAP_TERMS for n, _ in self.terms))
        total = logits.new_zeros((), dtype=torch.float32)
        for name, weight in self.terms:
            total = total + weight * LOSSES[name](b, self.params)
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
