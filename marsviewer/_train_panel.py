"""The Train tab: configuration, start/stop/resume/open a run, curves, per-class IoU,
prediction of the whole dataset. Every action is one call into ``session.training``;
every redraw follows one of its signals."""

from __future__ import annotations

import math
import time

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from trainer.classes import CLASSES, ClassTable, ClassTableError

from ._curves import CurvePlot
from ._form import ConfigForm
from ._training_model import ENDED, TrainingModel

SHORT_NAMES = {"Background": "Bg", "Bedrock": "Bedr.", "Big Rock": "Rock"}  # the matrix's columns

# Curves and tables are redrawn at most this often while a run goes on: every redraw is
# time taken from the training that shares the machine's cores (a repaint of the dock
# under Xvfb takes ~10 ms; once a second is ~1% of a core).
REDRAW_EVERY_S = 1.0


class TrainingPanel(QWidget):
    def __init__(self, model: TrainingModel, parent=None) -> None:
        super().__init__(parent)
        self.model = model
        self._classes = None  # the class table the tables show
        self._build()
        self._last_redraw = -math.inf
        self._shown_message: tuple[str, bool] | None = None
        self._shown_confusion: np.ndarray | None = None
        self._show_classes(self.classes())
        if hasattr(model.browser, "dataset_changed"):  # another dataset: its classes, until a run says
            model.browser.dataset_changed.connect(lambda: self._show_classes(self.classes()))
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.timeout.connect(self._redraw)
        model.record_changed.connect(self._on_record_changed)
        model.status.connect(self._show_message)
        model.busy_changed.connect(self._update_buttons)
        model.predicted.connect(self._after_prediction)
        self._update_buttons()

    # -- construction ----------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        self.config_box = box = QGroupBox("Configuration")
        lay = QVBoxLayout(box)
        self.form = ConfigForm()
        lay.addWidget(self.form.native)
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
        self.stop_button.clicked.connect(self.model.stop)
        self.resume_button.clicked.connect(self._ask_resume)
        self.attach_button.clicked.connect(self._ask_attach)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFormat("idle")
        root.addWidget(self.progress)
        self.status = QLabel("Not training.")
        self.status.setWordWrap(True)
        root.addWidget(self.status)

        self.loss_plot = CurvePlot("training loss")
        self.iou_plot = CurvePlot("validation IoU", y_range=(0.0, 1.0))
        root.addWidget(self.loss_plot)
        root.addWidget(self.iou_plot)
        root.addWidget(self._build_iou_table())
        self.uncertainty_check = QCheckBox("show uncertainty (per-pixel entropy)")
        root.addWidget(self.uncertainty_check)
        root.addWidget(self._build_after_training())
        root.addStretch(1)

    def _build_iou_table(self) -> QTableWidget:
        table = self.iou_table = QTableWidget(len(CLASSES) + 2, 2)
        table.setHorizontalHeaderLabels(["latest IoU", "at best mIoU"])
        table.verticalHeader().setDefaultSectionSize(26)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)  # "not in this dataset" whole
        return table

    def classes(self) -> ClassTable:
        """The run's class table while it has one, else the open dataset's."""
        h = self.model.record
        if h.classes:
            try:
                return ClassTable.from_records(h.classes)
            except ClassTableError:
                pass
        return getattr(self.model.browser, "classes", CLASSES)

    def _show_classes(self, classes) -> None:
        """The IoU table's and the confusion matrix's rows and columns: one per class of
        ``classes`` (the run's table, else the open dataset's)."""
        if self._classes is not None and tuple(classes) == tuple(self._classes):
            return
        self._classes = classes
        n = len(classes)
        table = self.iou_table
        table.clearContents()
        table.setRowCount(n + 2)
        miou = classes.miou_label() if hasattr(classes, "miou_label") else "mIoU"
        table.setVerticalHeaderLabels([c.name for c in classes] + [miou, "mIoU as Keras"])
        table.verticalHeaderItem(n + 1).setToolTip(
            f"What Keras MeanIoU(num_classes={n}, ignore_class=0) prints in course notebooks: "
            "it also averages class 0 (IoU 0) when a labelled pixel is predicted as 0"
        )
        # Every row visible without scrolling inside the table: the rows and the header.
        table.setFixedHeight(26 * (table.rowCount() + 1) + 10)
        names = [c.name for c in classes]
        table = self.confusion_table
        table.clearContents()
        table.setRowCount(n)
        table.setColumnCount(n)
        table.setHorizontalHeaderLabels(["→" + SHORT_NAMES.get(m, m[:5]) for m in names])
        table.setVerticalHeaderLabels(names)
        for i, m in enumerate(names):
            table.horizontalHeaderItem(i).setToolTip(f"predicted {m}")
        table.setFixedHeight(
            table.horizontalHeader().sizeHint().height()
            + n * table.verticalHeader().defaultSectionSize()
            + 2 * table.frameWidth()
        )
        self._shown_confusion = None

    def _build_after_training(self) -> QGroupBox:
        box = QGroupBox("After training")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.predict_button = QPushButton("Predict all")
        self.worst_button = QPushButton("Next worst IoU")
        self.finetune_button = QPushButton("Fine-tune")
        self.finetune_button.setToolTip(
            "continue from the best checkpoint on the corrected data, for the form's epochs"
        )
        for b in (self.predict_button, self.worst_button, self.finetune_button):
            row.addWidget(b)
        lay.addLayout(row)
        self.predict_button.clicked.connect(lambda: self.model.predict_all())
        self.worst_button.clicked.connect(lambda: self.worst_label.setText(self.model.next_worst()))
        self.finetune_button.clicked.connect(lambda: self.fine_tune())
        self.worst_label = QLabel("")
        lay.addWidget(self.worst_label)
        row = QHBoxLayout()
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip(
            "an image layer you opened (any size, gray or RGB, or a stack): the model's "
            "prediction becomes a Labels layer beside it"
        )
        self.predict_layer_button = QPushButton("Predict layer")
        row.addWidget(self.layer_combo, 1)
        row.addWidget(self.predict_layer_button)
        lay.addLayout(row)
        table = self.confusion_table = QTableWidget(len(CLASSES), len(CLASSES))
        # The whole matrix in view, its columns sharing the dock's width: no scroll bars
        table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        table.horizontalHeader().setMinimumSectionSize(24)
        rows = table.verticalHeader()
        rows.setSectionResizeMode(QHeaderView.Fixed)
        table.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        table.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        table.setToolTip("rows: labelled class, columns: predicted class (% of the row)")
        lay.addWidget(table)
        return box

    # -- actions -----------------------------------------------------------------
    def start(self, resume: str | None = None, config=None):
        from trainer.config import ConfigError

        try:
            cfg = config or self.form.config()
        except ConfigError as exc:
            self._show_message(f"Cannot start: {exc}", True)
            return None
        return self.model.start(cfg, resume=resume)

    def fine_tune(self):
        from trainer.config import ConfigError

        try:
            epochs = self.form.config().epochs
        except ConfigError as exc:
            self._show_message(str(exc), True)
            return None
        return self.model.fine_tune(epochs)

    def _ask_resume(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Resume from a checkpoint", str(self.model.runs_root), "Checkpoints (*.pt)"
        )
        if path:
            self.start(resume=path)

    def _ask_attach(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a run directory", str(self.model.runs_root))
        if path:
            self.model.attach(path)

    # -- display -------------------------------------------------------------------
    def _on_record_changed(self) -> None:
        """Redraw now if the last redraw is old enough or the run ended, else once, later."""
        wait = REDRAW_EVERY_S - (time.perf_counter() - self._last_redraw)
        if wait <= 0 or self.model.record.state in ENDED:
            self._redraw()
        elif not self._redraw_timer.isActive():
            self._redraw_timer.start(int(1000 * wait))

    def _redraw(self) -> None:
        self._redraw_timer.stop()
        self._last_redraw = time.perf_counter()
        h = self.model.record
        self.progress.setValue(int(1000 * min(max(h.progress, 0.0), 1.0)))
        running = h.state in ("running", "stopping")
        # The bar holds what fits in it; the whole line goes to the status text below it.
        self.progress.setFormat(h.progress_text() if running else h.state)
        if running:
            self._show_message(h.status_line(), False)
        self.loss_plot.set_series([("loss", (230, 230, 230), h.steps, h.losses)])
        classes = self.classes()
        self._show_classes(classes)
        series = [
            (classes[c].name, classes[c].color, h.val_steps, [v[c] for v in h.val_iou])
            for c in classes.scored
            if c not in h.absent
        ]
        series.append(("mIoU", (255, 255, 255), h.val_steps, h.val_miou))
        self.iou_plot.set_series(series)
        self._show_iou_table(h)
        if h.latest_confusion is not None and self.model.confusion is None:
            self._show_confusion(np.asarray(h.latest_confusion))
        self._update_buttons()

    def _show_iou_table(self, h) -> None:
        rows = [*zip(h.latest_iou, h.best_iou, strict=True)]
        rows.append((h.val_miou[-1] if h.val_miou else math.nan, h.best_miou))
        rows.append((h.val_miou_keras[-1] if h.val_miou_keras else math.nan, h.best_miou_keras))
        for r, pair in enumerate(rows):
            for c, v in enumerate(pair):
                text = "–" if v is None or math.isnan(v) else f"{v:.3f}"
                if r == 0 and h.background_weight == 0 and h.val_iou:
                    text = "not trained"  # background has loss weight 0, as the metric ignores it
                elif r in h.absent and r < len(rows) - 2 and (v is None or math.isnan(v)):
                    text = "not in this dataset"  # never labelled for training: never predicted
                item = self.iou_table.item(r, c)
                if text == "not in this dataset" and (item is None or item.text() != text):
                    item = QTableWidgetItem(text)
                    item.setToolTip(
                        "the training labels hold no pixel of this class, so the model never predicts "
                        "it and the mIoU leaves it out"
                    )
                    self.iou_table.setItem(r, c, item)
                    continue
                if item is None or item.text() != text:  # unchanged cells cost no relayout
                    self.iou_table.setItem(r, c, QTableWidgetItem(text))

    def _after_prediction(self) -> None:
        if self.model.confusion is not None:
            self._show_confusion(self.model.confusion)
            self.progress.setFormat("prediction done")
        self._update_buttons()

    def _show_confusion(self, cm: np.ndarray) -> None:
        if self._shown_confusion is not None and np.array_equal(self._shown_confusion, cm):
            return
        if cm.shape[0] != self.confusion_table.rowCount():  # of another class table
            return
        self._shown_confusion = np.array(cm)
        pct = 100 * cm / cm.sum(axis=1, keepdims=True).clip(1, None)
        for r in range(cm.shape[0]):
            for c in range(cm.shape[1]):
                item = QTableWidgetItem(f"{pct[r, c]:.0f}%")
                item.setToolTip(f"{int(cm[r, c]):,} pixels")
                self.confusion_table.setItem(r, c, item)
        # Its rows as the style draws them (taller than Qt's default under napari's theme):
        # the whole matrix in view, the last row too.
        table = self.confusion_table
        table.setFixedHeight(
            table.horizontalHeader().height() + table.verticalHeader().length() + 2 * table.frameWidth()
        )

    def _show_message(self, text: str, error: bool = False) -> None:
        # Training repeats its message with every batch of events: a style sheet set again
        # re-polishes the label and lays the dock out anew, so only changes are applied.
        if (text, error) == self._shown_message:
            return
        self._shown_message = (text, error)
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6b6b;" if error else "")

    def _update_buttons(self) -> None:
        model = self.model
        running = model.running
        # While a run is in progress its curves matter, not the form: fold the form away.
        self.config_box.setVisible(not running)
        self.start_button.setEnabled(not running)
        self.resume_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.stop_button.setText("Detach" if model.follower is not None else "Stop")
        self.predict_button.setEnabled(bool(model.checkpoint) and model.predictor is None)
        self.finetune_button.setEnabled(bool(model.checkpoint) and not running)
        self.worst_button.setEnabled(model.worst_order is not None)
