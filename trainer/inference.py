"""Splitting, evaluation and prediction: the parts of training that also run on their own."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .classes import NUM_CLASSES
from .config import GPU_PREDICT_BATCH, PREDICT_BATCH
from .device import DistContext, Precision, resolve_precision, uses_channels_last
from .metrics import ConfusionMatrix


def stratified_split(presence: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``val_fraction`` of the images, stratified by the rarest class each
    image contains, so rare classes (big rock) appear in both splits."""
    n = len(presence)
    if n < 2:
        raise ValueError(f"need at least 2 labelled images to hold some out for validation, got {n}")
    fg = presence[:, 1:]
    freq = fg.mean(axis=0)
    # Stratum = the rarest foreground class present (-1 for images of background only).
    order = np.argsort(freq)  # rarest first
    stratum = np.full(n, -1)
    for c in order[::-1]:
        stratum[fg[:, c]] = c
    rng = np.random.default_rng(seed)
    val = []
    for s in np.unique(stratum):
        members = rng.permutation(np.flatnonzero(stratum == s))
        k = int(round(val_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)  # a class in 2+ images is in both halves
        val.extend(members[:k].tolist())
    if not val:
        val = [int(rng.integers(n))]
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx


def predict_batch(image_shape: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """Images per forward pass when predicting images of ``image_shape`` (its last two
    are height and width) on ``device``: at the competition's 64x128, :data:`PREDICT_BATCH`
    on a CPU, :data:`GPU_PREDICT_BATCH` elsewhere; as many pixels a batch for other sizes
    (at least 1, at most twice that). On a CPU a batch of large frames whose activations
    leave the caches runs slower per pixel: 768x768 frames at 32 a batch predicted 2.3x
    slower than one at a time."""
    batch = PREDICT_BATCH if torch.device(device).type == "cpu" else GPU_PREDICT_BATCH
    h, w = image_shape[-2:]
    return max(1, min(2 * batch, batch * 64 * 128 // max(int(h) * int(w), 1)))


def prepare_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move a model to ``device`` in the memory layout its convolutions run fastest in there."""
    device = torch.device(device)
    model = model.to(device)
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model


def inference_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``model`` ready to predict on ``device``: in eval mode and the device's layout, with
    its batch norms folded into the convolutions (a copy: the model passed in keeps its
    weights, normalisation and mode; only its device and layout may change)."""
    from .model import fold_batch_norm

    return prepare_model(fold_batch_norm(prepare_model(model, device)), device)


def confusion_for(model: torch.nn.Module, device) -> ConfusionMatrix:
    """An empty confusion matrix of ``model``'s classes, knowing which it leaves out."""
    from .model import absent_classes, output_classes

    return ConfusionMatrix(output_classes(model) or NUM_CLASSES, device, absent_classes(model))


def to_input(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float in [0, 1], in the model's memory layout."""
    x = images_u8.unsqueeze(1).float().div_(255.0)
    if uses_channels_last(device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def batches(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def same_size_runs(rows, shape_of, limit) -> Iterator[list[int]]:
    """``rows`` in runs of consecutive rows whose frames have one size (``shape_of(row)``,
    asked once a row, in order), ``limit(shape)`` rows at most (at least 1): batches of
    frames of several sizes. A run is yielded once the row after it is seen."""
    run: list[int] = []
    run_shape = None
    for row in rows:
        shape = tuple(shape_of(row))
        if run and (shape != run_shape or len(run) >= max(1, limit(shape))):
            yield run
            run = []
        run.append(row)
        run_shape = shape
    if run:
        yield run


@torch.no_grad()
def confusion_on(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    indices: np.ndarray,
    batch_size: int,
    dist: DistContext | None = None,
    precision: Precision | None = None,
    reduce: bool = True,
) -> ConfusionMatrix:
    """Accumulate the confusion matrix of ``model`` over ``indices`` (each process takes
    its slice under torchrun; with ``reduce`` the counts are then summed across processes).
    ``precision`` defaults to what ``auto`` picks for the device."""
    dist = dist or DistContext()
    device = images.device
    precision = precision or resolve_precision("auto", device)
    net = inference_model(model, device)
    cm = confusion_for(model, device)
    mine = np.asarray(indices)[dist.rank :: dist.world]
    for chunk in batches(mine, batch_size):
        idx = torch.as_tensor(chunk, device=device)
        with precision.autocast(device):
            logits = net(to_input(images[idx], device))
        cm.update(logits.argmax(1), masks[idx])
    if reduce:
        cm.all_reduce()
    return cm


@torch.no_grad()
def predict_arrays(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    with_probs: bool = False,
    with_entropy: bool = False,
    progress=None,
    flip_tta: bool = False,
    precision: Precision | None = None,
    probs_dtype: type = np.float16,
) -> dict[str, np.ndarray]:
    """Predict (N, H, W) uint8 images: ``masks`` uint8, optionally ``probs`` (N, C, H, W)
    (float16 unless ``probs_dtype`` says otherwise: an arg-max taken again from float16
    probabilities can differ from ``masks`` where two classes are within rounding) and
    ``entropy`` (N, H, W) float16 in nats. ``flip_tta`` averages the probabilities of
    each image and its mirror image (twice the cost). ``precision`` defaults to what
    ``auto`` picks for the device. ``batch_size`` defaults to :func:`predict_batch`."""
    device = torch.device(device)
    precision = precision or resolve_precision("auto", device)
    model = inference_model(model, device)
    batch_size = batch_size or predict_batch(images.shape, device)
    n = len(images)
    out = {"masks": np.empty((n, *images.shape[1:]), np.uint8)}
    if with_probs:
        out["probs"] = None
    if with_entropy:
        out["entropy"] = np.empty((n, *images.shape[1:]), np.float16)
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        x = torch.as_tensor(np.asarray(chunk) if not torch.is_tensor(chunk) else chunk).to(device)
        x = to_input(x, device)
        with precision.autocast(device):
            logits = model(x)
        if flip_tta:
            with precision.autocast(device):
                mirrored = model(x.flip(-1))
            probs = (F.softmax(logits.float(), dim=1) + F.softmax(mirrored.float(), dim=1).flip(-1)) / 2
        elif with_probs or with_entropy:
            probs = F.softmax(logits.float(), dim=1)
        else:
            probs = logits  # the arg-max of the logits is the arg-max of the probabilities
        out["masks"][start : start + len(chunk)] = probs.argmax(1).to(torch.uint8).cpu().numpy()
        if with_probs:
            if out["probs"] is None:
                out["probs"] = np.empty((n, probs.shape[1], *images.shape[1:]), probs_dtype)
            out["probs"][start : start + len(chunk)] = probs.cpu().numpy()
        if with_entropy:
            ent = -(probs * probs.clamp_min(1e-8).log()).sum(1)
            out["entropy"][start : start + len(chunk)] = ent.half().cpu().numpy()
        if progress is not None:
            progress(min(start + len(chunk), n), n)
    return out


# The confidence a prediction needs to become a starting label: the lowest at which 95% of
# the kept pixels are right with the default preset (bench/label_confidence.py).
LABEL_CONFIDENCE = 0.7


def keep_confident(masks: np.ndarray, confidence: np.ndarray | None, min_confidence: float) -> np.ndarray:
    """``masks`` with every pixel whose ``confidence`` (the predicted class's probability,
    same shape) is below ``min_confidence`` set to background (0, "not labelled")."""
    if min_confidence <= 0:
        return masks
    out = masks.copy()
    out[confidence < min_confidence] = 0
    return out
