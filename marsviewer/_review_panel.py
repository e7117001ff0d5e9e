"""The Review tab: save, undo, redo, restore and exclude the image on screen, and work
through the review queue. Every action is one call into ``session.review``."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QCheckBox,
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

from ._review_model import ImageReview, ReviewModel

# Alt keys: napari binds Ctrl+S (save layers) and Ctrl+Z (the paint stroke's undo).
SHORTCUTS = (
    ("Alt-S", "save the mask on screen"),
    ("Alt-Z", "undo the last saved change (Ctrl+Z undoes a paint stroke)"),
    ("Alt-Shift-Z", "redo"),
    ("Alt-E", "exclude or include the image"),
    ("Alt-N", "next entry in the review queue"),
    ("Alt-P", "previous entry in the review queue"),
)


AUDIT_HINT = "Duplicate masks are ranked at once; model disagreement needs a short training."
AUDIT_HINT_DISK = (
    "Read from disk: Rank reads every mask (duplicates) and trains out-of-fold models from disk "
    "(model disagreement)."
)


class ReviewPanel(QWidget):
    def __init__(self, model: ReviewModel, parent=None) -> None:
        super().__init__(parent)
        self.model = model
        self._build()
        model.image_changed.connect(self._show_image)
        model.queue_changed.connect(self._fill_queue)
        model.audit_progress.connect(lambda text: self.audit_status.setText(text))
        model.audit_done.connect(lambda _ok: self.audit_button.setEnabled(True))
        self.setToolTip("Shortcuts in the viewer:\n" + "\n".join(f"{k}: {what}" for k, what in SHORTCUTS))

    def _build(self) -> None:
        root = QVBoxLayout(self)
        box = QGroupBox("This image")
        lay = QVBoxLayout(box)
        self.state_label = QLabel("No dataset.")
        self.state_label.setWordWrap(True)
        lay.addWidget(self.state_label)
        hint = QLabel("Paint on the masks layer with napari's brush, fill and eraser, then Save (Alt+S).")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        row = QHBoxLayout()
        m = self.model
        self.save_button = _button(row, "Save", lambda: m.save())
        self.undo_button = _button(row, "Undo", m.undo)
        self.redo_button = _button(row, "Redo", m.redo)
        self.restore_button = _button(row, "Restore original", m.restore)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.exclude_button = _button(row, "Exclude from training", m.toggle_exclude)
        self.afresh_button = _button(row, "Start afresh", m.start_afresh)
        self.afresh_button.setToolTip(
            "The synthetic sample keeps its corrections between sessions: set them aside "
            "(their folder is renamed, nothing is deleted) and start from its original masks"
        )
        self.autosave = QCheckBox("autosave when moving")
        self.autosave.toggled.connect(lambda on: setattr(m, "autosave", on))
        row.addWidget(self.autosave)
        lay.addLayout(row)
        self.history_list = QListWidget()
        self.history_list.setMaximumHeight(100)
        lay.addWidget(QLabel("History (◀ = current):"))
        lay.addWidget(self.history_list)
        root.addWidget(box)
        root.addWidget(self._build_queue())
        root.addStretch(1)

    def _build_queue(self) -> QGroupBox:
        box = QGroupBox("Review queue: masks that are probably wrong")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.audit_button = _button(row, "Rank images", lambda: self.start_audit())
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 120)
        self.minutes_spin.setValue(3.0)
        self.minutes_spin.setSuffix(" min")
        self.minutes_spin.setToolTip(
            "compute budget of the out-of-fold models that look for disagreement "
            "(it takes longer while a training shares the CPU)"
        )
        row.addWidget(self.minutes_spin)
        lay.addLayout(row)
        self.audit_status = QLabel(AUDIT_HINT)
        self.audit_status.setWordWrap(True)
        lay.addWidget(self.audit_status)
        self.queue = QListWidget()
        self.queue.setMinimumHeight(160)
        self.queue.itemClicked.connect(lambda item: self.model.go_to(item.data(256)))
        lay.addWidget(self.queue)
        row = QHBoxLayout()
        self.exclude_group_button = _button(
            row, "Exclude this duplicate group", lambda: self.model.exclude_group(self.selected())
        )
        self.exclude_group_button.setToolTip(
            "exclude every image of the selected duplicate-mask group from training"
        )
        self.move_button = _button(
            row, "Apply suggested move", lambda: self.model.apply_move(self.selected())
        )
        self.move_button.setToolTip(
            "move a misaligned mask back to where the model says it belongs (unsaved: check, then Save)"
        )
        lay.addLayout(row)
        return box

    # -- actions -----------------------------------------------------------------
    def start_audit(self, minutes: float | None = None, folds: int = 3):
        job = self.model.start_audit(self.minutes_spin.value() if minutes is None else minutes, folds)
        if job is not None:
            self.audit_button.setEnabled(False)
        return job

    def selected(self):
        item = self.queue.currentItem()
        return None if item is None else item.data(256)

    def step_queue(self, direction: int) -> None:
        """Select and visit the next (+1) or previous (-1) queue entry."""
        n = self.queue.count()
        if n:
            row = (self.queue.currentRow() + direction) % n if self.queue.currentRow() >= 0 else 0
            self.queue.setCurrentRow(row)
            self.model.go_to(self.queue.item(row).data(256))

    # -- display -------------------------------------------------------------------
    def _show_image(self, state: ImageReview) -> None:
        self.state_label.setText(state.summary)
        self.exclude_button.setText("Include in training" if state.excluded else "Exclude from training")
        self.history_list.clear()
        self.history_list.addItems(list(state.history))

    def _fill_queue(self) -> None:
        self.queue.clear()
        for entry in self.model.queue:
            item = QListWidgetItem(entry.line(self.model.browser.own_name(entry.index)))
            item.setData(256, entry)  # Qt.UserRole
            self.queue.addItem(item)
        self._show_availability()

    def _show_availability(self) -> None:
        """The hint for this dataset (one read from disk ranks duplicates with the audit)."""
        self.audit_button.setEnabled(self.model.auditor is None)
        self.afresh_button.setVisible(self.model.is_sample)
        if self.audit_status.text() in (AUDIT_HINT, AUDIT_HINT_DISK):
            self.audit_status.setText(AUDIT_HINT_DISK if self.model.reads_from_disk() else AUDIT_HINT)


def _button(row: QHBoxLayout, text: str, action) -> QPushButton:
    button = QPushButton(text)
    button.clicked.connect(lambda *_: action())
    row.addWidget(button)
    return button
