"""The audit's models: predictions for every image from a model that did not train on it
(K-fold, out-of-fold), or from a given checkpoint, and the recipe of those quick models."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import numpy as np
import torch

from . import events as ev
from .config import TrainConfig, preset
from .dataset import Dataset


def out_of_fold_predictions(
    dataset: Dataset,
    indices: np.ndarray,
    folds: int,
    cfg: TrainConfig,
    progress: Callable[[str], None] | None = None,
    extra: np.ndarray | None = None,
    control=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted masks, max probabilities) for ``indices``, each from a model trained
    on the other folds; ``extra`` images (in no fold) are predicted by the last model."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(indices)
    parts = np.array_split(order, folds)
    pred = np.zeros((len(dataset), *dataset.image_shape), np.uint8)
    conf = np.zeros((len(dataset), dataset.num_classes, *dataset.image_shape), np.float16)
    for k, held in enumerate(parts):
        train = np.setdiff1d(order, held)
        sub = Dataset(
            images=dataset.images[train],
            masks=dataset.masks[train],
            source=dataset.source,
            classes=dataset.classes,
        )
        model = fold_model(sub, cfg, f"{k + 1}/{folds}", progress, control)
        if k == folds - 1 and extra is not None and len(extra):
            held = np.concatenate([held, extra])
        out = audit_predict(model, dataset.images[held])
        pred[held] = out["masks"]
        conf[held] = out["probs"]
    return pred, conf


def audit_device() -> torch.device:
    """Where the audit's models predict: where they train (``auto``: a GPU when there is one)."""
    from .device import resolve_device

    return resolve_device("auto")


def audit_predict(model, images: np.ndarray, cpu_batch: int = 64) -> dict[str, np.ndarray]:
    """Masks and probabilities of ``images``, each the mean of the image and its mirror
    image, on :func:`audit_device`: ``cpu_batch`` images a batch on a CPU, a GPU's default
    batch there."""
    from .inference import predict_arrays

    device = audit_device()
    batch = cpu_batch if device.type == "cpu" else None
    return predict_arrays(model, images, batch, device, with_probs=True, flip_tta=True)


def fold_model(dataset, cfg: TrainConfig, fold: str, progress=None, control=None, corrections=None):
    """Train one out-of-fold model (fold ``fold``, e.g. "2/3") and return it;
    ``corrections`` says which rows of a dataset on disk it leaves out."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .engine import fit

    with tempfile.TemporaryDirectory() as tmp:
        for e in fit(dataset, cfg, tmp, control=control, corrections=corrections):
            if progress and isinstance(e, ev.Step) and e.step % 20 == 0:
                progress(f"fold {fold}: {100 * e.progress:.0f}% (loss {e.loss:.3f})")
            if isinstance(e, ev.Failed):
                raise RuntimeError(f"audit model of fold {fold} failed: {e.message}")
            if isinstance(e, ev.Stopped):
                raise RuntimeError("the ranking was stopped")
        model, _ = model_from_checkpoint(load_checkpoint(tmp + "/checkpoints/last.pt"))
    return model


def predictions_from_checkpoint(dataset: Dataset, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    from .checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint, dataset.classes, dataset.source)
    out = audit_predict(model, dataset.images)
    return out["masks"], out["probs"]


def audit_config(minutes_per_fold: float, seed: int = 0, epochs: int = 0) -> TrainConfig:
    """The out-of-fold models' recipe: many quick steps rather than a big model.

    Each model trains for ``minutes_per_fold``, or for ``epochs`` when that is > 0: a
    budget of steps instead of time, so that the ranking is the same on every run (on the
    same machine and precision; a time budget makes as many steps as the machine's load
    allows).

    A base width of 8 with batches of 16 at lr 5e-3 makes several times the steps of the
    ``cpu`` preset (width 16, batches of 32) in the same minute and predicts held-out
    images about as well: ``bench/audit_models.py`` measures both, and docs/figures.md quotes
    its output. The final weights are used (a cosine schedule ends at its best point), so
    validation runs once, at the end.
    """
    return preset("cpu").replace(
        epochs=epochs,
        minutes=0.0 if epochs > 0 else minutes_per_fold,
        base_width=8,
        batch_size=16,
        lr=5e-3,
        background_weight=1.0,
        val_fraction=0.05,
        val_every=10**6,
        checkpoint_every=10**6,
        seed=seed,
        warmup_steps=20,
    )
