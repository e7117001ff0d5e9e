"""What child processes run: training, prediction and the review audit, each a function
``job(control, emit, *args)`` that sends typed events through ``emit`` and obeys the
``TrainControl`` (stop, preview, pause) that ``trainer.process`` feeds from its pipe."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import events as ev


@dataclass
class DatasetSpec:
    """How the child gets its data: a path (npz, folder, ``synthetic:N:SEED``) or arrays."""

    path: str | None = None
    mask_mapping: str = "identity"
    size: tuple[int, int] | None = None
    images: np.ndarray | None = None
    masks: np.ndarray | None = None
    pool: np.ndarray | None = None  # unlabelled images: labels saved for them join the training
    source: str = ""
    corrections_path: str | None = None  # a CorrectionStore the training re-reads every epoch
    corrections_keys: list[str] | None = None  # the store's key of each image (default: from the dataset)
    lazy: bool = False  # a large zarr dataset stays on disk (trained on by crops)
    classes: list | None = None  # the arrays' class table as records (None: the competition's)

    def open_corrections(self, dataset):
        if not self.corrections_path:
            return None
        from .corrections import CorrectionStore, identity

        ident = identity(dataset)
        if self.corrections_keys is not None:
            ident["keys"] = list(self.corrections_keys)
        return CorrectionStore(self.corrections_path, readonly=True, **ident)

    def load(self):
        from .dataset import Dataset
        from .formats import open_dataset

        if self.images is not None:
            from .classes import COMPETITION, ClassTable

            classes = ClassTable.from_records(self.classes) if self.classes else COMPETITION
            return Dataset(
                images=self.images, masks=self.masks, test_images=self.pool, source=self.source or "arrays",
                classes=classes,
            )  # fmt: skip
        return open_dataset(self.path, mask_mapping=self.mask_mapping, size=self.size, lazy=self.lazy)


class JobStopped(Exception):
    """A child job was asked to stop before it had a result."""


KNOWN_ERRORS = ("DatasetError", "ConfigError", "CheckpointError", "DeviceError", "RunDirError", "JobStopped")
"""Errors whose message is for people as it is; any other also gets its traceback."""


def wait_while_paused(control) -> None:
    """For jobs without steps of their own: honour pause and stop between batches."""
    poll = control.poll or (lambda: None)  # no pipe when the job runs in this process
    poll()
    while control.paused:
        time.sleep(0.02)
        poll()
    if control.stop_requested:
        raise JobStopped("stopped before it finished")


def train_job(
    control, emit, spec: DatasetSpec, cfg_dict: dict, run_dir: str | None, resume: str | None
) -> None:
    from .config import from_dict
    from .engine import fit

    dataset = spec.load()
    store = spec.open_corrections(dataset)
    for event in fit(
        dataset, from_dict(cfg_dict), run_dir, control=control, resume=resume, corrections=store
    ):
        emit(event)


def predict_job(
    control,
    emit,
    spec: DatasetSpec,
    checkpoint: str,
    device: str,
    batch_size: int | None,
    confidence: bool = False,
    out: str | None = None,
) -> None:
    """Masks and entropy maps (and, with ``confidence``, the predicted class's
    probability) of the labelled images, then the unlabelled ones. A dataset read from
    disk is predicted into a zarr array at ``out`` instead, and scored as it goes
    (:mod:`trainer.predict_stored`)."""
    from . import tiling
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .device import resolve_device
    from .formats import StoredDataset
    from .inference import predict_arrays

    dev = resolve_device(device)
    dataset = spec.load()
    # Arrays without a declared table (an image layer to predict) take the model's classes.
    classes = dataset.classes if spec.path or spec.classes else None
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint, classes, dataset.source)

    def progress(done: int, total: int) -> None:
        emit(ev.Progress(f"predicting {done}/{total}", done, total))
        wait_while_paused(control)

    if isinstance(dataset, StoredDataset):
        from .predict_stored import predict_to_disk

        if out is None:
            raise ValueError("a dataset read from disk is predicted into a file: give out")
        store = spec.open_corrections(dataset)
        emit(predict_to_disk(model.to(dev), dataset, out, dev, store, progress))
        return
    images, _ = dataset.stacked()  # as the viewer stacks them
    if images[0].size > tiling.WHOLE_IMAGE_PIXELS:  # large frames: one at a time, by tiles
        emit(ev.Predicted(*_predict_large(model.to(dev), images, dev, confidence, progress)))
        return
    out = predict_arrays(
        model.to(dev), images, batch_size, dev, with_entropy=True, with_probs=confidence,
        flip_tta=confidence, progress=progress,
    )  # fmt: skip
    best = out["probs"].max(axis=1) if confidence else None
    emit(ev.Predicted(out["masks"], out["entropy"], best))


def _predict_large(model, images: np.ndarray, device, confidence: bool, progress):
    """(masks, entropy, best probability or None) of frames too large to predict whole."""
    from . import tiling

    masks = np.empty(images.shape, np.uint8)
    entropy = np.empty(images.shape, np.float16)
    best = np.empty(images.shape, np.float16) if confidence else None
    for k, image in enumerate(images):
        probs = tiling.predict_any(
            model, image, device, flip_tta=confidence, whole_pixels=tiling.WHOLE_IMAGE_PIXELS
        )
        masks[k] = probs.argmax(0)
        entropy[k] = -(probs * np.log(np.maximum(probs, 1e-8))).sum(0)
        if best is not None:
            best[k] = probs.max(0)
        progress(k + 1, len(images))
    return masks, entropy, best


def suggest_job(control, emit, pool, labelled, checkpoint: str, top: int | None) -> None:
    """Rank the unlabelled images for labelling next (``trainer.suggest``)."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .suggest import rank_pool, score_pool

    data = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(data, checkpoint)

    def progress(done: int, total: int) -> None:
        emit(ev.Progress(f"scoring unlabelled images {done}/{total}", done, total))
        wait_while_paused(control)

    scores = score_pool(model, pool, progress=progress)
    features = score_pool(model, labelled).features if labelled is not None and len(labelled) else None
    emit(ev.Suggested(rank_pool(scores, top, features, classes=data["class_table"])))


