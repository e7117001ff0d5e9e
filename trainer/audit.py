"""Rank images whose mask is probably wrong, each with a score and the reasons.

Three kinds of evidence; an image's score is its strongest (the two that come from the
model add up), and its reasons list each with its own part of the score:

* duplicate masks: images whose masks are exactly (or almost exactly) equal to other
  images' masks. A group of 3 or more is the signature of pasted-in outliers sharing one
  mask and scores 1.0, above everything else;
* disagreement with a model that did not train on the image: K-fold out-of-fold
  predictions (or a given checkpoint). The score is the share of pixels that confident
  learning flags (the model gives the label less than that class's typical confidence and
  another class at least its own), kept only where such pixels form regions: ambiguous
  textures lower a plain per-image IoU for every image alike, this much less. Added to it:
  how much the model's agreement rises when the whole mask is moved by a few pixels (a
  misregistered mask, reported with the move that fixes it);
* suspicious statistics: a mask of (almost) one class.

The audit model is trained with background weight 1 so it can also flag background
painted where there is terrain, and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .audit_pixels import label_error_pixels, misalignment
from .dataset import Dataset, DatasetError
from .out_of_fold import audit_config, out_of_fold_predictions, predictions_from_checkpoint
from .stats import duplicate_mask_groups

CONFIDENT = 0.6
# Two masks that agree on 98% of their pixels are often just two simple scenes (soil
# under a strip of sky): worth a look, but weaker evidence than a model that disagrees
# with a tenth of the image. Exact pairs and groups of 3 or more stay near the top.
NEAR_PAIR = 0.1
MODEL_SCORE_MAX = 0.99  # model evidence stays below a group of 3+ identical masks (1.0)
MISALIGNED = 0.01  # a move of the mask that raises its mean probability this much is reported


def near_duplicate_groups(masks: np.ndarray, agreement: float = 0.98) -> list[tuple[int, ...]]:
    """Groups of masks that agree on at least ``agreement`` of their pixels (coarse
    signatures first, so this is not a full pairwise comparison)."""
    n = len(masks)
    if n == 0:
        return []
    sig = masks[:, ::8, ::8].reshape(n, -1)
    buckets: dict[bytes, list[int]] = {}
    for i in range(n):
        buckets.setdefault(sig[i].tobytes(), []).append(i)
    groups = []
    for idx in buckets.values():
        if len(idx) < 2:
            continue
        flat = masks[idx].reshape(len(idx), -1)
        seen: set[int] = set()
        for a in range(len(idx)):
            if idx[a] in seen:
                continue
            same = [idx[b] for b in range(len(idx)) if (flat[a] == flat[b]).mean() >= agreement]
            if len(same) >= 2:
                groups.append(tuple(same))
                seen.update(same)
    return groups


def move_mask(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by ``dy`` rows down and ``dx`` columns right (negative: up, left);
    the strip it uncovers repeats the nearest edge row or column."""
    h, w = mask.shape
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return mask[ys[:, None], xs[None, :]]


def describe_reason(reason: dict) -> str:
    """One line of text for a ranking reason, e.g. "misaligned (move 12 px left)"."""
    text = reason["kind"].replace("_", " ")
    if "group_size" in reason:
        text += f" (group of {reason['group_size']})"
    if "confident_disagreement" in reason:
        text += f" ({100 * reason['confident_disagreement']:.0f}% of pixels)"
    if reason["kind"] == "misaligned":
        text += f" ({describe_move(reason['shift_y'], reason['shift_x'])})"
    return text


def describe_move(dy: int, dx: int) -> str:
    parts = []
    if dx:
        parts.append(f"{abs(dx)} px {'right' if dx > 0 else 'left'}")
    if dy:
        parts.append(f"{abs(dy)} px {'down' if dy > 0 else 'up'}")
    return "move " + " and ".join(parts) if parts else "no move"


def _headline_first(reason: dict) -> float:
    """Sort key of an image's reasons: strongest first, except that a move which puts
    right at least half of what the model flags is the headline (it is also the fix)."""
    return -(2 * reason["score"] if reason["kind"] == "misaligned" else reason["score"])


