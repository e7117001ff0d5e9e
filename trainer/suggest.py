"""Which unlabelled images to label next: ranked by how much labelling them should help.

Each image gets an uncertainty score from the model's own predictions (flip-averaged),
counted by regions rather than speckle: pixels where the model hesitates (a small margin
between its two likeliest classes, or a high entropy) are kept only where they form
regions of at least ``min_region`` pixels after an opening, so the thin strips along
every class boundary, uncertain in any segmentation, do not decide the order.

The queue is then picked greedily for diversity: each pick is the image whose
uncertainty, times how unlike it is to the images already picked (and to the labelled
images when given), is largest. Unlike means distance between the model's own
bottleneck features (global-average-pooled), over half the pool's median pairwise
distance; twenty near-identical frames of one scene do not fill the top.

Every entry says why it is there: its uncertain regions, the classes it is predicted
to hold, and how far it is from the nearest image above it (or from the labelled set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .classes import CLASSES, ClassTable

MEASURES = ("margin", "entropy")


@dataclass
class PoolScores:
    """What the model says of each pool image."""

    uncertainty: np.ndarray  # (M,) share of the image in uncertain regions, weighted by doubt
    regions: np.ndarray  # (M,) uncertain regions kept
    uncertain_share: np.ndarray  # (M,) share of pixels in those regions
    class_share: np.ndarray  # (M, C) predicted class shares
    features: np.ndarray  # (M, D) L2-normalised bottleneck features


def _doubt(probs: torch.Tensor, measure: str) -> torch.Tensor:
    """(B, C, H, W) probabilities -> (B, H, W) doubt in [0, 1]."""
    if measure == "margin":
        top2 = probs.topk(2, dim=1).values
        return 1.0 - (top2[:, 0] - top2[:, 1])
    ent = -(probs * probs.clamp_min(1e-8).log()).sum(1)
    return ent / float(np.log(probs.shape[1]))


def _regions(doubt: np.ndarray, threshold: float, min_region: int) -> tuple[np.ndarray, int]:
    """Boolean mask of the uncertain regions kept, and how many there are."""
    from scipy import ndimage

    uncertain = ndimage.binary_opening(doubt >= threshold, structure=np.ones((3, 3), bool))
    labels, n = ndimage.label(uncertain)
    if n == 0:
        return uncertain, 0
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_region
    keep[0] = False
    return keep[labels], int(keep.sum())


@torch.no_grad()
def score_pool(
    model: nn.Module,
    images,
    measure: str = "margin",
    threshold: float = 0.5,
    min_region: int = 24,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> PoolScores:
    """Score (M, H, W) uint8 images in batches, or frames of any sizes (a sequence whose
    ``[i]`` is an (H, W) uint8 frame: :class:`FramesOf` a dataset read from disk) in
    batches of consecutive frames of one size, frames of over a megapixel alone by tiles.
    The probabilities are never all held."""
    from .inference import inference_model

    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(MEASURES)}")
    device = torch.device(device)
    model = inference_model(model, device)
    bottleneck: list[torch.Tensor] = []
    hook = model.encoders[-1].register_forward_hook(lambda _m, _i, out: bottleneck.append(out))
    m = len(images)
    n_classes = model.head.out_channels
    out = PoolScores(
        np.zeros(m),
        np.zeros(m, np.int64),
        np.zeros(m),
        np.zeros((m, n_classes)),
        np.zeros((m, 0), np.float32),
    )
    feats = []
    try:
        for start, probs, f in _pool_probs(model, images, batch_size, device, bottleneck):
            feats.append(F.normalize(f, dim=1).cpu().numpy())
            doubt = _doubt(probs, measure).cpu().numpy()
            pred = probs.argmax(1).cpu().numpy()
            for k in range(len(probs)):
                i = start + k
                kept, n = _regions(doubt[k], threshold, min_region)
                out.regions[i] = n
                out.uncertain_share[i] = kept.mean()
                out.uncertainty[i] = float((doubt[k] * kept).mean())
                out.class_share[i] = np.bincount(pred[k].ravel(), minlength=n_classes) / pred[k].size
            if progress is not None:
                progress(start + len(probs), m)
    finally:
        hook.remove()
    out.features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return out


class FramesOf:
    """Rows ``rows`` of a dataset read from disk, as :func:`score_pool` takes frames: a
    frame is read when it is scored. Pickled (for a child process), it is its dataset's
    path and the rows: the child opens the dataset again."""

    def __init__(self, stored, rows) -> None:
        self.stored, self.rows = stored, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.stored.image(self.rows[k])

    def __reduce__(self):
        return _reopened, (str(self.stored.path), self.rows)


def _reopened(path: str, rows: list[int]) -> FramesOf:
    from .formats import open_zarr

    return FramesOf(open_zarr(path), rows)


def _batches(images, batch_size: int):
    """(first index, (B, H, W) frames): batches of an array; of a sequence, runs of
    consecutive frames of one size, ``batch_size`` scaled to their size as prediction
    scales its batch (:func:`~trainer.inference.predict_batch`; a large frame alone). A
    frame is read when its batch is made."""
    from .config import PREDICT_BATCH
    from .inference import predict_batch, same_size_runs
    from .tiling import WHOLE_IMAGE_PIXELS

    if isinstance(images, np.ndarray):
        for start in range(0, len(images), batch_size):
            yield start, np.asarray(images[start : start + batch_size])
        return

    def limit(shape) -> int:
        if shape[0] * shape[1] > WHOLE_IMAGE_PIXELS:
            return 1  # predicted by tiles, alone
        return batch_size * predict_batch(shape) // PREDICT_BATCH

    read: dict[int, np.ndarray] = {}  # a batch's frames and the one after it, read once each

    def shape_of(k: int) -> tuple[int, ...]:
        read[k] = np.asarray(images[k])
        return read[k].shape

    for run in same_size_runs(range(len(images)), shape_of, limit):
        yield run[0], np.stack([read.pop(k) for k in run])


def _pool_probs(model, images, batch_size: int, device: torch.device, bottleneck: list):
    """(first index, flip-averaged probabilities (B, C, H, W), bottleneck features (B, D))
    of each batch (:func:`_batches`); ``bottleneck`` is filled by the caller's hook on
    every forward pass."""
    from .device import resolve_precision
    from .inference import to_input
    from .tiling import WHOLE_IMAGE_PIXELS, predict_tiled

    for start, frames in _batches(images, batch_size):
        bottleneck.clear()
        if frames[0].size > WHOLE_IMAGE_PIXELS:  # alone in its batch; tiles: the features are their mean
            fp32 = resolve_precision("fp32", device)
            tiled = predict_tiled(model, frames[0], device, precision=fp32, flip_tta=True)
            features = torch.cat([b.float().mean((2, 3)) for b in bottleneck]).mean(0, keepdim=True)
            yield start, torch.from_numpy(tiled)[None], features
            continue
        x = to_input(torch.from_numpy(frames).to(device), device)
        probs = F.softmax(model(x).float(), 1) + F.softmax(model(x.flip(-1)).float(), 1).flip(-1)
        yield start, probs / 2, bottleneck[0].float().mean((2, 3)) + bottleneck[1].float().mean((2, 3))


def _min_distances(features: np.ndarray, others: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each row of ``features``, the distance to the nearest row of ``others``."""
    best = np.full(len(features), np.inf)
    for s in range(0, len(others), chunk):
        o = others[s : s + chunk]
        d2 = (features**2).sum(1)[:, None] + (o**2).sum(1)[None] - 2 * features @ o.T
        best = np.minimum(best, np.sqrt(np.clip(d2, 0, None)).min(1))
    return best


