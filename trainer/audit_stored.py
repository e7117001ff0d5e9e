"""The audit of a dataset read from disk a frame at a time (any size, any count): the same
evidence and the same ranking as :func:`trainer.audit.rank` on arrays, holding a chunk
of frames at a time.

Three passes over the frames:

1. the masks: exact duplicates (a digest of each mask and its size, equal digests then
   compared), near duplicates (coarse signatures, buckets compared mask by mask) and the
   class shares of each mask;
2. the model's probabilities: the classes' thresholds (confident learning);
3. the model's probabilities again: each image's flagged pixels and best move.

The model predicts each frame twice: holding every frame's probabilities would take ten
bytes a pixel.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Sequence

import numpy as np

from .audit import Evidence, check_pool, class_shares, near_duplicate_groups
from .audit_pixels import class_sums, label_error_pixels, misalignment, thresholds_of
from .inference import same_size_runs
from .stats import duplicate_mask_groups

CHUNK = 64  # frames of one size whose evidence is computed together, as rank() does
CHUNK_PIXELS = CHUNK * 64 * 128  # and their pixels at most (ten bytes a pixel of probabilities)

# rows of one size (and one model) -> (predicted masks (B, H, W) uint8, probabilities (B, C, H, W))
ProbsOf = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]


def _subgroups(buckets: dict, mask_of, find) -> list[tuple[int, ...]]:
    """``find`` (a grouping of a mask array) within each bucket of two or more images, on
    their masks; the groups as the images' indices, bucket by bucket."""
    out = []
    for members in (m for m in buckets.values() if len(m) > 1):
        local = find(np.stack([mask_of(i) for i in members]))
        out += [tuple(members[j] for j in g) for g in local]
    return out


def mask_evidence(n: int, mask_of: Callable[[int], np.ndarray], evidence: Evidence, progress=None):
    """Pass 1: duplicate and near-duplicate groups and single-class masks into
    ``evidence``; returns the images in exact duplicate groups."""
    digests: dict[bytes, list[int]] = {}
    signatures: dict[tuple, list[int]] = {}
    for i in range(n):
        m = mask_of(i)
        key = hashlib.blake2b(m.tobytes(), digest_size=16, key=repr(m.shape).encode()).digest()
        digests.setdefault(key, []).append(i)
        signatures.setdefault((m.shape, m[::8, ::8].tobytes()), []).append(i)
        evidence.single_class(i, class_shares(m))
        if progress is not None and (i + 1) % 500 == 0:
            progress(f"reading masks: {i + 1} of {n}")
    exact = _subgroups(digests, mask_of, duplicate_mask_groups)
    evidence.groups(exact, _subgroups(signatures, mask_of, near_duplicate_groups))
    return {i for g in exact for i in g}


