"""The training panel: start/stop/resume/attach, live predictions, curves and per-class IoU.

Training runs in a child process (``trainer.process``); this panel only sends it
commands and polls its events from a 100 ms Qt timer that never blocks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from trainer.classes import CLASSES, METRIC_CLASSES
from trainer.config import ConfigError
from trainer.metrics import confusion_matrix, per_image_miou, worst_first

from ._form import ConfigForm
from ._history import RunFollower, RunHistory
from ._layers import class_colormap
from ._plots import CurvePlot

POLL_MS = 100
PREVIEW_EVERY_S = 3.0
PREDICTION = "prediction"
UNCERTAINTY = "uncertainty (entropy)"


def default_runs_root() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("marsviewer")) / "runs"


class TrainingPanel(QWidget):
    """Train from napari. ``owner`` is the main widget (layers, browser, viewer)."""

    run_started = Signal()
    event_received = Signal(dict)
    run_ended = Signal(str)  # finished, stopped or failed
    prediction_done = Signal()

    def __init__(self, owner, parent=None) -> None:
        super().__init__(parent)
        self.owner = owner
        self.viewer = owner.viewer
        self.process = None
        self.follower: RunFollower | None = None
        self.predictor = None
        self.history = RunHistory()
        self.runs_root = default_runs_root()
        self.first_preview_s: float | None = None
        self._start_time = 0.0
        self.worst_order: np.ndarray | None = None
        self.image_miou: np.ndarray | None = None
        self._worst_pos = -1
        self._build()
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(150)
        self._preview_timer.timeout.connect(self._send_preview_request)
        # Throttle, not debounce: while the user keeps browsing, a preview of the image in
        # view is still requested every 150 ms at most.
        owner.browser.index_changed.connect(
            lambda _i: self._preview_timer.isActive() or self._preview_timer.start()
        )
        owner.browser.dataset_changed.connect(self._on_dataset_changed)
        # Closing napari must not leave a training process behind.
        holder = self._process_holder = {"process": None}
        self.destroyed.connect(lambda *_: holder["process"] and holder["process"].close(timeout=5))
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)
        self._update_buttons()

    # -- construction ----------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        self.config_box = box = QGroupBox("Configuration")
        lay = QVBoxLayout(box)
        self.form = ConfigForm()
        lay.addWidget(self.form)
        root.addWidget(box)

        row = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.resume_button = QPushButton("Resume…")
        self.attach_button = QPushButton("Open run…")
        for b in (self.start_button, self.stop_button, self.resume_button, self.attach_button):
            row.addWidget(b)
        root.addLayout(row)
        self.start_button.clicked.connect(lambda: self.start())
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(self._ask_resume)
        self.attach_button.clicked.connect(self._ask_attach)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        root.addWidget(self.progress)
        self.status = QLabel("Not training.")
        self.status.setWordWrap(True)
        root.addWidget(self.status)

        self.loss_plot = CurvePlot("training loss")
        self.iou_plot = CurvePlot("validation IoU", y_range=(0.0, 1.0))
        root.addWidget(self.loss_plot)
        root.addWidget(self.iou_plot)
        self.iou_table = QTableWidget(len(CLASSES) + 2, 2)
        self.iou_table.setHorizontalHeaderLabels(["latest IoU", "at best mIoU"])
        self.iou_table.setVerticalHeaderLabels([c.name for c in CLASSES] + ["mIoU (1-4)", "mIoU as Keras"])
        self.iou_table.verticalHeaderItem(len(CLASSES) + 1).setToolTip(
            "What Keras MeanIoU(num_classes=5, ignore_class=0) prints in course notebooks: "
            "it also averages background (IoU 0) when terrain is predicted as background"
        )
        # Every row visible without scrolling inside the table: 7 rows and the header.
        self.iou_table.verticalHeader().setDefaultSectionSize(26)
        self.iou_table.setFixedHeight(26 * (self.iou_table.rowCount() + 1) + 10)
        root.addWidget(self.iou_table)
        self.uncertainty_check = QCheckBox("show uncertainty (per-pixel entropy)")
        self.uncertainty_check.toggled.connect(self._toggle_uncertainty)
        root.addWidget(self.uncertainty_check)

        box = QGroupBox("After training")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.predict_button = QPushButton("Predict all")
        self.worst_button = QPushButton("Next worst IoU")
        self.finetune_button = QPushButton("Fine-tune")
        self.finetune_button.setToolTip(
            "continue from the best checkpoint on the corrected data, for the form's epochs"
        )
        row.addWidget(self.predict_button)
        row.addWidget(self.worst_button)
        row.addWidget(self.finetune_button)
        self.finetune_button.clicked.connect(lambda: self.fine_tune())
        lay.addLayout(row)
        self.predict_button.clicked.connect(lambda: self.predict_all())
        self.worst_button.clicked.connect(self.go_to_next_worst)
        self.worst_label = QLabel("")
        lay.addWidget(self.worst_label)
        self.confusion_table = QTableWidget(len(CLASSES), len(CLASSES))
        names = [c.name for c in CLASSES]
        self.confusion_table.setHorizontalHeaderLabels([f"→{n}" for n in names])
        self.confusion_table.setVerticalHeaderLabels(names)
        self.confusion_table.setMaximumHeight(170)
        self.confusion_table.setToolTip("rows: labelled class, columns: predicted class (% of the row)")
        lay.addWidget(self.confusion_table)
        root.addWidget(box)
        root.addStretch(1)

    # -- starting and stopping -------------------------------------------------
    @property
    def running(self) -> bool:
        return (self.process is not None and self.process.running) or self.follower is not None

    def _dataset_arrays(self):
        owner = self.owner
        if owner.images_layer is None or owner.masks_layer is None:
            raise ConfigError("open a dataset first (Dataset tab)")
        images = np.asarray(owner.images_layer.data, dtype=np.uint8)
        review = getattr(owner, "review", None)
        if review is not None and review.store is not None:
            # Train on the original masks plus the *saved* corrections, which the
            # training process re-reads every epoch; unsaved paint strokes are not used.
            return images, review.original_masks, owner.browser.source
        masks = np.asarray(owner.masks_layer.data, dtype=np.uint8)
        return images, masks, owner.browser.source

    def _corrections(self) -> dict:
        review = getattr(self.owner, "review", None)
        if review is None or review.store is None:
            return {}
        return {"corrections_path": str(review.store.path), "corrections_hash": review.content_hash}

    def start(self, resume: str | None = None, config=None):
        """Start a run in a child process; returns it (or None with a message shown)."""
        from trainer.process import DatasetSpec, TrainingProcess

        if self.running:
            return self.process
        try:
            cfg = config or self.form.config()
            images, masks, source = self._dataset_arrays()
        except ConfigError as exc:
            self._show_message(f"Cannot start: {exc}", error=True)
            return None
        run_dir = self.runs_root / time.strftime("%Y%m%d-%H%M%S")
        self._reset_display()
        self._ensure_prediction_layers()
        self.history.run_dir = str(run_dir)
        self.history.state = "starting"
        self._start_time = time.perf_counter()
        self.first_preview_s = None
        spec = DatasetSpec(images=images, masks=masks, source=source, **self._corrections())
        self.process = TrainingProcess(
            spec,
            cfg,
            str(run_dir),
            resume=resume,
            preview_indices=[self.owner.browser.index],
            preview_every_s=PREVIEW_EVERY_S,
        )
        self._process_holder["process"] = self.process
        self._show_message(f"Starting… (run directory {run_dir})")
        self.timer.start()
        self._update_buttons()
        self.run_started.emit()
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.process.running:
            self.process.stop()
            self.history.state = "stopping"
            self._show_message("Stopping after the current step; a checkpoint will be saved…")
        elif self.follower is not None:
            self.follower = None
            self.timer.stop()
            self._show_message("Detached from the run (it keeps running where it was started).")
        self._update_buttons()

    def shutdown(self) -> None:
        """Stop everything this panel started (napari is closing)."""
        self.timer.stop()
        if self.process is not None:
            self.process.close(timeout=5)
        if self.predictor is not None:
            self.predictor.kill()

    def _ask_resume(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Resume from a checkpoint", str(self.runs_root), "Checkpoints (*.pt)"
        )
        if path:
            self.start(resume=path)

    def _ask_attach(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a run directory", str(self.runs_root))
        if path:
            self.attach(path)

    def attach(self, path: str | Path) -> bool:
        """Show a run directory's curves and previews; keeps following a run in progress."""
        try:
            follower = RunFollower(path)
        except FileNotFoundError as exc:
            self._show_message(str(exc), error=True)
            return False
        if self.process is not None and self.process.running:
            self._show_message("A training run is in progress; stop it before opening another.", error=True)
            return False
        self._reset_display()
        self.follower = follower
        self.history.run_dir = str(path)
        self.poll()
        if self.follower is not None:
            self.timer.start()
        self._update_buttons()
        return True

    # -- polling ---------------------------------------------------------------
    def poll(self) -> None:
        """Read what arrived (never waits) and update the display once."""
        events = []
        if self.process is not None and (
            self.process.running or self.history.state in ("starting", "running", "stopping")
        ):
            events = self.process.events()
        elif self.follower is not None:
            events = self.follower.new_events()
        preview_seen = False
        for e in events:
            d = self.history.apply(e)
            if d["kind"] == "preview":
                preview_seen = True
                if hasattr(e, "masks"):
                    self._show_preview(e.indices, e.masks, e.entropy)
            self.event_received.emit(d)
        if preview_seen and self.follower is not None:
            latest = self.follower.latest_preview()
            if latest is not None:
                self._show_preview(*latest)
        if self.predictor is not None:
            self._poll_prediction()
        if events:
            self._refresh()
        if self.history.state in ("finished", "stopped", "failed"):
            if self.follower is not None or (self.process is not None and not self.process.running):
                if self.predictor is None:  # a prediction still needs the timer
                    self.timer.stop()
                self.follower = None
                state = self.history.state
                self._update_buttons()
                if events:
                    self.run_ended.emit(state)

    def _send_preview_request(self) -> None:
        if self.process is not None and self.process.running:
            self.process.request_preview([self.owner.browser.index])

    # -- display ---------------------------------------------------------------
    def _reset_display(self) -> None:
        self.history = RunHistory()
        self.worst_order = None
        self.image_miou = None
        self._refresh()

    def _ensure_prediction_layers(self) -> None:
        masks = self.owner.masks_layer
        if masks is None:
            return
        shape = masks.data.shape
        layers = self.viewer.layers
        if PREDICTION not in layers or layers[PREDICTION].data.shape != shape:
            if PREDICTION in layers:
                layers.remove(PREDICTION)
            self.viewer.add_labels(
                np.zeros(shape, np.uint8), name=PREDICTION, colormap=class_colormap(), opacity=0.6
            )
        if UNCERTAINTY not in layers or layers[UNCERTAINTY].data.shape != shape:
            if UNCERTAINTY in layers:
                layers.remove(UNCERTAINTY)
            self.viewer.add_image(
                np.zeros(shape, np.float32),
                name=UNCERTAINTY,
                colormap="magma",
                contrast_limits=(0.0, math.log(len(CLASSES))),
                blending="additive",
                visible=self.uncertainty_check.isChecked(),
            )
        # The user's masks stay the selected layer so paint tools act on them.
        self.viewer.layers.selection.active = masks

    def _show_preview(self, indices, masks, entropy) -> None:
        self._ensure_prediction_layers()
        pred = self.viewer.layers[PREDICTION]
        unc = self.viewer.layers[UNCERTAINTY]
        for k, i in enumerate(indices):
            if 0 <= i < len(pred.data):
                pred.data[i] = masks[k]
                if entropy is not None:
                    unc.data[i] = entropy[k]
        pred.refresh()
        unc.refresh()
        if self.first_preview_s is None and self._start_time:
            self.first_preview_s = time.perf_counter() - self._start_time

    def _toggle_uncertainty(self, on: bool) -> None:
        if UNCERTAINTY in self.viewer.layers:
            self.viewer.layers[UNCERTAINTY].visible = on

    def _refresh(self) -> None:
        h = self.history
        self.progress.setValue(int(1000 * min(max(h.progress, 0.0), 1.0)))
        self.progress.setFormat(
            h.status_line().split("\n")[0][:90] if h.state in ("running", "stopping") else h.state
        )
        if h.message:
            self._show_message(h.message, error=h.state == "failed")
        self.loss_plot.set_series([("loss", (230, 230, 230), h.steps, h.losses)])
        series = [
            (CLASSES[c].name, CLASSES[c].color, h.val_steps, [v[c] for v in h.val_iou])
            for c in METRIC_CLASSES
        ]
        series.append(("mIoU", (255, 255, 255), h.val_steps, h.val_miou))
        self.iou_plot.set_series(series)
        latest, best = h.latest_iou, h.best_iou
        rows = [*zip(latest, best, strict=True)]
        rows.append((h.val_miou[-1] if h.val_miou else math.nan, h.best_miou))
        rows.append((h.val_miou_keras[-1] if h.val_miou_keras else math.nan, h.best_miou_keras))
        for r, (a, b) in enumerate(rows):
            for c, v in enumerate((a, b)):
                text = "–" if v is None or math.isnan(v) else f"{v:.3f}"
                if r == 0 and h.background_weight == 0 and h.val_iou:
                    text = "not trained"  # background has loss weight 0, as the metric ignores it
                self.iou_table.setItem(r, c, QTableWidgetItem(text))
        if h.latest_confusion is not None and self.image_miou is None:
            self._show_confusion(np.asarray(h.latest_confusion))

    def _show_confusion(self, cm: np.ndarray) -> None:
        rows = cm.sum(axis=1, keepdims=True).clip(1, None)
        pct = 100 * cm / rows
        for r in range(cm.shape[0]):
            for c in range(cm.shape[1]):
                item = QTableWidgetItem(f"{pct[r, c]:.0f}%")
                item.setToolTip(f"{int(cm[r, c]):,} pixels")
                self.confusion_table.setItem(r, c, item)

    def _show_message(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6b6b;" if error else "")

    def _update_buttons(self) -> None:
        running = self.running
        # While a run is in progress its curves matter, not the form: fold the form away.
        self.config_box.setVisible(not running)
        self.start_button.setEnabled(not running)
        self.resume_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.stop_button.setText("Detach" if self.follower is not None else "Stop")
        has_ckpt = bool(self.history.best_checkpoint or self.history.last_checkpoint)
        self.predict_button.setEnabled(has_ckpt and self.predictor is None)
        self.finetune_button.setEnabled(has_ckpt and not running)
        self.worst_button.setEnabled(self.worst_order is not None)

    def _on_dataset_changed(self) -> None:
        self.worst_order = None
        self.image_miou = None
        for name in (PREDICTION, UNCERTAINTY):
            if name in self.viewer.layers and self.owner.masks_layer is not None:
                if self.viewer.layers[name].data.shape != self.owner.masks_layer.data.shape:
                    self.viewer.layers.remove(name)
        self._update_buttons()

    # -- after training ----------------------------------------------------------
    def fine_tune(self):
        """Continue from the best checkpoint for the form's number of epochs; the run
        uses the saved corrections and exclusions."""
        from trainer.checkpoint import CheckpointError, load_checkpoint

        ckpt = self.history.best_checkpoint or self.history.last_checkpoint
        if not ckpt:
            self._show_message("No checkpoint to fine-tune yet.", error=True)
            return None
        try:
            data = load_checkpoint(ckpt)
            cfg = data["config_obj"].replace(
                epochs=data["epoch"] + 1 + self.form.config().epochs, minutes=0.0
            )
        except (CheckpointError, ConfigError) as exc:
            self._show_message(str(exc), error=True)
            return None
        return self.start(resume=ckpt, config=cfg)

    def predict_all(self, checkpoint: str | None = None):
        """Predict every image with the best (else last) checkpoint, in a child process."""
        from trainer.process import DatasetSpec, PredictionProcess

        checkpoint = checkpoint or self.history.best_checkpoint or self.history.last_checkpoint
        if not checkpoint:
            self._show_message("No checkpoint yet: train first, or open a run.", error=True)
            return None
        try:
            images, masks, source = self._dataset_arrays()
        except ConfigError as exc:
            self._show_message(str(exc), error=True)
            return None
        self._ensure_prediction_layers()
        self.predictor = PredictionProcess(DatasetSpec(images=images, masks=masks, source=source), checkpoint)
        self.progress.setValue(0)
        self.progress.setFormat("predicting…")
        self._show_message(f"Predicting {len(images)} images with {Path(checkpoint).name}…")
        self.timer.start()
        self._update_buttons()
        return self.predictor

    def _poll_prediction(self) -> None:
        for msg in self.predictor.messages():
            if msg[0] == "progress":
                self.progress.setValue(int(1000 * msg[1] / max(msg[2], 1)))
                self.progress.setFormat(f"predicting {msg[1]}/{msg[2]}")
            elif msg[0] == "result":
                self._take_prediction(msg[1], msg[2])
            elif msg[0] == "error":
                self._show_message(f"Prediction failed: {msg[1]}", error=True)
        if self.predictor.finished:
            self.predictor = None
            if not self.running:
                self.timer.stop()
            self._update_buttons()
            self.prediction_done.emit()

    def _take_prediction(self, pred: np.ndarray, entropy: np.ndarray) -> None:
        layer = self.viewer.layers[PREDICTION]
        layer.data[:] = pred
        layer.refresh()
        unc = self.viewer.layers[UNCERTAINTY]
        unc.data[:] = entropy
        unc.refresh()
        masks = np.asarray(self.owner.masks_layer.data)
        self.image_miou = per_image_miou(pred, masks)
        self.worst_order = worst_first(self.image_miou)
        self._worst_pos = -1
        self._show_confusion(confusion_matrix(pred, masks))
        self.progress.setFormat("prediction done")
        self._show_message(
            f"Predicted all {len(pred)} images. Mean per-image mIoU {np.nanmean(self.image_miou):.3f}; "
            "'Next worst IoU' visits the images the model disagrees with most."
        )

    def go_to_next_worst(self) -> None:
        if self.worst_order is None:
            return
        self._worst_pos = (self._worst_pos + 1) % len(self.worst_order)
        i = int(self.worst_order[self._worst_pos])
        self.owner.browser.set_index(i)
        v = self.image_miou[i]
        self.worst_label.setText(
            f"image {i}: mIoU {v:.3f} (rank {self._worst_pos + 1} of {len(self.worst_order)})"
        )