class Evidence:
    """Each image's reasons and score as the evidence comes in, image by image or for all
    at once; :meth:`ranking` combines them, most suspicious first."""

    def __init__(self, n: int) -> None:
        self.scores = np.zeros(n)
        self.reasons: list[list[dict]] = [[] for _ in range(n)]

    def add(self, i: int, score: float, reason: dict, sets_score: bool = True) -> None:
        self.reasons[i].append({**reason, "score": round(float(score), 4)})
        if sets_score:
            self.scores[i] = max(self.scores[i], score)

    def groups(self, exact: list[tuple[int, ...]], near: list[tuple[int, ...]]) -> None:
        """Exact duplicate-mask groups, then near-duplicate ones not inside the exact ones."""
        for g in exact:
            s = 1.0 if len(g) >= 3 else 0.6
            for i in g:
                self.add(i, s, {"kind": "duplicate_mask", "group_size": len(g), "group": list(g)[:50]})
        members = {i for g in exact for i in g}
        for g in near:
            if set(g) <= members:
                continue
            for i in g:
                self.add(
                    i,
                    0.9 if len(g) >= 3 else NEAR_PAIR,
                    {"kind": "near_duplicate_mask", "group_size": len(g), "group": list(g)[:50]},
                )

    def single_class(self, i: int, shares: np.ndarray) -> None:
        """``shares``: the share of each class in image ``i``'s mask."""
        if shares.max() >= 0.995:
            self.add(i, 0.4, {"kind": "single_class", "class": int(shares.argmax())})

    def model(self, i: int, frac: float, plain: float, shift_gain: float, move) -> None:
        """The model's evidence on image ``i``: the share of its pixels confidently flagged
        (``frac``), of pixels predicted otherwise (``plain``), and the gain of the best
        move of its mask (``shift_gain``, ``move`` (dy, dx))."""
        if shift_gain >= MISALIGNED:
            dy, dx = (int(v) for v in move)
            self.add(i, shift_gain, {
                "kind": "misaligned", "shift_y": dy, "shift_x": dx, "gain": round(float(shift_gain), 4),
            }, sets_score=False)  # fmt: skip
        self.add(
            i,
            frac,
            {
                "kind": "model_disagreement",
                "confident_disagreement": round(float(frac), 4),
                "pixel_error": round(float(plain), 4),
            },
            sets_score=False,
        )
        # Both are shares of the image the model says are mislabelled: regions that
        # disagree, plus what moving the whole mask would put right. Their sum can pass 1
        # (a model that disagrees everywhere, an under-trained one): capped, so pasted-in
        # outliers sharing one mask stay first as promised above.
        self.scores[i] = max(self.scores[i], min(float(frac + shift_gain), MODEL_SCORE_MAX))

    def ranking(self, excluded=frozenset()) -> list[dict]:
        out = [
            {
                "index": i,
                "score": round(float(self.scores[i]), 4),
                "reasons": sorted(self.reasons[i], key=_headline_first),
            }
            for i in range(len(self.scores))
            if i not in excluded
        ]
        out.sort(key=lambda r: (-r["score"], r["index"]))
        return out


def class_shares(mask: np.ndarray) -> np.ndarray:
    """The share of each class id in ``mask`` (as many entries as its largest id needs, 5 at least)."""
    return np.bincount(mask.ravel(), minlength=5) / max(mask.size, 1)


def rank(
    masks: np.ndarray,
    pred: np.ndarray | None,
    conf: np.ndarray | None,
    excluded: set[int] | frozenset = frozenset(),
) -> list[dict]:
    """Combine the evidence into ``[{"index", "score", "reasons"}]``, most suspicious first."""
    n = len(masks)
    if n == 0:
        return []
    evidence = Evidence(n)
    exact_groups = duplicate_mask_groups(masks)
    evidence.groups(exact_groups, near_duplicate_groups(masks))
    for i in range(n):
        evidence.single_class(i, class_shares(masks[i]))
    if pred is not None:
        exact = {i for g in exact_groups for i in g}
        wrong = pred != masks
        shift_gain, moves = np.zeros(n), np.zeros((n, 2), np.int64)
        if conf is not None and conf.ndim == 4:  # class probabilities: confident learning
            suspect = label_error_pixels(masks, conf, skip=exact)
            shift_gain, moves = misalignment(masks, conf, skip=exact)
        else:  # max probabilities only
            suspect = wrong & (conf >= CONFIDENT) if conf is not None else wrong
        frac = suspect.reshape(n, -1).mean(axis=1)
        plain = wrong.reshape(n, -1).mean(axis=1)
        for i in range(n):
            evidence.model(i, frac[i], plain[i], shift_gain[i], moves[i])
    return evidence.ranking(excluded)


def baseline_rank(masks: np.ndarray, pred: np.ndarray) -> list[int]:
    """The simple baseline: images ordered by per-image mIoU between prediction and mask."""
    from .metrics import per_image_miou, worst_first

    return [int(i) for i in worst_first(per_image_miou(pred, masks))]


def check_pool(trainable: int, n: int) -> None:
    """Out-of-fold models need two images at least to train on (one held out, one not)."""
    if trainable < 2:
        raise DatasetError(
            f"{trainable} of {n} images left to train the audit's models on (the others are excluded "
            "or in groups of identical masks, which rank first as they are): at least 2 are needed; "
            "rank with a trained model's predictions instead (--checkpoint)"
        )


def audit(
    dataset: Dataset,
    checkpoint: str | None = None,
    folds: int = 3,
    minutes: float = 3.0,
    excluded: set[int] | frozenset = frozenset(),
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    control=None,
    epochs: int = 0,
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Rank the dataset's images; returns (ranking, predictions, confidences).

    The out-of-fold models train for ``minutes`` in all, or, when ``epochs`` > 0, for that
    many epochs each: then the ranking is repeatable (the same on every run).

    ``control`` (a :class:`~trainer.control.TrainControl`) reaches the out-of-fold
    trainings: pauses, stops, and the clock their time budget is measured on."""
    if checkpoint:
        pred, conf = predictions_from_checkpoint(dataset, checkpoint)
    else:
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        keep = np.array([i for i in range(len(dataset)) if i not in excluded])
        # Exact duplicate groups are outliers already found: leave them out of model training.
        dupes = {i for g in duplicate_mask_groups(dataset.masks) if len(g) >= 3 for i in g}
        train_pool = np.array([i for i in keep if i not in dupes])
        check_pool(len(train_pool), len(dataset))
        cfg = audit_config(minutes / folds, seed, epochs)
        rest = np.setdiff1d(np.arange(len(dataset)), train_pool)
        pred, conf = out_of_fold_predictions(
            dataset, train_pool, folds, cfg, progress, extra=rest, control=control
        )
    return rank(dataset.masks, pred, conf, excluded), pred, conf