def stored_audit_job(control, emit, spec: DatasetSpec, minutes: float, folds: int) -> None:
    """The review audit of a converted dataset read from disk (``spec``: its path and
    corrections store, which this process reads): its labelled frames, ranked as napari
    numbers them (images labelled since are not among them)."""
    from .audit_stored import KeptPredictions, Snapshot, audit_stored
    from .device import compute_clock
    from .formats import open_zarr

    control.clock = compute_clock
    dataset = open_zarr(spec.path)  # read from disk whatever its size: the viewer's numbering
    store = spec.open_corrections(dataset)
    edited, excluded = store.snapshot() if store is not None else ({}, set())
    n = len(dataset)
    labelled = Snapshot({i: m for i, m in edited.items() if i < n}, {i for i in excluded if i < n})
    kept = KeptPredictions()
    ranking = audit_stored(
        dataset, labelled, folds=folds, minutes=minutes,
        progress=lambda text: emit(ev.Progress(text)), control=control, kept=kept,
    )  # fmt: skip
    emit(ev.Ranked(ranking, kept.masks))


def audit_job(control, emit, images, masks, excluded, minutes: float, folds: int, classes=None) -> None:
    """The review audit with a compute budget: ``minutes`` of this process's CPU time
    (over its threads), so sharing the CPU with a training does not shrink its models.
    ``classes``: the masks' class table as records (None: the competition's)."""
    from .audit import audit
    from .classes import COMPETITION, ClassTable
    from .dataset import Dataset
    from .device import compute_clock

    control.clock = compute_clock
    table = ClassTable.from_records(classes) if classes else COMPETITION
    ds = Dataset(images=images, masks=masks, source="review", classes=table)
    ranking, pred, _ = audit(
        ds, folds=folds, minutes=minutes, excluded=set(excluded),
        progress=lambda text: emit(ev.Progress(text)), control=control,
    )  # fmt: skip
    emit(ev.Ranked(ranking, pred))
