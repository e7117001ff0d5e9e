"""The model's evidence pixel by pixel, for the audit (:mod:`trainer.audit`): which
labelled pixels a model confidently disagrees with (confident learning, Northcutt et al.
2021, kept where such pixels form regions), and which move of a whole mask makes the
model agree with it more (a misregistered mask)."""

from __future__ import annotations

import numpy as np
import torch


def class_sums(mask: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one image: per class, the sum of the model's probability of that class over the
    pixels labelled with it, and their count (what :func:`class_thresholds` adds up)."""
    c = probs.shape[0]
    sums, counts = np.zeros(c), np.zeros(c)
    for k in range(c):
        sel = mask == k
        if sel.any():
            sums[k] = float(probs[k][sel].astype(np.float32).sum())
            counts[k] = sel.sum()
    return sums, counts


def thresholds_of(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def class_thresholds(masks: np.ndarray, probs: np.ndarray, skip=frozenset()) -> np.ndarray:
    """Per class, the model's mean probability for that class on the pixels labelled with
    it (confident learning, Northcutt et al. 2021): a self-confidence per class that adapts
    to how well the model knows each class."""
    c = probs.shape[1]
    sums, counts = np.zeros(c), np.zeros(c)
    for i in range(len(masks)):
        if i not in skip:
            s, k = class_sums(masks[i], probs[i])
            sums += s
            counts += k
    return thresholds_of(sums, counts)


def label_error_pixels(
    masks: np.ndarray,
    probs: np.ndarray,
    skip=frozenset(),
    window: int = 5,
    coherence: float = 0.6,
    thresholds: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels whose label is probably wrong: the model gives the label less than that
    class's threshold and another class at least its own threshold, in a neighbourhood
    where most pixels are such errors (label errors are regions; model noise is speckle).
    ``thresholds``: the classes' thresholds, when these images are a part of the ranked
    ones (else they come from these images, leaving out those in ``skip``)."""
    from scipy.ndimage import uniform_filter

    t = (thresholds if thresholds is not None else class_thresholds(masks, probs, skip)).astype(np.float32)
    out = np.zeros(masks.shape, bool)
    for start in range(0, len(masks), 128):
        p = probs[start : start + 128].astype(np.float32)  # (B, C, H, W)
        m = masks[start : start + 128].astype(np.int64)
        given = np.take_along_axis(p, m[:, None], axis=1)[:, 0]
        above = p >= t[None, :, None, None]  # the label's own class is not: given < t[m]
        err = above.any(axis=1) & (given < t[m])
        smooth = uniform_filter(err.astype(np.float32), size=(1, window, window), mode="nearest")
        out[start : start + 128] = err & (smooth >= coherence)
    return out


def _shift_gains(
    p: torch.Tensor, m: torch.Tensor, given: torch.Tensor, reach: int, axis: int
) -> torch.Tensor:
    """(B, 2*reach+1): for each move d of the mask along ``axis`` (-1 = columns, -2 = rows),
    the mean gain in the model's probability of the moved labels, over the pixels that
    both the moved and the original mask cover (a paired comparison; nothing wraps)."""
    size = m.shape[axis]
    out = torch.zeros(len(m), 2 * reach + 1)
    for k, d in enumerate(range(-reach, reach + 1)):
        if d == 0:
            continue
        a = abs(d)
        dst = slice(a, size) if d > 0 else slice(0, size - a)  # where moved labels land
        src = slice(0, size - a) if d > 0 else slice(a, size)
        ix = (Ellipsis, dst) if axis == -1 else (Ellipsis, dst, slice(None))
        sx = (Ellipsis, src) if axis == -1 else (Ellipsis, src, slice(None))
        moved = torch.gather(p[ix], 1, m[sx][:, None])[:, 0]
        out[:, k] = (moved - given[ix]).mean(dim=(1, 2))
    return out


def misalignment(
    masks: np.ndarray, probs: np.ndarray, reach: float = 0.25, skip=frozenset()
) -> tuple[np.ndarray, np.ndarray]:
    """Masks that fit the image better after a translation: per image, the gain in mean
    probability of its labels when the mask is moved by the best (dy, dx) within
    ``reach`` of the image size, and that move.

    A misregistered mask (drawn on a crop or a neighbouring frame) is wrong along every
    boundary at once in thin strips, which per-pixel disagreement under-counts; moving the
    mask back makes the model agree. Only a peak inside the search range counts: a gain
    that keeps rising to the edge of the range is a model that disagrees with a large
    region, not a misregistration.
    """
    n, _, h, w = probs.shape
    gain = np.zeros(n)
    move = np.zeros((n, 2), np.int64)  # (dy, dx)
    for start in range(0, n, 64):
        p = torch.from_numpy(probs[start : start + 64].astype(np.float32))
        m = torch.from_numpy(masks[start : start + 64].astype(np.int64))
        given = torch.gather(p, 1, m[:, None])[:, 0]
        for axis, size in ((-1, w), (-2, h)):
            r = max(1, int(reach * size))
            g = _shift_gains(p, m, given, r, axis)
            best, arg = (t.numpy() for t in g.max(dim=1))
            d = arg - r
            here = slice(start, start + len(m))
            better = (np.abs(d) <= r - 2) & (best > gain[here])
            candidate = np.zeros((len(m), 2), np.int64)
            candidate[:, 1 if axis == -1 else 0] = d
            gain[here] = np.where(better, best, gain[here])
            move[here] = np.where(better[:, None], candidate, move[here])
    for i in skip:
        gain[i], move[i] = 0.0, (0, 0)
    return gain, move
