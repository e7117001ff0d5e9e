"""The Label next tab: the unlabelled images worth labelling first, and a start from the
model's prediction. Every action is one call into ``session.label_next``."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ._label_next_model import LabelNextModel

RANK_HINT = "Train a model (or open a run) first; then rank the unlabelled images."


class LabelNextPanel(QWidget):
    def __init__(self, model: LabelNextModel, parent=None) -> None:
        super().__init__(parent)
        self.model = model
        self._build()
        model.queue_changed.connect(self._fill_queue)
        model.progress.connect(lambda text: self.status.setText(text))
        model.done.connect(lambda _ok: self.rank_button.setEnabled(True))
        model.browser.dataset_changed.connect(self._show_availability)

    def _build(self) -> None:
        root = QVBoxLayout(self)
        box = QGroupBox("This image")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.seed_button = QPushButton("Start from prediction")
        self.seed_button.setToolTip(
            "put the model's mask for this unlabelled image into the masks layer (unsaved): "
            "pixels below the confidence stay background for you to paint; then Save (Alt-S). "
            "Shortcut in the viewer: Alt-L"
        )
        self.seed_button.clicked.connect(lambda: self.model.start_from_prediction())
        self.confidence_spin = QDoubleSpinBox()
        self.confidence_spin.setRange(0.0, 0.99)
        self.confidence_spin.setSingleStep(0.05)
        self.confidence_spin.setValue(self.model.confidence)
        self.confidence_spin.setPrefix("confidence ≥ ")
        self.confidence_spin.setToolTip(
            "keep a pixel's predicted class only when the model gives it at least this probability; "
            "the default is the lowest at which 95% of the kept pixels were right when measured"
        )
        self.confidence_spin.valueChanged.connect(lambda v: setattr(self.model, "confidence", v))
        row.addWidget(self.seed_button)
        row.addWidget(self.confidence_spin)
        lay.addLayout(row)
        root.addWidget(box)

        box = QGroupBox("Label next: unlabelled images that should help most")
        lay = QVBoxLayout(box)
        self.rank_button = QPushButton("Rank unlabelled images")
        self.rank_button.setToolTip(
            "with the current checkpoint: uncertain regions (not speckle), spread over different "
            "scenes rather than twenty frames of one"
        )
        self.rank_button.clicked.connect(lambda: self.start())
        lay.addWidget(self.rank_button)
        self.status = QLabel(RANK_HINT)
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.queue = QListWidget()
        self.queue.setMinimumHeight(200)
        self.queue.itemClicked.connect(lambda item: self.model.go_to(item.data(256)))
        lay.addWidget(self.queue)
        root.addWidget(box)
        root.addStretch(1)

    def start(self):
        job = self.model.start()
        if job is not None:
            self.rank_button.setEnabled(False)
        return job

    def _fill_queue(self) -> None:
        self.queue.clear()
        for entry in self.model.entries:
            item = QListWidgetItem(entry.line(self.model.browser.own_name(entry.row)))
            item.setData(256, entry)  # Qt.UserRole
            item.setToolTip(entry.text)
            self.queue.addItem(item)

    def _show_availability(self) -> None:
        """A new dataset can be ranked unless a ranking is still running."""
        self.rank_button.setEnabled(self.model.job is None)
