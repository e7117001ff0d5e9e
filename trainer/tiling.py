"""Predicting images of any size by overlapping tiles.

Tiles of ``tile`` pixels step by about ``tile - overlap``, starting on the U-Net's
pooling grid (multiples of 2**depth) so that a tile computes what the whole image
computes there; the image is padded at its end (reflected, as the U-Net pads) so the
last tiles are whole. Each tile's class
probabilities are weighted by a window that is 1 in its middle and falls smoothly (a
raised cosine over ``overlap`` pixels) towards the tile's inner edges, where a U-Net
sees least context; an image edge is never down-weighted. Blended this way a tiled
prediction agrees with the whole-image prediction on nearly every pixel
(``bench/scale.py`` measures it; the test holds it to >= 98%).
"""

from __future__ import annotations

from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F

from .device import Precision, resolve_precision
from .inference import inference_model, to_input

# Images up to this many pixels are predicted whole; larger ones by tiles of TILE pixels
# overlapping by OVERLAP, or more for deeper U-Nets (see tile_size).
WHOLE_IMAGE_PIXELS = 1024 * 1024
TILE = 512
OVERLAP = 128


def tile_size(model: torch.nn.Module) -> tuple[int, int]:
    """(tile, overlap) for a U-Net: the overlap at least twice how far an input pixel
    reaches into the output (7 * 2**depth - 2 pixels: 54 at depth 3, 110 at depth 4), the
    tile three times the overlap."""
    overlap = max(OVERLAP, 14 * 2 ** getattr(model, "depth", 3))
    return max(TILE, 3 * overlap), overlap


def tile_layout(length: int, tile: int, overlap: int, multiple: int = 1) -> list[tuple[int, int]]:
    """(start, size) of tiles covering ``length``: ``tile`` pixels (a multiple of
    ``multiple``) overlapping by at least ``overlap``, each starting on a multiple of
    ``multiple`` (the U-Net's pooling grid, so a tile computes what the whole image
    computes there). The last tile ends at the image's edge and may be up to
    ``multiple - 1`` pixels shorter; the U-Net pads it as it pads the whole image."""
    tile = max(multiple, tile // multiple * multiple)
    if length <= tile:
        return [(0, length)]
    step = max(multiple, (tile - overlap) // multiple * multiple)
    last = -(-(length - tile) // multiple) * multiple
    return [(s, tile) for s in range(0, last, step)] + [(last, length - last)]


def _ramp(tile: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    w = np.ones(tile, np.float32)
    if overlap <= 0:
        return w
    k = min(overlap, tile // 2)
    rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)  # (0, 1), smooth
    if not at_start:
        w[:k] = rise
    if not at_end:
        w[tile - k :] = rise[::-1]
    return w


@torch.no_grad()
def predict_tiled(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device | str = "cpu",
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    precision: Precision | None = None,
    flip_tta: bool = False,
) -> np.ndarray:
    """Class probabilities (C, H, W) float32 of one (H, W) uint8 image, by tiles
    (by default of :func:`tile_size`)."""
    default_tile, default_overlap = tile_size(model)
    tile, overlap = tile or default_tile, default_overlap if overlap is None else overlap
    device = torch.device(device)
    precision = precision or resolve_precision("auto", device)
    model = inference_model(model, device)
    h, w = image.shape
    m = 2 ** getattr(model, "depth", 0)
    boxes = [
        (y, x, th, tw)
        for y, th in tile_layout(h, tile, overlap, m)
        for x, tw in tile_layout(w, tile, overlap, m)
    ]
    acc = None
    weight = np.zeros((h, w), np.float32)
    for _, same in groupby(sorted(boxes, key=lambda b: b[2:]), key=lambda b: b[2:]):
        same = list(same)  # tiles of one size share forward passes
        for start in range(0, len(same), batch_size):
            group = same[start : start + batch_size]
            acc = _add_tiles(model, image, group, acc, weight, overlap, device, precision, flip_tta)
    return acc / weight


def _add_tiles(model, image, group, acc, weight, overlap, device, precision, flip_tta):
    """Predict tiles of one size and add their windowed probabilities to ``acc``."""
    h, w = image.shape
    th, tw = group[0][2:]
    crops = np.stack([image[y : y + th, x : x + tw] for y, x, _, _ in group])
    x_in = to_input(torch.from_numpy(crops).to(device), device)
    with precision.autocast(device):
        logits = model(x_in)
    probs = F.softmax(logits.float(), dim=1)
    if flip_tta:
        with precision.autocast(device):
            mirrored = model(x_in.flip(-1))
        probs = (probs + F.softmax(mirrored.float(), dim=1).flip(-1)) / 2
    probs = probs.cpu().numpy()
    if acc is None:
        acc = np.zeros((probs.shape[1], h, w), np.float32)
    for k, (y, x, _, _) in enumerate(group):
        win = np.outer(_ramp(th, overlap, y == 0, y + th >= h), _ramp(tw, overlap, x == 0, x + tw >= w))
        acc[:, y : y + th, x : x + tw] += probs[k] * win
        weight[y : y + th, x : x + tw] += win
    return acc


def predict_any(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
    flip_tta: bool = False,
    whole_pixels: int = WHOLE_IMAGE_PIXELS,
) -> np.ndarray:
    """Class probabilities (C, H, W) of one image of any size: whole when it has at most
    ``whole_pixels`` pixels, by tiles otherwise (memory stays bounded)."""
    if image.size <= whole_pixels:
        from .inference import predict_arrays

        out = predict_arrays(
            model, image[None], 1, device, with_probs=True, precision=precision, flip_tta=flip_tta,
            probs_dtype=np.float32,
        )  # fmt: skip
        return out["probs"][0]
    return predict_tiled(model, image, device, precision=precision, flip_tta=flip_tta)


@torch.no_grad()
def classes_any(
    net: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    precision: Precision,
    whole_pixels: int = WHOLE_IMAGE_PIXELS,
) -> torch.Tensor:
    """Class ids (H, W) on ``device`` of one image of any size, as :func:`predict_any`
    gives them, for a model ready to predict (:func:`inference_model`). A whole image takes
    the argmax of its logits: the same classes as of its probabilities, without computing
    and copying them."""
    if image.size > whole_pixels:
        return torch.from_numpy(predict_tiled(net, image, device, precision=precision).argmax(0)).to(device)
    with precision.autocast(device):
        return net(to_input(torch.from_numpy(image[None]).to(device), device)).argmax(1)[0]


def frames_confusion(model, stored, rows, device, precision=None, dist=None, reduce=True, overrides=None):
    """The confusion matrix of ``model`` over frames ``rows`` of a stored dataset, each
    predicted whole or by tiles at its own size (each process takes its share under
    torchrun; with ``reduce`` the counts are then summed across processes).
    ``overrides``: row -> corrected mask, used instead of the stored one. A frame at a
    time: yields (frames done, frames) of this process's share after each, so that a
    caller can say how far it is, and returns the matrix."""
    from .device import DistContext
    from .inference import confusion_for

    dist = dist or DistContext()
    device = torch.device(device)
    net = inference_model(model, device)  # folded once, not once per frame
    cm = confusion_for(model, device)
    precision = precision or resolve_precision("auto", device)
    mine = list(rows)[dist.rank :: dist.world]
    for done, i in enumerate(mine, 1):
        predicted = classes_any(net, stored.image(int(i)), device, precision)
        truth = overrides.get(int(i)) if overrides else None
        truth = stored.mask(int(i)) if truth is None else truth
        cm.update(predicted, torch.from_numpy(truth).to(device))
        yield done, len(mine)
    if reduce:
        cm.all_reduce()
    return cm
