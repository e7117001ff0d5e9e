"""Predict every frame of a dataset read from disk into a zarr array on disk, scoring the
labelled frames as it goes: what napari's *Predict all* does for a dataset too large for
memory (the predictions of thousands of large frames do not fit in memory either)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import events as ev
from .audit_stored import chunks_of
from .formats.zarr_dataset import chunk_layout
from .metrics import confusion_matrix, per_image_miou


class _BlockWriter:
    """Frames written in order into an (N, H, W) uint8 zarr array, a block of whole chunks
    (or shards) at a time; a frame smaller than H x W is padded with 0."""

    def __init__(self, out: Path, n: int, frame: tuple[int, int]) -> None:
        import zarr

        chunks, shards, self.block = chunk_layout(*frame)
        self.array = zarr.create_array(
            out, shape=(n, *frame), chunks=chunks, shards=shards, dtype="uint8", fill_value=0, overwrite=True
        )
        self.frame, self.start, self.pending = frame, 0, []

    def add(self, mask: np.ndarray) -> None:
        padded = np.zeros(self.frame, np.uint8)
        padded[: mask.shape[0], : mask.shape[1]] = mask
        self.pending.append(padded)
        if len(self.pending) == self.block:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.array[self.start : self.start + len(self.pending)] = np.stack(self.pending)
            self.start += len(self.pending)
            self.pending = []


def predict_to_disk(
    model,
    dataset,
    out: str | Path,
    device,
    store=None,
    progress: Callable[[int, int], None] | None = None,
) -> ev.PredictedOnDisk:
    """Predict every frame of ``dataset`` (a :class:`~trainer.formats.StoredDataset`: its
    labelled frames, then its unlabelled ones, as napari stacks them) into ``out``, each
    at its own size inside the dataset's padded frame. The labelled frames, and those
    labelled since in ``store``, are scored against their corrected masks: per-image mIoU
    (NaN elsewhere) and one confusion matrix. Frames of one size go in batches, large ones
    by tiles."""
    from .inference import predict_arrays
    from .tiling import WHOLE_IMAGE_PIXELS, predict_any

    edited = store.snapshot()[0] if store is not None else {}
    n = len(dataset.names)
    writer = _BlockWriter(Path(out), n, tuple(dataset.frame_shape))
    miou = np.full(n, np.nan)
    k = dataset.num_classes
    confusion = np.zeros((k, k), np.int64)
    done = 0
    for rows in chunks_of(range(n), lambda r: tuple(int(v) for v in dataset.sizes[r])):
        images = [dataset.image(r) for r in rows]
        if images[0].size > WHOLE_IMAGE_PIXELS:  # alone in its chunk: by tiles
            masks = predict_any(model, images[0], device).argmax(0)[None].astype(np.uint8)
        else:
            masks = predict_arrays(model, np.stack(images), None, device)["masks"]
        for r, mask in zip(rows, masks, strict=True):
            writer.add(mask)
            truth = edited.get(r) if r in edited else dataset.mask(r) if r < dataset.n_labelled else None
            if truth is not None:
                miou[r] = per_image_miou(mask[None], truth[None], k)[0]
                confusion += confusion_matrix(mask, truth, k)
        done += len(rows)
        if progress is not None:
            progress(done, n)
    writer.flush()
    return ev.PredictedOnDisk(str(out), miou, confusion)