def chunks_of(
    rows: Sequence[int],
    shape_of: Callable[[int], tuple[int, int]],
    size: int = CHUNK,
    pixels: int = CHUNK_PIXELS,
) -> list[list[int]]:
    """``rows`` in runs of consecutive rows of one frame size: ``size`` frames and
    ``pixels`` pixels at most (a larger frame alone)."""
    return list(same_size_runs(rows, shape_of, lambda shape: min(size, pixels // (shape[0] * shape[1]))))


def rank_frames(
    n: int,
    mask_of: Callable[[int], np.ndarray],
    chunks: list[list[int]] | None,
    probs_of: ProbsOf | None,
    excluded=frozenset(),
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """:func:`trainer.audit.rank` of ``n`` images read one at a time: ``mask_of(i)`` is
    image i's mask; ``chunks`` cover every image, each of rows of one size that
    ``probs_of`` predicts together (None: the masks' evidence alone)."""
    if n == 0:
        return []
    evidence = Evidence(n)
    exact = mask_evidence(n, mask_of, evidence, progress)
    if probs_of is not None:
        model_evidence(evidence, n, mask_of, chunks, probs_of, exact, progress)
    return evidence.ranking(excluded)


def model_evidence(
    evidence: Evidence,
    n: int,
    mask_of: Callable[[int], np.ndarray],
    chunks: list[list[int]],
    probs_of: ProbsOf,
    exact: set[int],
    progress: Callable[[str], None] | None = None,
    kept: KeptPredictions | None = None,
) -> None:
    """Passes 2 and 3: the classes' thresholds over the images not in ``exact``
    duplicate groups, then each image's flagged pixels and best move into ``evidence``
    (and its predicted mask offered to ``kept``)."""
    sums, counts = {}, {}
    for k, rows in enumerate(chunks):
        _, probs = probs_of(rows)
        for j, i in enumerate(rows):
            sums[i], counts[i] = class_sums(mask_of(i), probs[j])
        _say(progress, "thresholds", k, chunks)
    classes = len(next(iter(sums.values())))
    total_sums, total_counts = np.zeros(classes), np.zeros(classes)
    for i in range(n):  # in image order, as class_thresholds adds them up
        if i not in exact:
            total_sums += sums[i]
            total_counts += counts[i]
    thresholds = thresholds_of(total_sums, total_counts)
    for k, rows in enumerate(chunks):
        pred, probs = probs_of(rows)
        masks = np.stack([mask_of(i) for i in rows])
        suspect = label_error_pixels(masks, probs, thresholds=thresholds)
        gain, move = misalignment(masks, probs, skip={j for j, i in enumerate(rows) if i in exact})
        frac = suspect.reshape(len(rows), -1).mean(axis=1)
        plain = (pred != masks).reshape(len(rows), -1).mean(axis=1)
        for j, i in enumerate(rows):
            evidence.model(i, frac[j], plain[j], gain[j], move[j])
            if kept is not None:
                kept.offer(i, evidence.scores[i], pred[j])
        _say(progress, "scoring", k, chunks)


class KeptPredictions:
    """The predicted masks of the highest-scored images, ``budget`` bytes of them at most:
    what the Review tab shows as the model's disagreement (the whole prediction of a
    dataset on disk is not kept)."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self.budget, self.bytes = budget, 0
        self.masks: dict[int, np.ndarray] = {}
        self._heap: list[tuple[float, int]] = []

    def offer(self, i: int, score: float, mask: np.ndarray) -> None:
        heapq.heappush(self._heap, (float(score), i))
        self.masks[i] = mask
        self.bytes += mask.nbytes
        while self.bytes > self.budget:
            _, lowest = heapq.heappop(self._heap)
            self.bytes -= self.masks.pop(lowest).nbytes


def _say(progress, what: str, k: int, chunks: list[list[int]]) -> None:
    if progress is not None:
        done = sum(len(c) for c in chunks[: k + 1])
        progress(f"{what}: {done} of {sum(len(c) for c in chunks)} images")


class Snapshot:
    """Corrections as they were read once, seen as a corrections store: what an
    out-of-fold model trains on (the engine's way of leaving rows out of a dataset on
    disk: every row but the fold's training rows excluded), or a store's state handed to
    a child process."""

    def __init__(self, edited: dict, excluded: set[int]) -> None:
        self.edited, self.excluded_rows = edited, set(excluded)

    def version(self) -> int:
        return 1

    def snapshot(self) -> tuple[dict, set[int]]:
        return self.edited, self.excluded_rows


class StoredAudit:
    """The audit of a :class:`~trainer.formats.StoredDataset`: its labelled frames, then
    the unlabelled ones labelled since (as :meth:`CorrectionStore.apply` appends them, so
    the indices are those of an audit of the same dataset in memory), each with its
    corrected mask. Excluded images are left out of the ranking and of the models'
    training."""

    def __init__(self, dataset, store=None) -> None:
        edited, excluded = store.snapshot() if store is not None else ({}, set())
        n = len(dataset)
        self.dataset, self.edited = dataset, edited
        self.rows = list(range(n)) + sorted(i for i in edited if i >= n)  # store rows, by position
        position = {row: k for k, row in enumerate(self.rows)}
        self.excluded = {position[i] for i in excluded if i in position}

    def mask(self, k: int) -> np.ndarray:
        row = self.rows[k]
        return self.edited[row] if row in self.edited else self.dataset.mask(row)

    def shape(self, k: int) -> tuple[int, int]:
        h, w = (int(v) for v in self.dataset.sizes[self.rows[k]])
        return h, w

    def probs_of(self, model_of: Callable[[int], object]) -> ProbsOf:
        """Predictions of a chunk's frames by ``model_of(position)`` (one model a chunk)."""
        from .out_of_fold import audit_device, audit_predict
        from .tiling import WHOLE_IMAGE_PIXELS, predict_any

        def probs(chunk: list[int]) -> tuple[np.ndarray, np.ndarray]:
            model = model_of(chunk[0])
            images = [self.dataset.image(self.rows[k]) for k in chunk]
            if images[0].size > WHOLE_IMAGE_PIXELS:  # alone in its chunk: by tiles
                p = predict_any(model, images[0], audit_device(), flip_tta=True)
                return p.argmax(0)[None].astype(np.uint8), p[None].astype(np.float16)
            out = audit_predict(model, np.stack(images), CHUNK)
            return out["masks"], out["probs"]

        return probs


def audit_stored(
    dataset,
    store=None,
    checkpoint: str | None = None,
    folds: int = 3,
    minutes: float = 3.0,
    seed: int = 0,
    epochs: int = 0,
    progress: Callable[[str], None] | None = None,
    control=None,
    kept: KeptPredictions | None = None,
) -> list[dict]:
    """:func:`trainer.audit.audit` of a dataset read from disk: the ranking (indices as
    :class:`StoredAudit` numbers the images). The out-of-fold models train from disk as
    ``train`` does, each with the other folds' images (``epochs``: the same ranking on
    every run). ``kept`` gets the predicted masks of the highest-scored images."""
    from .checkpoint import load_checkpoint, model_from_checkpoint

    if not checkpoint and folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    audit = StoredAudit(dataset, store)
    n = len(audit.rows)
    if n == 0:
        return []
    evidence = Evidence(n)
    exact = mask_evidence(n, audit.mask, evidence, progress)
    if checkpoint:
        model = model_from_checkpoint(
            load_checkpoint(checkpoint), checkpoint, dataset.classes, dataset.source
        )[0].eval()
        model_of, chunks = (lambda k: model), chunks_of(range(n), audit.shape)
    else:
        # Exact duplicate groups are outliers already found: left out of the models' training.
        pool = np.array([k for k in range(n) if k not in audit.excluded and k not in exact], np.int64)
        check_pool(len(pool), n)
        parts = np.array_split(np.random.default_rng(seed).permutation(pool), folds)
        parts[-1] = np.concatenate([parts[-1], np.setdiff1d(np.arange(n), pool)])  # the rest: the last model
        models = [_fold_model(audit, np.setdiff1d(pool, held), k, folds, minutes, seed, epochs, progress, control)
                  for k, held in enumerate(parts)]  # fmt: skip
        fold_of = {int(k): f for f, held in enumerate(parts) for k in held}
        model_of = lambda k: models[fold_of[k]]  # noqa: E731
        chunks = [c for held in parts for c in chunks_of(sorted(int(k) for k in held), audit.shape)]
    model_evidence(evidence, n, audit.mask, chunks, audit.probs_of(model_of), exact, progress, kept)
    return evidence.ranking(audit.excluded)


def _fold_model(
    audit: StoredAudit, train: np.ndarray, k: int, folds: int, minutes, seed, epochs, progress, control
):
    """The model of fold ``k``, trained from disk on the positions ``train``."""
    from .out_of_fold import audit_config, fold_model

    keep = {audit.rows[int(i)] for i in train}
    out = Snapshot(audit.edited, {r for r in range(len(audit.dataset.names)) if r not in keep})
    cfg = audit_config(minutes / folds, seed, epochs)
    return fold_model(audit.dataset, cfg, f"{k + 1}/{folds}", progress, control, corrections=out).eval()
