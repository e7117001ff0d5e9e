"""Qt-free state of training from napari: the run's lifecycle, live previews, prediction
of the whole dataset and worst-first navigation.

The run itself is a child process (``trainer.process``); ``poll()`` reads what arrived
without waiting. The prediction and uncertainty arrays live here; the viewer shows them
as layers and refreshes on ``prediction_changed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from psygnal import Signal

from trainer import events as ev
from trainer.config import ConfigError, TrainConfig
from trainer.runs import new_run_dir

from ._predictions import Predictions
from ._run_record import RunFollower, RunRecord, notice
from ._stack import blank_like, is_stack

PREVIEW_EVERY_S = 4.0
"""A live preview of the image on screen this often while nobody touches the viewer (and
at once after each browse step). Drawing one costs the viewer ~50 ms of CPU under Xvfb,
taken from the training on the same cores: every 4 s that is about 1% of a core."""
PREVIEW_THROTTLE_S = 0.15  # at most one preview request per this while the person browses
ENDED = ("finished", "stopped", "failed")
# A step interval in which the session held the job for the person (browsing, painting)
# shows little CPU for that reason, not because other programs are busy.
HELD_RECENTLY_S = 5.0


def default_runs_root() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("marsviewer")) / "runs"


class TrainingModel(Predictions):
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
        # Each dataset opened is a new generation; a run shows previews only on its own.
        self.generation = self.run_generation = 0
        self.clock = time.monotonic
        self.last_hold = -math.inf  # when the session last held the jobs for the person
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
        arrays of its shape (frame stacks for a dataset read from disk). What was computed
        for the dataset open before never lands on this one: a prediction of it is
        stopped, and a training run on it goes on but shows no preview here."""
        self.generation += 1
        if self.predictor is not None:
            self.predictor.kill()
            self.predictor = None
            self.status.emit("Prediction stopped: another dataset was opened.", False)
            self.busy_changed.emit()
        if self.running and self.run_generation != self.generation:
            self.notify.emit(
                "Training goes on with the dataset it started on; its previews are not shown on this "
                "one (its curves stay in the Train tab).",
                "info",
            )
        self.worst_order = self.image_miou = self.confusion = None
        self.prediction = self.entropy = None  # never the last dataset's, even of the same shape
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
        try:
            run_dir = new_run_dir(self.runs_root)
        except OSError as exc:
            self.status.emit(
                f"Cannot start: cannot create a run directory in {self.runs_root} ({exc.strerror or exc})",
                True,
            )
            return None
        self._reset(str(run_dir))
        self.run_generation = self.generation
        self.record.state = "starting"
        self.record_changed.emit()  # the bar says "starting" with the status line, not "idle"
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
            if self.clock() - self.last_hold < HELD_RECENTLY_S:
                self.record.cpu_note = ""  # the job was held for the person, not starved by others
            text = notice(e) if self.process is not None else None  # a run started here, now
            if text:
                self.notify.emit(f"Training: {text}", "info")
            if isinstance(e, ev.Preview) and self.run_generation == self.generation:
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
        if self.run_generation != self.generation:  # the index is of another dataset
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