def typical_spacing(features: np.ndarray, sample: int = 512, seed: int = 0) -> float:
    """Half the median distance between two pool images (on a sample): images closer
    than this to one already picked count as partly seen. (The nearest-neighbour distance
    would not do: in a pool of frame sequences most images have a near copy.)"""
    if len(features) < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(features), min(sample, len(features)), replace=False)
    sub = features[pick]
    d2 = (sub**2).sum(1)[:, None] + (sub**2).sum(1)[None] - 2 * sub @ sub.T
    spacing = 0.5 * float(np.median(np.sqrt(np.clip(d2[np.triu_indices(len(sub), 1)], 0, None))))
    return spacing if spacing > 1e-6 else 1.0


def rank_pool(
    scores: PoolScores,
    top: int | None = None,
    labelled_features: np.ndarray | None = None,
    diversity: float = 1.0,
    classes: ClassTable = CLASSES,
) -> list[dict]:
    """The queue: ``[{"index", "score", "reasons"}]``, most useful first (the predicted
    classes named by ``classes``, the dataset's table).

    ``diversity`` 0 ranks by uncertainty alone; 1 (default) multiplies each candidate's
    uncertainty by ``min(1, distance / spacing)``, its distance to the nearest image
    already picked or labelled over half the pool's median pairwise distance."""
    m = len(scores.uncertainty)
    top = m if top is None else min(top, m)
    feats = scores.features.astype(np.float64)
    spacing = typical_spacing(feats)
    near = np.full(m, np.inf)
    if labelled_features is not None and len(labelled_features):
        near = _min_distances(feats, labelled_features.astype(np.float64))
    from_labelled = near.copy()
    picked: list[dict] = []
    taken = np.zeros(m, bool)
    for _ in range(top):
        factor = np.minimum(1.0, near / spacing) ** diversity if diversity > 0 else np.ones(m)
        value = np.where(taken, -np.inf, scores.uncertainty * factor)
        # With no uncertainty left anywhere, the most novel image comes first.
        if not np.isfinite(value).any():
            break
        if value.max() <= 0:
            value = np.where(taken, -np.inf, np.minimum(near, 1e9))
        i = int(np.argmax(value))
        taken[i] = True
        picked.append(
            _entry(
                i,
                float(value[i]),
                scores,
                near[i] / spacing,
                from_labelled[i] / spacing,
                len(picked),
                classes,
            )
        )
        d = np.sqrt(np.clip(((feats - feats[i]) ** 2).sum(1), 0, None))
        near = np.minimum(near, d)
    return picked


