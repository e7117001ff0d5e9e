"""Qt-free state of training from napari: the run's lifecycle, live previews, prediction
of the whole dataset and worst-first navigation.

The run itself is a child process (``trainer.process``); ``poll()`` reads what arrived
without waiting. The prediction and uncertainty arrays live here; the viewer shows them
as layers and refreshes on ``prediction_changed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from psygnal import Signal

from trainer import events as ev
from trainer.config import ConfigError, TrainConfig
from trainer.metrics import confusion_matrix, per_image_miou, worst_first

from ._run_record import RunFollower, RunRecord
from ._stack import blank_like, is_stack

PREVIEW_EVERY_S = 3.0
PREVIEW_THROTTLE_S = 0.15  # at most one preview request per this while the person browses
ENDED = ("finished", "stopped", "failed")


def default_runs_root() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("marsviewer")) / "runs"


class TrainingModel:
    """Training, attaching to runs and predicting, for one dataset at a time.

    ``training_data`` is a callable giving the ``DatasetSpec`` a run trains on (the
    session composes it from the dataset and the corrections store).

    Signals
    -------
    record_changed()            new events were applied to ``record`` (curves, IoU, status)
    status(str, bool)           a status line for the Train tab (text, is_error)
    busy_changed()              a run or a prediction started or ended
    prediction_changed(object)  rows of ``prediction``/``entropy`` were written (None: all)
    predicted()                 a whole-dataset prediction arrived (worst-first order ready)
    run_ended(str)              finished, stopped or failed
    notify(str, str)            a message for the person (text, "info" or "error")
    """

    record_changed = Signal()
    status = Signal(str, bool)
    busy_changed = Signal()
    prediction_changed = Signal(object)
    predicted = Signal()
    run_ended = Signal(str)
    notify = Signal(str, str)
    layer_predicted = Signal(str, object)  # (layer name, class ids of its image(s))

    def __init__(self, browser, training_data: Callable, runs_root: Path | None = None) -> None:
        self.browser = browser
        self.training_data = training_data
        self.runs_root = Path(runs_root) if runs_root else default_runs_root()
        self.process = None
        self.follower: RunFollower | None = None
        self.predictor = None
        self.layer_job: tuple | None = None  # (layer name, its PredictionProcess, one 2-D image?)
        self.record = RunRecord()
        self.prediction: np.ndarray | None = None  # (N, H, W) uint8, shown as a Labels layer
        self.entropy: np.ndarray | None = None  # (N, H, W) float32, shown as an Image layer
        self.image_miou: np.ndarray | None = None
        self.worst_order: np.ndarray | None = None
        self.worst_position = -1
        self.confusion: np.ndarray | None = None  # of the last whole-dataset prediction
        self.first_preview_s: float | None = None
        self._start_time = 0.0
        self._preview_wanted = False
        self._last_preview_request = -np.inf
        browser.index_changed.connect(self._want_preview)

    # -- the dataset -------------------------------------------------------------------
    def set_frames(self, masks) -> None:
        """A dataset with these (N, H, W) masks is open (None: none): fresh prediction
        arrays of its shape (frame stacks for a dataset read from disk)."""
        self.worst_order = self.image_miou = self.confusion = None
        if masks is None:
            self.prediction = self.entropy = None
        elif (
            self.prediction is None
            or self.prediction.shape != tuple(np.shape(masks))
            or is_stack(masks) != is_stack(self.prediction)
        ):
            self.prediction = blank_like(masks, np.uint8)
            self.entropy = blank_like(masks, np.float32)
        self.prediction_changed.emit(None)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return (self.process is not None and self.process.running) or self.follower is not None

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint to predict or fine-tune from: the best, else the last."""
        return self.record.best_checkpoint or self.record.last_checkpoint

    def start(self, config: TrainConfig, resume: str | None = None):
        """Start a run in a child process; returns it (None, with a message, if it cannot)."""
        from trainer.process import TrainingProcess

        if self.running:
            return self.process
        try:
            spec = self.training_data()
        except ConfigError as exc:
            self.status.emit(f"Cannot start: {exc}", True)
            return None
        run_dir = self.runs_root / time.strftime("%Y%m%d-%H%M%S")
        self._reset(str(run_dir))
        self.record.state = "starting"
        self._start_time = time.perf_counter()
        self.process = TrainingProcess(
            spec, config, str(run_dir), resume=resume,
            preview_indices=[self.browser.index], preview_every_s=PREVIEW_EVERY_S,
        )  # fmt: skip
        self.status.emit(f"Starting… (run directory {run_dir})", False)
        self.busy_changed.emit()
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.process.running:
            self.process.stop()
            self.record.state = "stopping"
            self.status.emit("Stopping after the current step; a checkpoint will be saved…", False)
        elif self.follower is not None:
            self.follower = None
            self.status.emit("Detached from the run (it keeps running where it was started).", False)
        self.busy_changed.emit()

    def attach(self, path: str | Path) -> bool:
        """Show a run directory's curves and previews; keeps following a run in progress."""
        if self.process is not None and self.process.running:
            self.status.emit("A training run is in progress; stop it before opening another.", True)
            return False
        try:
            follower = RunFollower(path)
        except FileNotFoundError as exc:
            self.status.emit(str(exc), True)
            return False
        self._reset(str(path))
        self.follower = follower
        self.poll()
        self.busy_changed.emit()
        return True

    def fine_tune(self, epochs: int):
        """Continue from the best checkpoint for ``epochs`` more epochs, on the saved
        corrections and exclusions."""
        from trainer.checkpoint import CheckpointError, load_checkpoint

        ckpt = self.checkpoint
        if not ckpt:
            self.status.emit("No checkpoint to fine-tune yet.", True)
            return None
        try:
            data = load_checkpoint(ckpt)
            cfg = data["config_obj"].replace(epochs=data["epoch"] + 1 + epochs, minutes=0.0)
        except (CheckpointError, ConfigError) as exc:
            self.status.emit(str(exc), True)
            return None
        return self.start(cfg, resume=ckpt)

    def _reset(self, run_dir: str | None) -> None:
        self.record = RunRecord(run_dir=run_dir)
        self.worst_order = self.image_miou = self.confusion = None
        self.first_preview_s = None
        self.record_changed.emit()

    # -- polling -------------------------------------------------------------------------
    def poll(self) -> None:
        """Read what arrived (never waits) and tell the views once."""
        events = []
        if self.process is not None and self.record.state not in ENDED:
            events = self.process.events()
        elif self.follower is not None:
            events = self.follower.new_events()
        for e in events:
            self.record.apply(e)
            if isinstance(e, ev.Preview):
                self.show_preview(e.indices, e.masks, e.entropy)
        if self.follower is not None and any(d.get("kind") == "preview" for d in events):
            latest = self.follower.latest_preview()
            if latest is not None:
                self.show_preview(*latest)
        if events:
            self.record_changed.emit()
            if self.record.message:
                self.status.emit(self.record.message, self.record.state == "failed")
        self._send_preview_request()
        if self.predictor is not None:
            self._poll_prediction()
        if self.layer_job is not None:
            self._poll_layer_job()
        if events and self.record.state in ENDED:
            self.follower = None
            self.busy_changed.emit()
            self.run_ended.emit(self.record.state)
            if self.record.state == "failed":
                self.notify.emit(f"Training failed: {self.record.message.splitlines()[0]}", "error")

    def _want_preview(self, _index: int) -> None:
        self._preview_wanted = True

    def _send_preview_request(self) -> None:
        """The image on screen, at most every PREVIEW_THROTTLE_S while the person browses."""
        if not self._preview_wanted or self.process is None or not self.process.running:
            return
        now = time.perf_counter()
        if now - self._last_preview_request >= PREVIEW_THROTTLE_S:
            self.process.request_preview([self.browser.index])
            self._last_preview_request = now
            self._preview_wanted = False

    def show_preview(self, indices, masks, entropy) -> None:
        if self.prediction is None:
            return
        rows = [i for i in indices if 0 <= i < len(self.prediction)]
        for k, i in enumerate(indices):
            if 0 <= i < len(self.prediction):
                self.prediction[i] = masks[k]
                if entropy is not None:
                    self.entropy[i] = entropy[k]
        if self.first_preview_s is None and self._start_time:
            self.first_preview_s = time.perf_counter() - self._start_time
        self.prediction_changed.emit(rows)

    # -- predicting the whole dataset ------------------------------------------------------
    def predict_all(self, checkpoint: str | None = None):
        """Predict every image with the best (else last) checkpoint, in a child process."""
        from trainer.process import PredictionProcess

        checkpoint = checkpoint or self.checkpoint
        if not checkpoint:
            self.status.emit("No checkpoint yet: train first, or open a run.", True)
            return None
        if is_stack(self.prediction):
            self.status.emit(
                "This dataset is read from disk frame by frame: predict all of it with "
                f"'mars-trainer predict {self.browser.source} --checkpoint {checkpoint} --out FOLDER'; "
                "the live preview shows the image on screen while training.",
                True,
            )
            return None
        try:
            spec = self.training_data()
        except ConfigError as exc:
            self.status.emit(str(exc), True)
            return None
        self.predictor = PredictionProcess(spec, checkpoint)
        self.status.emit(f"Predicting {len(self.prediction)} images with {Path(checkpoint).name}…", False)
        self.busy_changed.emit()
        return self.predictor

    def _poll_prediction(self) -> None:
        for e in self.predictor.events():
            if isinstance(e, ev.Progress):
                self.status.emit(e.text, False)
            elif isinstance(e, ev.Predicted):
                self._take_prediction(e.masks, e.entropy)
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
        h, w = images.shape[1:]
        spec = DatasetSpec(images=images, masks=np.zeros_like(images), source=name)
        job = PredictionProcess(spec, self.checkpoint, batch_size=max(1, min(64, 64 * 128 * 32 // (h * w))))
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
        self.image_miou = np.full(len(masks), np.nan)
        self.image_miou[rows] = per_image_miou(masks[rows], labels[rows])
        order = worst_first(self.image_miou)
        self.worst_order = order[~np.isnan(self.image_miou[order])]
        self.worst_position = -1
        self.confusion = confusion_matrix(masks[rows], labels[rows])
        self.status.emit(
            f"Predicted all {len(masks)} images. Mean per-image mIoU {np.nanmean(self.image_miou):.3f}; "
            "'Next worst IoU' visits the images the model disagrees with most."
            + self.browser.pool_balance(masks),
            False,
        )

    def next_worst(self) -> str:
        """Go to the next image in worst-first order; returns a line saying which."""
        if self.worst_order is None:
            return ""
        self.worst_position = (self.worst_position + 1) % len(self.worst_order)
        i = int(self.worst_order[self.worst_position])
        self.browser.set_index(i)
        return f"image {i}: mIoU {self.image_miou[i]:.3f} (rank {self.worst_position + 1} of {len(self.worst_order)})"

    # -- jobs -------------------------------------------------------------------------------
    def jobs(self) -> list:
        return [j for j in (self.process, self.predictor) if j is not None and j.running]

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.close(timeout=5)
        if self.predictor is not None:
            self.predictor.kill()
            self.predictor = None
        if self.layer_job is not None:
            self.layer_job[1].kill()
            self.layer_job = None
