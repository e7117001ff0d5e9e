"""Predictions with a run's checkpoint, in child processes: every image of the dataset
(per-image mIoU, worst-first order), or any image layer the person opened. A mixin of
:class:`~marsviewer._training_model.TrainingModel` (its state and signals)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np

from trainer import events as ev
from trainer.config import ConfigError
from trainer.metrics import confusion_matrix, per_image_miou, worst_first

from ._stack import is_stack


class Predictions:
    """Predict the dataset or a layer; visit the images the model gets worst."""

    # Removes the predictions that the last one replaced (a thread: gigabytes can take
    # seconds, which the viewer's thread must not wait for).
    removing: threading.Thread | None = None

    def predict_all(self, checkpoint: str | None = None):
        """Predict every image with the best (else last) checkpoint, in a child process."""
        from trainer.process import PredictionProcess

        checkpoint = checkpoint or self.checkpoint
        if not checkpoint:
            self.status.emit("No checkpoint yet: train first, or open a run.", True)
            return None
        try:
            spec = self.training_data()
        except ConfigError as exc:
            self.status.emit(str(exc), True)
            return None
        out = None
        if is_stack(self.prediction):  # read from disk: the masks go to disk too, read back by frame
            from trainer.runs import new_run_dir

            run = Path(checkpoint).resolve().parent.parent.name
            # A new folder each time, RUN-TIME: the layer goes on reading the last one
            # meanwhile. One folder holds a dataset's predictions, whichever run made them.
            try:
                out = new_run_dir(
                    self.runs_root / "predictions" / dataset_key(self.browser.source), f"{run}-"
                )
            except OSError as exc:
                self.status.emit(
                    f"Cannot predict: cannot write to {self.runs_root} ({exc.strerror or exc})", True
                )
                return None
        self.predictor = PredictionProcess(spec, checkpoint, out=None if out is None else str(out))
        self.status.emit(f"Predicting {len(self.prediction)} images with {Path(checkpoint).name}…", False)
        self.busy_changed.emit()
        return self.predictor

    def _poll_prediction(self) -> None:
        for e in self.predictor.events():
            if isinstance(e, ev.Progress):
                self.status.emit(e.text, False)
            elif isinstance(e, ev.Predicted):
                self._take_prediction(e.masks, e.entropy)
            elif isinstance(e, ev.PredictedOnDisk):
                self._take_disk_prediction(e)
            elif isinstance(e, ev.Failed):
                self.status.emit(f"Prediction failed: {e.message}", True)
                self.notify.emit(f"Prediction failed: {e.message.splitlines()[0]}", "error")
        if self.predictor.finished:
            self.predictor = None
            self.busy_changed.emit()
            self.predicted.emit()

    def predict_image(self, name: str, data, rgb: bool = False):
        """Predict any image the person opened (a 2-D gray or RGB image, or a stack of
        them, any size) with the current checkpoint, in a child process; ``layer_predicted``
        follows. Images are made gray as training images are (``trainer.images``)."""
        from trainer.images import to_gray_u8
        from trainer.process import DatasetSpec, PredictionProcess

        if not self.checkpoint:
            self.status.emit("No checkpoint yet: train first, or open a run.", True)
            return None
        arr = np.asarray(data)
        spatial = arr.ndim - (1 if rgb else 0)
        if spatial not in (2, 3) or min(arr.shape[:spatial][-2:]) < 1:
            self.status.emit(
                f"Cannot predict {name!r}: expected a 2-D image or a stack of them, got shape {arr.shape}",
                True,
            )
            return None
        frames = arr[None] if spatial == 2 else arr
        images = np.stack([to_gray_u8(f) for f in frames])
        spec = DatasetSpec(images=images, masks=np.zeros_like(images), source=name)
        job = PredictionProcess(spec, self.checkpoint)  # batches of about as many pixels whatever the size
        self.layer_job = (name, job, spatial == 2)
        self.status.emit(f"Predicting {name!r} with {Path(self.checkpoint).name}…", False)
        return job

    def _poll_layer_job(self) -> None:
        name, job, single = self.layer_job
        for e in job.events():
            if isinstance(e, ev.Predicted):
                self.layer_predicted.emit(name, e.masks[0] if single else e.masks)
                self.status.emit(f"Predicted {name!r}: the layer {name!r} prediction shows it.", False)
            elif isinstance(e, ev.Failed):
                self.status.emit(f"Prediction of {name!r} failed: {e.message}", True)
                self.notify.emit(f"Prediction of {name!r} failed: {e.message.splitlines()[0]}", "error")
        if job.finished:
            self.layer_job = None

    def _take_prediction(self, masks: np.ndarray, entropy: np.ndarray) -> None:
        self.prediction[:] = masks
        self.entropy[:] = entropy
        self.prediction_changed.emit(None)
        # Scored where there are labels: the labelled images and those labelled since.
        rows = self.browser.labelled_rows()
        labels = np.asarray(self.browser.masks)
        image_miou = np.full(len(masks), np.nan)
        k = len(self.browser.classes)
        image_miou[rows] = per_image_miou(masks[rows], labels[rows], k)
        self._scored(image_miou, confusion_matrix(masks[rows], labels[rows], k))
        self.status.emit(
            f"Predicted all {len(masks)} images. Mean per-image mIoU {np.nanmean(self.image_miou):.3f}; "
            "'Next worst IoU' visits the images the model disagrees with most."
            + self.browser.pool_balance(masks),
            False,
        )

    def _take_disk_prediction(self, e) -> None:
        """A prediction of a dataset read from disk: the prediction layer reads its frames
        from the masks the child wrote (the uncertainty layer stays as it was)."""
        import zarr

        stack = self.prediction
        for i in list(stack.written):
            stack.forget(i)  # live previews: the whole prediction replaces them
        stack.rebase(zarr.open_array(e.path, mode="r"))
        self.prediction_changed.emit(None)
        older = [p for p in Path(e.path).parent.iterdir() if p != Path(e.path)]  # of this dataset, any run
        if older:
            self.removing = threading.Thread(
                target=_remove, args=(older,), name="remove-predictions", daemon=True
            )
            self.removing.start()
        self._scored(np.asarray(e.image_miou, float), np.asarray(e.confusion))
        self.status.emit(
            f"Predicted all {len(stack)} images into {e.path}. Mean per-image mIoU "
            f"{np.nanmean(self.image_miou):.3f}; 'Next worst IoU' visits the images the model disagrees with most.",
            False,
        )

    def _scored(self, image_miou: np.ndarray, confusion: np.ndarray) -> None:
        self.image_miou = image_miou
        order = worst_first(image_miou)
        self.worst_order = order[~np.isnan(image_miou[order])]
        self.worst_position = -1
        self.confusion = confusion

    def next_worst(self) -> str:
        """Go to the next image in worst-first order; returns a line saying which."""
        if self.worst_order is None:
            return ""
        self.worst_position = (self.worst_position + 1) % len(self.worst_order)
        i = int(self.worst_order[self.worst_position])
        self.browser.set_index(i)
        return f"image {i}: mIoU {self.image_miou[i]:.3f} (rank {self.worst_position + 1} of {len(self.worst_order)})"


def _remove(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def dataset_key(source: str) -> str:
    """The name of a dataset's predictions folder: its name, and a digest of where it is
    (two datasets of one name in two folders keep theirs apart)."""
    import hashlib

    where = hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:8]
    return f"{Path(source).stem}-{where}"