def _entry(
    i: int,
    value: float,
    scores: PoolScores,
    novelty: float,
    from_labelled: float,
    rank: int,
    classes: ClassTable = CLASSES,
) -> dict:
    reasons = [
        {
            "kind": "uncertain",
            "regions": int(scores.regions[i]),
            "share": round(float(scores.uncertain_share[i]), 4),
            "score": round(float(scores.uncertainty[i]), 4),
        }
    ]
    if np.isfinite(novelty):
        reasons.append(
            {
                "kind": "diverse",
                "distance": round(float(novelty), 3),
                "versus": "labelled images" if rank == 0 or novelty == from_labelled else "images above",
            }
        )
    shares = scores.class_share[i]
    reasons.append(
        {
            "kind": "predicted",
            "classes": {
                (classes[c].name if c < len(classes) else f"class {c}"): round(float(shares[c]), 3)
                for c in np.argsort(-shares)
                if shares[c] >= 0.01
            },
        }
    )
    return {"index": i, "score": round(value, 5), "reasons": reasons}


def describe(entry: dict) -> str:
    """One line for people: why this image is in the queue."""
    parts = []
    for r in entry["reasons"]:
        if r["kind"] == "uncertain":
            if r["regions"]:
                parts.append(f"{r['regions']} uncertain region(s), {100 * r['share']:.0f}% of the image")
            else:
                parts.append("no uncertain region")
        elif r["kind"] == "diverse":
            if r["distance"] >= 1:
                parts.append(f"unlike the {r['versus']}")
            else:
                parts.append(f"close to the {r['versus']} ({r['distance']:.1f} of the usual spacing)")
        elif r["kind"] == "predicted":
            top = list(r["classes"].items())[:2]
            parts.append("mostly " + " and ".join(f"{name} {100 * s:.0f}%" for name, s in top))
    return "; ".join(parts)


def suggest(
    model: nn.Module,
    pool: np.ndarray,
    labelled: np.ndarray | None = None,
    top: int | None = None,
    measure: str = "margin",
    diversity: float = 1.0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Rank the ``pool`` images (M, H, W) for labelling next; ``labelled`` images (N, H, W),
    if given, count as already picked for diversity."""
    scores = score_pool(model, pool, measure=measure, device=device, progress=progress)
    labelled_features = None
    if labelled is not None and len(labelled):
        labelled_features = score_pool(model, labelled, measure=measure, device=device).features
    return rank_pool(scores, top, labelled_features, diversity)
